"""Sweep configs: validate a YAML file (or dict) against :mod:`prunekit.sweep.schema` and normalize it
into a :class:`SweepConfig`, which :mod:`prunekit.sweep.grid` expands into a grid of tasks.

Every mistake is reported before any work starts, as ``ConfigError("<yaml path>: <what is
wrong>")`` -- the path is pydantic's error location -- e.g.
``methods[1]: unknown method 'wandda' (did you mean 'wanda'?)``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from prunekit.errors import ConfigError, did_you_mean
from prunekit.recipe import CalibrationSpec
from prunekit.sweep.entries import MethodEntry, ModelEntry, slug
from prunekit.sweep.schema import DEFAULT_CONVENTIONS, SweepSpec, check_source, method_entry, type_name

__all__ = ["MethodEntry", "ModelEntry", "SweepConfig", "SweepSpec", "load_config", "slug"]


# --------------------------------------------------------------------------------------------
# Errors: one line, "<yaml path>: <message>"
# --------------------------------------------------------------------------------------------


def _yaml_path(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _section_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema model that validates the mapping at ``loc``."""
    model: type[BaseModel] = SweepSpec
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        found = _model_in(info.annotation) if info is not None else None
        if found is None:
            return None
        model = found
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _message(error: dict[str, Any]) -> tuple[tuple[str | int, ...], str]:
    """(location, one-line message) of a pydantic error, in prunekit's words."""
    loc, kind, value, ctx = tuple(error["loc"]), error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "prunekit":
        return loc + tuple(ctx.get("at", ())), ctx["message"]
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1])
        allowed = list(section.model_fields) if section is not None else []
        key = loc[-1]
        return loc, f"unknown key '{key}'{did_you_mean(str(key), allowed)}; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return loc, "is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        section = _section_at(loc)
        keys = f" with keys {', '.join(section.model_fields)}" if section is not None else ""
        return loc, f"expected a mapping{keys}, got {type_name(value)}"
    if kind == "list_type":
        return loc, f"expected a list, got {type_name(value)}"
    if kind == "string_type":
        return loc, f"expected a non-empty string, got {type_name(value)}"
    if kind == "too_short":
        return loc, "must not be empty"
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return loc, f"expected an integer, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return loc, f"expected a number, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return loc, f"expected true or false, got {value!r}"
    if kind == "greater_than_equal":
        return loc, f"must be at least {ctx['ge']}, got {value}"
    return loc, error["msg"]


def _config_error(err: ValidationError) -> ConfigError:
    """The first error (in the order of the schema's keys) as ``ConfigError("<yaml path>: <message>")``."""
    loc, message = _message(err.errors(include_url=False)[0])
    path = _yaml_path(loc)
    return ConfigError(f"{path}: {message}" if path else message)


# --------------------------------------------------------------------------------------------
# The normalized config
# --------------------------------------------------------------------------------------------


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
    collection: dict[str, Any] = field(default_factory=dict)  # push.collection / push.leaderboard: not in the push's fingerprint
    eval_options: dict[str, Any] = field(default_factory=dict)  # max_windows, batch_size, ... (only those given)
    device: str = "auto"
    gpus_per_worker: int = 1  # GPUs each worker (pool process, Slurm rank) owns; > 1 turns lm-eval's parallelize on
    batch_size: int | None = None
    skip_layers: str | None = None
    keep_checkpoints: bool = True
    slurm: dict[str, Any] = field(default_factory=dict)
    conventions: str = DEFAULT_CONVENTIONS  # prunekit.conventions: study | prunekit
    raw: dict[str, Any] = field(default_factory=dict)  # the validated input, for the snapshot
    evaluation: Any = None  # the EvaluationSpec every eval stage runs (the dtype and trust_remote_code: each model's)
    compare: Any = None  # the CompareSpec every analysis stage runs (the dtype: each model's); None without analysis

    def calibration_spec(self, languages: str | None, seed: int | None) -> CalibrationSpec:
        """One point of the calibration grid: ``languages`` (one of ``calib_sets``, or None for a method
        that uses no text) with ``seed``, in this sweep's source, size and conventions."""
        return CalibrationSpec(languages, self.calib_source, self.nsamples, self.seqlen, 0 if seed is None else seed, self.conventions)

    def compare_spec(self, dtype: str):
        """The CompareSpec an analysis of a model loaded in ``dtype`` runs (the sweep's ``compare``, that dtype)."""
        return dataclasses.replace(self.compare, dtype=dtype)

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


