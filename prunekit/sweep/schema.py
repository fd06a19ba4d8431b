"""The sweep config's schema, declared with pydantic: every key, its type, range and default.

:class:`SweepSpec` and its sections (:class:`ModelSpec`, :class:`CalibrationGrid`, ...) forbid unknown
keys. Checks that need the library (method registry, languages, text sources, paths relative to the
config file) or more than one key (a pair of calibration sets must be among ``calibration.sets``) are
validators of those models; they raise :func:`invalid`, whose message :mod:`prunekit.sweep.config`
prints after the YAML path that pydantic's error location gives.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prunekit.conventions import CONVENTIONS, DEFAULT_CONVENTIONS
from prunekit.errors import PrunekitError, did_you_mean
from prunekit.sweep.entries import MethodEntry, ModelEntry

SLURM_CLUSTERS = ("slurm", "local", "debug")
DEFAULT_DTYPE = "auto"  # the checkpoint's own dtype (issue 16)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "empty (null)"}.get(type(value), type(value).__name__)


def invalid(message: str, *at: str | int) -> PydanticCustomError:
    """A validation error; ``at`` extends pydantic's location (for checks that span several keys)."""
    return PydanticCustomError("prunekit", "{message}", {"message": message, "at": at})


@contextlib.contextmanager
def _at(*at: str | int) -> Iterator[None]:
    """A library's PrunekitError, or an :func:`invalid` raised inside, is located at ``at`` below the current key."""
    try:
        yield
    except PrunekitError as err:
        raise invalid(_strip_cli_words(str(err)), *at) from None
    except PydanticCustomError as err:
        raise invalid(err.context["message"], *at, *err.context.get("at", ())) from None


