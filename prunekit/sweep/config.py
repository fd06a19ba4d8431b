"""Sweep configs: validate a YAML file (or dict) key by key and expand it into a grid of tasks.

Every mistake is reported before any work starts, as ``ConfigError("<yaml path>: <what is
wrong>")`` -- e.g. ``methods[1]: unknown method 'wandda' (did you mean 'wanda'?)``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prunekit.errors import ConfigError, PrunekitError

GPTQ_NAME = re.compile(r"^gptq-w(\d+)g(\d+)$")
SLURM_CLUSTERS = ("slurm", "local", "debug")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------
# Validation helpers: each takes (value, path) and returns the normalized value or raises.
# --------------------------------------------------------------------------------------------


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


def _did_you_mean(name: str, choices: list[str]) -> str:
    hint = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "empty (null)"}.get(type(value), type(value).__name__)


def _mapping(value: Any, path: str, allowed: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a mapping's keys: unknown keys fail with did-you-mean, required keys must be present."""
    if not isinstance(value, dict):
        raise _fail(path, f"expected a mapping with keys {', '.join(allowed)}, got {_type_name(value)}")
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _fail(where, f"unknown key '{key}'{_did_you_mean(key, list(allowed))}; allowed keys: {', '.join(allowed)}")
    for key in required:
        if key not in value or value[key] is None:
            raise _fail(f"{path}.{key}" if path else key, "is required")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"expected a non-empty string, got {_type_name(value)}")
    return value.strip()


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {value!r}")
    return value