def _read(config: str | Path | dict[str, Any]) -> tuple[Any, Path, str]:
    """(parsed YAML, directory relative paths start from, default sweep name)."""
    if isinstance(config, (str, Path)):
        import yaml

        path = Path(config).expanduser()
        if not path.is_file():
            raise ConfigError(f"sweep config '{config}' not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        return raw, path.resolve().parent, path.stem
    if isinstance(config, dict):
        return copy.deepcopy(config), Path.cwd(), "sweep"
    raise ConfigError(f"a sweep config is a YAML path or a dict, got {type(config).__name__}")


def load_config(config: str | Path | dict[str, Any]) -> SweepConfig:
    """Read and validate a sweep config (a YAML path or an already-parsed dict).

    Raises ConfigError("<yaml path>: <what is wrong>") on the first mistake, before any work."""
    if isinstance(config, SweepConfig):
        return config
    raw, base, default_name = _read(config)
    if raw is None:
        raise ConfigError("the sweep config is empty; see configs/tiny-example.yaml for an example")
    try:
        spec = SweepSpec.model_validate(raw, context={"base": base})
    except ValidationError as err:
        raise _config_error(err) from None
    models = [m.entry() for m in spec.models]
    calib, ev, execution = spec.calibration, spec.evaluation, spec.execution
    calib_source = check_source(calib.source, calib.languages, "calibration", base)
    ppl_source = check_source(ev.perplexity_source or calib.source, spec.eval_languages, "evaluation", base)
    limit = ev.spec().limit  # normalized by the library: 3.0 is 3 examples
    compare = None
    if spec.analysis is not None:
        from prunekit.analysis.spec import CompareSpec

        try:
            compare = CompareSpec(langs=spec.eval_languages, text_source=ppl_source, only=spec.analysis.only,
                                  max_tokens=spec.analysis.max_tokens, device=execution.device)
        except ConfigError as err:
            raise ConfigError(f"analysis: {err}") from None
    push, collection = None, {}
    if spec.push is not None:
        push = {"namespace": spec.push.namespace, "private": spec.push.private}
        if spec.push.endpoint is not None:
            push["endpoint"] = spec.push.endpoint
        collection = {"title": spec.push.collection, "leaderboard": spec.push.leaderboard}
    eval_options = ev.options()
    if spec.conventions != "prunekit":  # the eval stage depends on it (the default leaves digests as they were)
        eval_options["conventions"] = spec.conventions
    if execution.gpus_per_worker > 1:  # a worker owns several GPUs by the user's choice: lm-eval spreads over them
        eval_options["parallelize"] = True
    return SweepConfig(
        name=spec.name or default_name, models=models, methods=[method_entry(m) for m in spec.methods],
        patterns=spec.pattern_pairs(), calib_sets=list(calib.sets), calib_source=calib_source, nsamples=calib.nsamples,
        seqlen=calib.seqlen, seeds=list(calib.seeds), eval_languages=spec.eval_languages, ppl_source=ppl_source,
        eval_seqlen=ev.seqlen, tasks=list(ev.tasks) if ev.tasks else None, limit=limit, hidden_states=ev.hidden_states,
        analysis_pairs=[tuple(p) for p in spec.analysis.pairs] if spec.analysis is not None else [], push=push,
        collection=collection,
        eval_options=eval_options, device=execution.device, gpus_per_worker=execution.gpus_per_worker,
        batch_size=execution.batch_size,
        skip_layers=execution.skip_layers, keep_checkpoints=execution.keep_checkpoints, slurm=spec.slurm.settings(),
        raw=_normalized_raw(raw, models, calib_source, ppl_source, eval_options), conventions=spec.conventions,
        evaluation=ev.spec(langs=spec.eval_languages, ppl_source=ppl_source, tasks=ev.tasks, device=execution.device,
                           conventions=spec.conventions, parallelize=execution.gpus_per_worker > 1),
        compare=compare,
    )


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