def _strip_cli_words(message: str) -> str:
    return message.replace("--sparsity", "sparsity").replace("--pattern", "pattern").replace("--dtype", "dtype")


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _strip(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise invalid("expected a non-empty string, got an empty string")
        return value.strip()
    return value


Text = Annotated[str, BeforeValidator(_strip)]
NonNegative = Annotated[int, Field(ge=0)]
Listed = BeforeValidator(_as_list)  # a scalar stands for a one-item list
LanguageSpec = Annotated[str, BeforeValidator(_strip), BeforeValidator(lambda v: "+".join(str(x) for x in v) if isinstance(v, list) else v)]  # [en, de] is a mix


def _unique(values: list, name: str, *at: str, key: Callable[[Any], Any] = lambda v: v) -> None:
    """Each value once; a repeat fails at its own index (``at`` + index), naming the first as ``name[i]``."""
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        k = key(v)
        if k in seen:
            raise invalid(f"duplicate of {name}[{seen[k]}] ({k})", *at, i)
        seen[k] = i


def _base(info: ValidationInfo) -> Path:
    """The directory that relative paths in the config are relative to."""
    return (info.context or {}).get("base") or Path.cwd()


def _local(given: str, base: Path) -> Path:
    raw = Path(given).expanduser()
    return raw if raw.is_absolute() else base / raw


def _languages_of(spec: str) -> list[str]:
    from prunekit.languages import parse_languages

    return [lang.code for lang in parse_languages(spec)]


def check_source(source: str, langs: list[str], split: str, base: Path, *at: str) -> str:
    """A text source must be 'mc4', 'embedded' or an existing PATH with text for every language."""
    if source == "mc4":
        return source
    if source == "embedded":
        from prunekit.embedded import embedded_languages

        have = embedded_languages()
        missing = [lang for lang in langs if lang not in have]
        if missing:
            raise invalid(f"the embedded texts have no {', '.join(missing)} (embedded: {', '.join(have)}); use mc4 or a local PATH", *at)
        return source
    from prunekit.textsources import local_file_for

    resolved = _local(source, base)
    if not resolved.exists():
        raise invalid(f"'{source}' is neither 'mc4', 'embedded' nor an existing file or directory (relative to {base})", *at)
    for lang in langs:
        with _at(*at):
            local_file_for(resolved, lang, split)
    return str(resolved.resolve())


def _study_order(codes: list[str]) -> list[str]:
    from prunekit.languages import STUDY_LANGUAGES

    order = list(STUDY_LANGUAGES)
    return sorted(codes, key=lambda c: (order.index(c) if c in order else len(order), c))


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(_Section):
    """One model: a string (Hub id or embedded:NAME) or a mapping with exactly one of ``id`` / ``path``."""

    id: Optional[Text] = Field(None, description="Hub id (org/name) or embedded:NAME")
    path: Optional[Text] = Field(None, description="local model dir or .gguf file, relative to the config file")
    dtype: Text = Field(DEFAULT_DTYPE, description="auto (the checkpoint's own), float32, bfloat16 or float16")
    revision: Optional[Text] = Field(None, description="Hub revision (branch, tag or commit)")
    name: Optional[Text] = Field(None, description="display label in plans and reports")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _id_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"id": value}
        if isinstance(value, dict) and (value.get("id") is None) == (value.get("path") is None):
            raise invalid("give exactly one of 'id' (Hub id or embedded:NAME) or 'path' (local model dir or .gguf file)")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        from prunekit.models import DTYPES

        choices = ["auto", *DTYPES]
        if dtype not in choices:
            raise invalid(f"unknown dtype {dtype!r}{did_you_mean(dtype, choices)}; choose one of {', '.join(choices)}")
        return dtype

    @field_validator("id")
    @classmethod
    def _id(cls, spec: str | None) -> str | None:
        from prunekit.embedded import EMBEDDED_MODELS
        from prunekit.models import EMBEDDED_PREFIX, HUB_ID

        if spec is None:
            return spec
        if spec.startswith(EMBEDDED_PREFIX):
            name = spec[len(EMBEDDED_PREFIX):]
            if name not in EMBEDDED_MODELS:
                raise invalid(f"unknown embedded model '{name}'{did_you_mean(name, list(EMBEDDED_MODELS))}; "
                               f"available: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}")
        elif not HUB_ID.match(spec) and not Path(spec).expanduser().exists():
            raise invalid(f"'{spec}' is not a Hub id (org/name) nor embedded:NAME; use 'path:' for a local model")
        return spec

    @field_validator("path")
    @classmethod
    def _path(cls, given: str | None, info: ValidationInfo) -> str | None:
        if given is None:
            return given
        base = _base(info)
        resolved = _local(given, base)
        if not resolved.exists():
            raise invalid(f"'{given}' does not exist (relative paths are relative to {base})")
        if resolved.is_dir() and not (resolved / "config.json").exists():
            raise invalid(f"'{given}' has no config.json; is it a Hugging Face model folder?")
        if resolved.is_file() and resolved.suffix != ".gguf":
            raise invalid(f"'{given}' is a file but not a .gguf file")
        return str(resolved.resolve())

    def entry(self) -> "ModelEntry":
        if self.id is not None:
            from prunekit.models import EMBEDDED_PREFIX

            spec = self.id
            display = spec[len(EMBEDDED_PREFIX):] if spec.startswith(EMBEDDED_PREFIX) else spec.split("/")[-1]
        else:
            spec = self.path
            display = Path(spec).stem if Path(spec).is_file() else Path(spec).name
        return ModelEntry(spec, self.name or display, self.dtype, self.revision, self.trust_remote_code)


class CalibrationGrid(_Section):
    """The ``calibration:`` section: every set × every seed, of one source and size. Each point of the grid
    is one :class:`prunekit.recipe.CalibrationSpec` (``SweepConfig.calibration_spec``)."""

    sets: Annotated[list[LanguageSpec], Listed, Field(min_length=1)] = Field(
        description="calibration sets: a language, a mix such as en+de or [en, de], or all")
    source: Text = Field("embedded", description="embedded, mc4 or a local PATH with LANG.txt / .jsonl / .parquet")
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seeds: Annotated[list[NonNegative], Listed, Field(min_length=1)] = [0]

    @field_validator("sets")
    @classmethod
    def _sets(cls, sets: list[str]) -> list[str]:
        for i, spec in enumerate(sets):
            with _at(i):
                _languages_of(spec)
        _unique(sets, "calibration.sets", key=lambda s: tuple(sorted(_languages_of(s))))
        return sets

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        _unique(seeds, "calibration.seeds")
        return seeds

    @model_validator(mode="after")
    def _texts_and_sizes(self, info: ValidationInfo) -> "CalibrationGrid":
        check_source(self.source, self.languages, "calibration", _base(info), "source")
        for i, s in enumerate(self.sets):
            if len(_languages_of(s)) > self.nsamples:
                raise invalid(f"'{s}' mixes {len(_languages_of(s))} languages but calibration.nsamples is {self.nsamples}; "
                               "each language needs at least one sample", "sets", i)
        return self

    @property
    def languages(self) -> list[str]:
        return sorted({code for s in self.sets for code in _languages_of(s)})