def _int(value: Any, path: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(path, f"must be at least {minimum}, got {value}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"expected a number, got {value!r}")
    return float(value)


def _list(value: Any, path: str, item: Callable[[Any, str], Any], allow_scalar: bool = False, non_empty: bool = True) -> list:
    if allow_scalar and not isinstance(value, list):
        value = [value]
    if not isinstance(value, list):
        raise _fail(path, f"expected a list, got {_type_name(value)}")
    if non_empty and not value:
        raise _fail(path, "must not be empty")
    return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _unique(values: list, path: str, key: Callable[[Any], Any] = lambda v: v) -> None:
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        k = key(v)
        if k in seen:
            raise _fail(f"{path}[{i}]", f"duplicate of {path}[{seen[k]}] ({k})")
        seen[k] = i


def _wrap(path: str, func: Callable[[], Any]) -> Any:
    """Run a library validator and prefix its PrunekitError with the YAML path."""
    try:
        return func()
    except ConfigError as err:
        if str(err).startswith(path + ":"):
            raise
        raise _fail(path, _strip_cli_words(str(err))) from None
    except PrunekitError as err:
        raise _fail(path, _strip_cli_words(str(err))) from None


def _strip_cli_words(message: str) -> str:
    return message.replace("--sparsity", "sparsity").replace("--pattern", "pattern").replace("--dtype", "dtype")


# --------------------------------------------------------------------------------------------
# The normalized config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    spec: str  # Hub id, local path (absolute), .gguf file or embedded:NAME
    name: str  # display label in plans and reports
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def key(self) -> str:
        """Names the model's ``dense/`` dir: hash of what identifies the dense model."""
        blob = json.dumps({"model": self.spec, "revision": self.revision, "dtype": self.dtype}, sort_keys=True)
        return f"{slug(self.name)}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class MethodEntry:
    label: str  # what the user wrote: wanda, gptq-w4g128
    method: str  # registry name: wanda, gptq
    kind: str  # prune | quantize
    needs_calibration: bool = True
    quantization: Any = None  # prunekit.recipe.Quantization for kind "quantize"


@dataclass
class SweepConfig:
    name: str
    models: list[ModelEntry]
    methods: list[MethodEntry]
    patterns: list[tuple[float | None, str | None]]  # (sparsity, pattern) pairs for parse_pattern
    calib_sets: list[str]
    calib_source: str
    nsamples: int
    seqlen: int
    seeds: list[int]
    eval_languages: list[str]
    ppl_source: str
    eval_seqlen: int
    tasks: list[str] | None
    limit: float | None
    hidden_states: bool
    analysis_pairs: list[tuple[str, str]]
    push: dict[str, Any] | None
    eval_options: dict[str, Any] = field(default_factory=dict)  # max_windows, batch_size, ... (only those given)
    analysis_options: dict[str, Any] = field(default_factory=dict)  # only, max_tokens
    device: str = "auto"
    batch_size: int | None = None
    skip_layers: str | None = None
    keep_checkpoints: bool = True
    slurm: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the validated input, for the snapshot

    @property
    def eval_settings(self) -> dict[str, Any]:
        """What the eval stage depends on besides the checkpoint (a change re-runs it)."""
        return {
            "languages": self.eval_languages, "ppl_source": self.ppl_source, "seqlen": self.eval_seqlen,
            "tasks": self.tasks, "limit": self.limit, "hidden_states": self.hidden_states, **self.eval_options,
        }

    def to_json(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

TOP_KEYS = {
    "name": "label of the sweep (used in reports)",
    "models": "list of model ids/paths, or mappings {id|path, dtype, revision, name, trust_remote_code}",
    "methods": "pruning methods (magnitude, wanda, sparsegpt) and/or gptq-w{bits}g{group}",
    "sparsities": "unstructured sparsities in (0, 1), default [0.5]",
    "patterns": "'unstructured' and/or N:M patterns such as '2:4', default ['unstructured']",
    "calibration": "{sets, source, nsamples, seqlen, seeds}",
    "evaluation": "{languages, perplexity_source, seqlen, tasks, limit, hidden_states, max_windows, batch_size, snr_tokens, task_data, num_fewshot, chat_template, bootstrap_iters}",
    "analysis": "{pairs: [[calib A, calib B], ...], only, max_tokens}",
    "push": "{namespace, private, endpoint}",
    "execution": "{device, batch_size, skip_layers, keep_checkpoints}",
    "slurm": "{partition, gpus_per_node, cpus_per_task, mem_gb, time_min, account, qos, constraint, runs_per_job, cluster, setup, additional}",
}
MODEL_KEYS = {"id": 0, "path": 0, "dtype": 0, "revision": 0, "name": 0, "trust_remote_code": 0}
CALIB_KEYS = {"sets": 0, "source": 0, "nsamples": 0, "seqlen": 0, "seeds": 0}
EVAL_KEYS = {"languages": 0, "perplexity_source": 0, "seqlen": 0, "tasks": 0, "limit": 0, "hidden_states": 0,
             "max_windows": 0, "batch_size": 0, "snr_tokens": 0, "task_data": 0, "num_fewshot": 0, "chat_template": 0,
             "bootstrap_iters": 0}
ANALYSIS_KEYS = {"pairs": 0, "only": 0, "max_tokens": 0}
PUSH_KEYS = {"namespace": 0, "private": 0, "endpoint": 0}
EXEC_KEYS = {"device": 0, "batch_size": 0, "skip_layers": 0, "keep_checkpoints": 0}
SLURM_KEYS = {
    "partition": 0, "gpus_per_node": 0, "cpus_per_task": 0, "mem_gb": 0, "time_min": 0, "account": 0, "qos": 0,
    "constraint": 0, "runs_per_job": 0, "cluster": 0, "setup": 0, "additional": 0,
}


def _model(value: Any, path: str, base: Path) -> ModelEntry:
    from prunekit.models import EMBEDDED_PREFIX, _HUB_ID

    if isinstance(value, str):
        value = {"id": value}
    entry = _mapping(value, path, MODEL_KEYS)
    if ("id" in entry) == ("path" in entry):
        raise _fail(path, "give exactly one of 'id' (Hub id or embedded:NAME) or 'path' (local model dir or .gguf file)")
    dtype = entry.get("dtype", "auto")
    if dtype not in DTYPES:
        raise _fail(f"{path}.dtype", f"unknown dtype {dtype!r}{_did_you_mean(str(dtype), list(DTYPES))}; choose one of {', '.join(DTYPES)}")
    revision = entry.get("revision")
    if revision is not None:
        revision = _str(revision, f"{path}.revision")
    trust = _bool(entry.get("trust_remote_code", False), f"{path}.trust_remote_code")
    if "id" in entry:
        spec = _str(entry["id"], f"{path}.id")
        local = Path(spec).expanduser()
        if spec.startswith(EMBEDDED_PREFIX):
            from prunekit.embedded import EMBEDDED_MODELS

            name = spec[len(EMBEDDED_PREFIX):]
            if name not in EMBEDDED_MODELS:
                raise _fail(f"{path}.id", f"unknown embedded model '{name}'{_did_you_mean(name, list(EMBEDDED_MODELS))}; "
                            f"available: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}")
        elif not _HUB_ID.match(spec) and not local.exists():
            raise _fail(f"{path}.id", f"'{spec}' is not a Hub id (org/name) nor embedded:NAME; use 'path:' for a local model")
        display = spec.split("/")[-1] if not spec.startswith(EMBEDDED_PREFIX) else spec[len(EMBEDDED_PREFIX):]
    else:
        raw = Path(_str(entry["path"], f"{path}.path")).expanduser()
        resolved = raw if raw.is_absolute() else (base / raw)
        if not resolved.exists():
            raise _fail(f"{path}.path", f"'{entry['path']}' does not exist (relative paths are relative to {base})")
        if resolved.is_dir() and not (resolved / "config.json").exists():
            raise _fail(f"{path}.path", f"'{entry['path']}' has no config.json; is it a Hugging Face model folder?")
        if resolved.is_file() and resolved.suffix != ".gguf":
            raise _fail(f"{path}.path", f"'{entry['path']}' is a file but not a .gguf file")
        spec = str(resolved.resolve())
        display = resolved.stem if resolved.is_file() else resolved.name
    name = _str(entry["name"], f"{path}.name") if "name" in entry else display
    return ModelEntry(spec, name, dtype, revision, trust)


def _split_method_name(name: str):
    """``gptq-w4g128`` -> ("gptq", Quantization(4, 128)); ``wanda`` -> ("wanda", None)."""
    try:
        from prunekit.recipe import split_method_name
    except ImportError:  # older recipe module: only gptq-w{bits}g{group}
        from prunekit.recipe import Quantization

        match = GPTQ_NAME.match(name)
        return ("gptq", Quantization(int(match.group(1)), int(match.group(2)))) if match else (name, None)
    return split_method_name(name)


def _method(value: Any, path: str) -> MethodEntry:
    from prunekit.methods import available_methods, get_method

    name = _str(value, path)
    prune_methods = available_methods("prune")
    base, quantization = _wrap(path, lambda: _split_method_name(name))
    if quantization is not None:
        if base not in available_methods("quantize"):
            raise _fail(path, f"'{name}' needs the '{base}' method, which this prunekit installation does not provide")
        return MethodEntry(name, base, "quantize", True, quantization)
    if name in prune_methods:
        return MethodEntry(name, name, "prune", get_method(name).needs_calibration)
    quantize_methods = available_methods("quantize")
    if name in quantize_methods:
        raise _fail(path, f"'{name}' needs bits and group size in its name, e.g. {name}-w4g128")
    choices = prune_methods + [f"{q}-w4g128" for q in quantize_methods]
    raise _fail(path, f"unknown method '{name}'{_did_you_mean(name, choices)}; choose from {', '.join(prune_methods)} "
                "or a quantization such as gptq-w4g128 (gptq-w{bits}g{group})")


def _language_spec(value: Any, path: str) -> str:
    from prunekit.languages import parse_languages

    if isinstance(value, list):  # [en, de] is a mix
        value = "+".join(str(v) for v in value)
    spec = _str(value, path)
    _wrap(path, lambda: parse_languages(spec))
    return spec


def _languages_of(spec: str) -> list[str]:
    from prunekit.languages import parse_languages

    return [lang.code for lang in parse_languages(spec)]


def _check_source(source: str, path: str, langs: list[str], split: str, base: Path) -> str:
    """A text source must be 'mc4', 'embedded' or an existing PATH with text for every language."""
    if source == "mc4":
        return source
    if source == "embedded":
        from prunekit.embedded import embedded_languages

        have = embedded_languages()
        missing = [lang for lang in langs if lang not in have]
        if missing:
            raise _fail(path, f"the embedded texts have no {', '.join(missing)} (embedded: {', '.join(have)}); use mc4 or a local PATH")
        return source
    from prunekit.textsources import _local_file_for

    raw = Path(source).expanduser()
    resolved = raw if raw.is_absolute() else base / raw
    if not resolved.exists():
        raise _fail(path, f"'{source}' is neither 'mc4', 'embedded' nor an existing file or directory (relative to {base})")
    for lang in langs:
        _wrap(path, lambda lang=lang: _local_file_for(resolved, lang, split))
    return str(resolved.resolve())


def _pattern_list(raw: dict[str, Any]) -> list[tuple[float | None, str | None]]:
    from prunekit.recipe import parse_pattern

    def pattern_item(value: Any, path: str) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            raise _fail(path, f"got the number {value}: write N:M patterns in quotes, e.g. '2:4' (YAML reads an unquoted 2:4 as a number)")
        return _str(value, path)

    patterns = _list(raw.get("patterns", ["unstructured"]), "patterns", pattern_item, allow_scalar=True)
    has_unstructured = any(p.lower() == "unstructured" for p in patterns)
    if "sparsities" in raw and not has_unstructured:
        raise _fail("sparsities", "given, but 'patterns' has no 'unstructured' entry to apply them to; add 'unstructured' to patterns or drop sparsities")
    sparsities = _list(raw.get("sparsities", [0.5]), "sparsities", _number, allow_scalar=True)
    out: list[tuple[float | None, str | None]] = []
    for i, pattern in enumerate(patterns):
        if pattern.lower() == "unstructured":
            for j, s in enumerate(sparsities):
                _wrap(f"sparsities[{j}]", lambda s=s: parse_pattern(s, None))
                out.append((s, None))
        else:
            _wrap(f"patterns[{i}]", lambda pattern=pattern: parse_pattern(None, pattern))
            out.append((None, pattern))
    _unique(out, "patterns")
    return out


def load_config(config: str | Path | dict[str, Any]) -> SweepConfig:
    """Read and validate a sweep config (a YAML path or an already-parsed dict)."""
    if isinstance(config, SweepConfig):
        return config
    if isinstance(config, (str, Path)):
        import yaml

        path = Path(config).expanduser()
        if not path.is_file():
            raise ConfigError(f"sweep config '{config}' not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        base = path.resolve().parent
        default_name = path.stem
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
        base = Path.cwd()
        default_name = "sweep"
    else:
        raise ConfigError(f"a sweep config is a YAML path or a dict, got {type(config).__name__}")
    if raw is None:
        raise ConfigError("the sweep config is empty; see configs/tiny-example.yaml for an example")
    _mapping(raw, "", TOP_KEYS, required=("models", "methods", "calibration"))

    name = _str(raw.get("name", default_name), "name")
    models = _list(raw["models"], "models", lambda v, p: _model(v, p, base))
    _unique(models, "models", key=lambda m: (m.spec, m.revision, m.dtype))
    _unique(models, "models", key=lambda m: m.name)
    methods = _list(raw["methods"], "methods", _method, allow_scalar=True)
    _unique(methods, "methods", key=lambda m: m.label)
    patterns = _pattern_list(raw)

    calib = _mapping(raw["calibration"], "calibration", CALIB_KEYS, required=("sets",))
    sets = _list(calib["sets"], "calibration.sets", _language_spec, allow_scalar=True)
    _unique(sets, "calibration.sets", key=lambda s: tuple(sorted(_languages_of(s))))
    calib_langs = sorted({code for s in sets for code in _languages_of(s)})
    calib_source = _check_source(_str(calib.get("source", "embedded"), "calibration.source"), "calibration.source", calib_langs, "calibration", base)
    nsamples = _int(calib.get("nsamples", 128), "calibration.nsamples", 1)
    seqlen = _int(calib.get("seqlen", 2048), "calibration.seqlen", 2)
    seeds = _list(calib.get("seeds", [0]), "calibration.seeds", lambda v, p: _int(v, p, 0), allow_scalar=True)
    _unique(seeds, "calibration.seeds")
    for i, s in enumerate(sets):
        if len(_languages_of(s)) > nsamples:
            raise _fail(f"calibration.sets[{i}]", f"'{s}' mixes {len(_languages_of(s))} languages but calibration.nsamples is {nsamples}; each language needs at least one sample")

    ev = _mapping(raw.get("evaluation") or {}, "evaluation", EVAL_KEYS)
    if "languages" in ev:
        value = ev["languages"]
        if isinstance(value, str):
            langs = _wrap("evaluation.languages", lambda: _languages_of(value))
        else:
            langs = _list(value, "evaluation.languages", lambda v, p: _wrap(p, lambda: _single_language(v, p)))
    else:
        langs = [code for code in _study_order(calib_langs)]
    _unique(langs, "evaluation.languages")
    ppl_source = _check_source(_str(ev.get("perplexity_source", calib.get("source", "embedded")), "evaluation.perplexity_source"),
                               "evaluation.perplexity_source", langs, "evaluation", base)
    eval_seqlen = _int(ev.get("seqlen", 2048), "evaluation.seqlen", 2)
    tasks = None
    if ev.get("tasks") is not None:
        tasks = _list(ev["tasks"], "evaluation.tasks", _str, allow_scalar=True, non_empty=False) or None
    limit = None
    if ev.get("limit") is not None:
        limit = _number(ev["limit"], "evaluation.limit")
        if limit <= 0:
            raise _fail("evaluation.limit", "must be positive (a count of examples, or a fraction below 1)")
        limit = int(limit) if limit >= 1 and float(limit).is_integer() else limit
    hidden_states = _bool(ev.get("hidden_states", True), "evaluation.hidden_states")
    eval_options: dict[str, Any] = {}
    for key, minimum in (("max_windows", 1), ("batch_size", 1), ("snr_tokens", 2), ("num_fewshot", 0), ("bootstrap_iters", 0)):
        if ev.get(key) is not None:
            eval_options[key] = _int(ev[key], f"evaluation.{key}", minimum)
    if ev.get("chat_template") is not None:
        eval_options["chat_template"] = _bool(ev["chat_template"], "evaluation.chat_template")
    if ev.get("task_data") is not None:
        raw_data = Path(_str(ev["task_data"], "evaluation.task_data")).expanduser()
        task_data = raw_data if raw_data.is_absolute() else base / raw_data
        if not task_data.exists():
            raise _fail("evaluation.task_data", f"'{ev['task_data']}' does not exist (relative to {base})")
        eval_options["task_data"] = str(task_data.resolve())
    if tasks:
        _check_tasks(tasks, langs)

    execution = _mapping(raw.get("execution") or {}, "execution", EXEC_KEYS)
    device = _str(execution.get("device", "auto"), "execution.device")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device):
        raise _fail("execution.device", f"unknown device '{device}': use auto, cpu or cuda[:i]")
    batch_size = None if execution.get("batch_size") is None else _int(execution["batch_size"], "execution.batch_size", 1)
    skip_layers = None if execution.get("skip_layers") is None else _str(str(execution["skip_layers"]), "execution.skip_layers")
    keep_checkpoints = _bool(execution.get("keep_checkpoints", True), "execution.keep_checkpoints")

    pairs: list[tuple[str, str]] = []
    analysis_options: dict[str, Any] = {}
    if raw.get("analysis") is not None:
        analysis = _mapping(raw["analysis"], "analysis", ANALYSIS_KEYS, required=("pairs",))

        def pair(value: Any, path: str) -> tuple[str, str]:
            if isinstance(value, str) and ":" in value:
                value = value.split(":")
            if not isinstance(value, list) or len(value) != 2:
                raise _fail(path, "a pair is two calibration sets, e.g. [en, sw]")
            a, b = (_language_spec(v, f"{path}[{k}]") for k, v in enumerate(value))
            for k, v in enumerate((a, b)):
                if v not in sets:
                    raise _fail(f"{path}[{k}]", f"'{v}' is not one of calibration.sets{_did_you_mean(v, sets)} ({', '.join(sets)})")
            if a == b:
                raise _fail(path, "compares a calibration set with itself")
            return a, b

        pairs = _list(analysis["pairs"], "analysis.pairs", pair)
        _unique(pairs, "analysis.pairs", key=lambda p: tuple(sorted(p)))
        if analysis.get("only") is not None:
            only = _list(analysis["only"], "analysis.only", _str, allow_scalar=True)
            for i, kind in enumerate(only):
                if kind not in ANALYSES:
                    raise _fail(f"analysis.only[{i}]", f"unknown analysis '{kind}'{_did_you_mean(kind, list(ANALYSES))}; choose from {', '.join(ANALYSES)}")
            analysis_options["only"] = only
        if analysis.get("max_tokens") is not None:
            analysis_options["max_tokens"] = _int(analysis["max_tokens"], "analysis.max_tokens", 1)
        if not keep_checkpoints:
            raise _fail("execution.keep_checkpoints", "false deletes checkpoints that analysis.pairs needs; keep them or drop analysis")

    push = None
    if raw.get("push") is not None:
        p = _mapping(raw["push"], "push", PUSH_KEYS, required=("namespace",))
        namespace = _str(p["namespace"], "push.namespace")
        if not re.match(r"^[A-Za-z0-9][\w.\-]*$", namespace):
            raise _fail("push.namespace", f"'{namespace}' is not a Hub user or organization name")
        push = {"namespace": namespace, "private": _bool(p.get("private", True), "push.private")}
        if p.get("endpoint") is not None:
            push["endpoint"] = _str(p["endpoint"], "push.endpoint")

    slurm = _slurm(raw.get("slurm") or {})
    return SweepConfig(
        name=name, models=models, methods=methods, patterns=patterns, calib_sets=sets, calib_source=calib_source,
        nsamples=nsamples, seqlen=seqlen, seeds=seeds, eval_languages=list(langs), ppl_source=ppl_source,
        eval_seqlen=eval_seqlen, tasks=tasks, limit=limit, hidden_states=hidden_states, analysis_pairs=pairs, push=push,
        eval_options=eval_options, analysis_options=analysis_options,
        device=device, batch_size=batch_size, skip_layers=skip_layers, keep_checkpoints=keep_checkpoints, slurm=slurm,
        raw=_normalized_raw(raw, models, calib_source, ppl_source, eval_options),
    )


ANALYSES = ("masks", "lsar", "lape", "drift")


def _check_tasks(tasks: list[str], langs: list[str]) -> None:
    """Unknown task names fail now, not after hours of pruning."""
    try:
        from prunekit.evaluation import plan_tasks
    except ImportError:  # evaluation not installed: the eval stage will say so
        return
    for i, name in enumerate(tasks):
        _wrap(f"evaluation.tasks[{i}]", lambda name=name: plan_tasks([name], langs))


def _single_language(value: Any, path: str) -> str:
    from prunekit.languages import get_language

    return get_language(_str(value, path)).code


def _study_order(codes: list[str]) -> list[str]:
    from prunekit.languages import STUDY_LANGUAGES

    order = list(STUDY_LANGUAGES)
    return sorted(codes, key=lambda c: (order.index(c) if c in order else len(order), c))


def _slurm(value: Any) -> dict[str, Any]:
    s = _mapping(value, "slurm", SLURM_KEYS)
    cluster = s.get("cluster", "slurm")
    if cluster not in SLURM_CLUSTERS:
        raise _fail("slurm.cluster", f"unknown cluster '{cluster}'{_did_you_mean(str(cluster), list(SLURM_CLUSTERS))}; use slurm (sbatch), local (submitit LocalExecutor, for testing) or debug")
    out: dict[str, Any] = {"cluster": cluster}
    for key in ("partition", "account", "qos", "constraint"):
        if s.get(key) is not None:
            out[key] = _str(s[key], f"slurm.{key}")
    out["gpus_per_node"] = _int(s.get("gpus_per_node", 1), "slurm.gpus_per_node", 0)
    out["cpus_per_task"] = _int(s.get("cpus_per_task", 8), "slurm.cpus_per_task", 1)
    out["mem_gb"] = _int(s.get("mem_gb", 64), "slurm.mem_gb", 1)
    out["time_min"] = _int(s.get("time_min", 240), "slurm.time_min", 1)
    out["runs_per_job"] = _int(s.get("runs_per_job", 1), "slurm.runs_per_job", 1)
    out["setup"] = _list(s.get("setup", []), "slurm.setup", _str, allow_scalar=True, non_empty=False)
    additional = s.get("additional", {})
    if not isinstance(additional, dict):
        raise _fail("slurm.additional", f"expected a mapping of extra sbatch options, got {_type_name(additional)}")
    out["additional"] = dict(additional)
    return out


def _normalized_raw(raw: dict[str, Any], models: list[ModelEntry], calib_source: str, ppl_source: str,
                    eval_options: dict[str, Any]) -> dict[str, Any]:
    """The config as the workers will re-read it: relative paths made absolute."""
    out = copy.deepcopy(raw)
    out["models"] = [
        {"id" if not Path(m.spec).is_absolute() else "path": m.spec, "dtype": m.dtype, "name": m.name,
         **({"revision": m.revision} if m.revision else {}), **({"trust_remote_code": True} if m.trust_remote_code else {})}
        for m in models
    ]
    out.setdefault("calibration", {})["source"] = calib_source
    out.setdefault("evaluation", {})
    out["evaluation"] = dict(out["evaluation"] or {})
    out["evaluation"]["perplexity_source"] = ppl_source
    if "task_data" in eval_options:
        out["evaluation"]["task_data"] = eval_options["task_data"]
    return out