class EvaluationSection(_Section):
    """The ``evaluation:`` section. Its ranges are checked by the library's ``EvaluationSpec`` (one home),
    reported here at the key's YAML path."""

    languages: Optional[Annotated[list[Text], Listed]] = Field(
        None, description="languages to evaluate (a list, or a spec such as 'en,de' / 'all'); default: the calibration languages")
    perplexity_source: Optional[Text] = Field(None, description="default: calibration.source")
    seqlen: int = 2048
    tasks: Optional[Annotated[list[Text], Listed]] = None
    limit: Optional[float] = None
    hidden_states: bool = True
    max_windows: Optional[int] = None
    batch_size: Optional[int] = None
    snr_tokens: Optional[int] = None
    task_data: Optional[Text] = None
    num_fewshot: Optional[int] = None
    chat_template: Optional[bool] = None
    bootstrap_iters: Optional[int] = None
    backend: Optional[Literal["hf", "vllm"]] = Field(None, description="lm-eval model for the tasks: hf (default) or vllm (in a subprocess of its own)")
    gpu_memory_utilization: Optional[float] = Field(None, description="vllm: fraction of the GPU vLLM may take, in (0, 1]")
    max_model_len: Optional[int] = Field(None, description="vllm: longest sequence its KV cache is planned for")
    model_args: Optional[dict[str, Any]] = Field(None, description="extra keyword arguments of lm-eval's model (HFLM or vLLM)")

    @field_validator("languages", mode="before")
    @classmethod
    def _language_spec(cls, value: Any) -> Any:
        if isinstance(value, str):  # 'en,de' or 'all'
            with _at():
                return _languages_of(value)
        if isinstance(value, list):
            from prunekit.languages import get_language

            codes = []
            for i, v in enumerate(value):
                with _at(i):
                    codes.append(get_language(_strip(v)).code if isinstance(v, str) else v)
            return codes
        return value

    @field_validator("task_data")
    @classmethod
    def _task_data(cls, given: str | None, info: ValidationInfo) -> str | None:
        if given is None:
            return given
        base = _base(info)
        task_data = _local(given, base)
        if not task_data.exists():
            raise invalid(f"'{given}' does not exist (relative to {base})")
        return str(task_data.resolve())

    @model_validator(mode="after")
    def _ranges(self) -> "EvaluationSection":
        self.spec()
        return self

    def spec(self, **given: Any):
        """The library's ``EvaluationSpec`` of this section (languages, device, dtype: ``given``)."""
        from prunekit.evaluation.spec import EvaluationSpec, OptionError

        try:
            return EvaluationSpec(seqlen=self.seqlen, limit=self.limit, **self.options(), **given)
        except OptionError as err:
            raise invalid(err.reason, err.option) from None

    def options(self) -> dict[str, Any]:
        """The evaluation options given (max_windows, batch_size, ...), for ``EvaluationSpec``."""
        keys = ("max_windows", "batch_size", "snr_tokens", "num_fewshot", "bootstrap_iters", "chat_template", "task_data",
                "backend", "gpu_memory_utilization", "max_model_len", "model_args")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


def _pair(value: Any) -> Any:
    if isinstance(value, str) and ":" in value:
        value = value.split(":")
    if not isinstance(value, list) or len(value) != 2:
        raise invalid("a pair is two calibration sets, e.g. [en, sw]")
    return value


class AnalysisSpec(_Section):
    pairs: Annotated[list[Annotated[list[LanguageSpec], BeforeValidator(_pair)]], Field(min_length=1)] = Field(
        description="[[calibration set A, calibration set B], ...] compared by `prunekit compare`")
    only: Optional[Annotated[list[Text], Listed, Field(min_length=1)]] = None
    max_tokens: Optional[int] = Field(None, ge=1)

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, pairs: list[list[str]]) -> list[list[str]]:
        for i, (a, b) in enumerate(pairs):
            for k, spec in enumerate((a, b)):
                with _at(i, k):
                    _languages_of(spec)
            if a == b:
                raise invalid("compares a calibration set with itself", i)
        _unique(pairs, "analysis.pairs", key=lambda p: tuple(sorted(p)))
        return pairs

    @field_validator("only")
    @classmethod
    def _only(cls, only: list[str] | None) -> list[str] | None:
        from prunekit.analysis import ANALYSES

        for i, kind in enumerate(only or []):
            if kind not in ANALYSES:
                raise invalid(f"unknown analysis '{kind}'{did_you_mean(kind, list(ANALYSES))}; choose from {', '.join(ANALYSES)}", i)
        return only


class PushSpec(_Section):
    namespace: Text = Field(description="Hub user or organization the runs are pushed to")
    private: bool = True
    endpoint: Optional[Text] = None
    collection: Optional[Text] = Field(None, description="title of the sweep's Hub collection (default: NAME (prunekit sweep))")
    leaderboard: Optional[Text] = Field(None, description="Space ORG/NAME that `prunekit report --push` publishes to; the cards link it")

    @field_validator("collection")
    @classmethod
    def _collection(cls, title: str | None) -> str | None:
        if title is not None and not 1 <= len(title.strip()) <= 60:
            raise invalid(f"a collection title has 1 to 60 characters; '{title}' has {len(title.strip())}")
        return title

    @field_validator("leaderboard")
    @classmethod
    def _leaderboard(cls, space: str | None) -> str | None:
        if space is not None and not re.match(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$", space):
            raise invalid(f"'{space}' is not a Space id: give ORG/NAME, the one `prunekit report RUNS --push ORG/NAME` publishes")
        return space

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, namespace: str) -> str:
        if not re.match(r"^[A-Za-z0-9][\w.\-]*$", namespace):
            raise invalid(f"'{namespace}' is not a Hub user or organization name")
        return namespace


def _as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ExecutionSpec(_Section):
    device: Text = Field("auto", description="auto, cpu or cuda[:i]")
    gpus_per_worker: int = Field(1, ge=1, description=(
        "GPUs each worker (local pool process, Slurm rank) owns as its whole CUDA_VISIBLE_DEVICES; more than 1 lets "
        "lm-eval spread the model over them (parallelize; vLLM: tensor parallelism)"))
    batch_size: Optional[int] = Field(None, ge=1)
    skip_layers: Optional[Annotated[Text, BeforeValidator(_as_text)]] = None
    keep_checkpoints: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device):
            raise invalid(f"unknown device '{device}': use auto, cpu or cuda[:i]")
        return device


class SlurmSpec(_Section):
    cluster: Text = Field("slurm", description="slurm (sbatch), local (submitit LocalExecutor, for testing) or debug")
    partition: Optional[Text] = None
    account: Optional[Text] = None
    qos: Optional[Text] = None
    constraint: Optional[Text] = None
    gpus_per_node: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, ge=1)
    mem_gb: int = Field(64, ge=1)
    time_min: int = Field(240, ge=1)
    runs_per_job: int = Field(1, ge=1)
    setup: Annotated[list[Text], Listed] = Field([], description="shell lines run before each job")
    additional: dict[str, Any] = Field({}, description="extra sbatch options")

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, cluster: str) -> str:
        if cluster not in SLURM_CLUSTERS:
            raise invalid(f"unknown cluster '{cluster}'{did_you_mean(cluster, list(SLURM_CLUSTERS))}; "
                           "use slurm (sbatch), local (submitit LocalExecutor, for testing) or debug")
        return cluster

    @field_validator("additional", mode="before")
    @classmethod
    def _additional(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise invalid(f"expected a mapping of extra sbatch options, got {type_name(value)}")
        return value

    def settings(self) -> dict[str, Any]:
        return {"cluster": self.cluster, **self.model_dump(exclude={"cluster"}, exclude_none=True)}


def _pattern_item(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        raise invalid(f"got the number {value}: write N:M patterns in quotes, e.g. '2:4' (YAML reads an unquoted 2:4 as a number)")
    return value


class SweepSpec(_Section):
    """A sweep config file: models × methods × patterns × calibration sets × seeds, and what to do with each run."""

    name: Optional[Text] = Field(None, description="label of the sweep (used in reports); default: the file's name")
    conventions: Text = Field(DEFAULT_CONVENTIONS, description="study (the paper's windows and thresholds) or prunekit")
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    methods: Annotated[list[Text], Listed, Field(min_length=1)] = Field(
        description="pruning methods (magnitude, wanda, sparsegpt) and/or gptq-w{bits}g{group}")
    patterns: Annotated[list[Annotated[Text, BeforeValidator(_pattern_item)]], Listed, Field(min_length=1)] = Field(
        ["unstructured"], description="'unstructured' and/or N:M patterns such as '2:4'")
    sparsities: Optional[Annotated[list[float], Listed, Field(min_length=1)]] = Field(
        None, description="unstructured sparsities in (0, 1), default [0.5]")
    calibration: CalibrationGrid
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)  # built per config, not at import: it imports the evaluation
    analysis: Optional[AnalysisSpec] = None
    push: Optional[PushSpec] = None
    execution: ExecutionSpec = ExecutionSpec()
    slurm: SlurmSpec = SlurmSpec()

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: v for k, v in value.items() if v is not None or k in ("name", "conventions")}

    @field_validator("conventions")
    @classmethod
    def _conventions(cls, conventions: str) -> str:
        if conventions not in CONVENTIONS:
            raise invalid(f"unknown conventions '{conventions}'{did_you_mean(conventions, list(CONVENTIONS))}; "
                           f"choose one of {', '.join(CONVENTIONS)}")
        return conventions

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        entries = [m.entry() for m in models]
        _unique(entries, "models", key=lambda m: (m.spec, m.revision, m.dtype))
        _unique(entries, "models", key=lambda m: m.name)
        return models

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        for i, name in enumerate(methods):
            with _at(i):
                method_entry(name)
        _unique(methods, "methods")
        return methods

    @model_validator(mode="after")
    def _across_sections(self, info: ValidationInfo) -> "SweepSpec":
        self.pattern_pairs()  # validates patterns and sparsities
        evaluation = self.evaluation
        langs = self.eval_languages
        _unique(langs, "evaluation.languages", "evaluation", "languages")
        source = evaluation.perplexity_source or self.calibration.source
        check_source(source, langs, "evaluation", _base(info), "evaluation", "perplexity_source")
        if evaluation.tasks:
            from prunekit.evaluation import plan_tasks

            for i, task in enumerate(evaluation.tasks):
                with _at("evaluation", "tasks", i):
                    plan_tasks([task], langs)
        if self.analysis is not None:
            sets = self.calibration.sets
            for i, pair in enumerate(self.analysis.pairs):
                for k, spec in enumerate(pair):
                    if spec not in sets:
                        raise invalid(f"'{spec}' is not one of calibration.sets{did_you_mean(spec, sets)} ({', '.join(sets)})",
                                       "analysis", "pairs", i, k)
            if not self.execution.keep_checkpoints:
                raise invalid("false deletes checkpoints that analysis.pairs needs; keep them or drop analysis",
                               "execution", "keep_checkpoints")
        return self

    @property
    def eval_languages(self) -> list[str]:
        return list(self.evaluation.languages) if self.evaluation.languages is not None else _study_order(self.calibration.languages)

    def pattern_pairs(self) -> list[tuple[float | None, str | None]]:
        """(sparsity, pattern) pairs for ``parse_pattern``: every sparsity for 'unstructured', then each N:M pattern."""
        from prunekit.recipe import parse_pattern

        has_unstructured = any(p.lower() == "unstructured" for p in self.patterns)
        if self.sparsities is not None and not has_unstructured:
            raise invalid("given, but 'patterns' has no 'unstructured' entry to apply them to; "
                           "add 'unstructured' to patterns or drop sparsities", "sparsities")
        sparsities = self.sparsities if self.sparsities is not None else [0.5]
        out: list[tuple[float | None, str | None]] = []
        for i, pattern in enumerate(self.patterns):
            if pattern.lower() == "unstructured":
                for j, s in enumerate(sparsities):
                    with _at("sparsities", j):
                        parse_pattern(s, None)
                    out.append((s, None))
            else:
                with _at("patterns", i):
                    parse_pattern(None, pattern)
                out.append((None, pattern))
        _unique(out, "patterns", "patterns")
        return out


def method_entry(name: str) -> "MethodEntry":
    from prunekit.methods import available_methods, get_method
    from prunekit.recipe import split_method_name

    prune_methods = available_methods("prune")
    with _at():
        base, quantization = split_method_name(name)
    if quantization is not None:
        if base not in available_methods("quantize"):
            raise invalid(f"'{name}' needs the '{base}' method, which this prunekit installation does not provide")
        return MethodEntry(name, base, "quantize", True, quantization)
    if name in prune_methods:
        return MethodEntry(name, name, "prune", get_method(name).needs_calibration)
    quantize_methods = available_methods("quantize")
    if name in quantize_methods:
        raise invalid(f"'{name}' needs bits and group size in its name, e.g. {name}-w4g128")
    choices = prune_methods + [f"{q}-w4g128" for q in quantize_methods]
    raise invalid(f"unknown method '{name}'{did_you_mean(name, choices)}; choose from {', '.join(prune_methods)} "
                   "or a quantization such as gptq-w4g128 (gptq-w{bits}g{group})")
