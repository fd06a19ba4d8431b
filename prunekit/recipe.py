"""What a run does: to each weight matrix (:class:`Recipe`: method, sparsity pattern or quantization, method
options), on which text (:class:`CalibrationSpec`: languages, source, size, seed, conventions), where it writes
(:class:`OutputSpec`) and how it computes (:class:`EngineSpec`)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prunekit.conventions import DEFAULT_CONVENTIONS, parse_conventions
from prunekit.errors import ConfigError
from prunekit.languages import parse_languages


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``sparsity``, or N:M (N of every M consecutive input columns pruned)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @property
    def slug(self) -> str:
        return f"{self.n}of{self.m}" if self.is_nm else f"{round(self.sparsity * 100):d}pct"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(sparsity: float | None, pattern: str | None = None) -> Pattern:
    """Validate ``--sparsity`` and ``--pattern`` together (``None`` sparsity means the default)."""
    if pattern is None or pattern.strip().lower() in ("", "unstructured"):
        value = 0.5 if sparsity is None else float(sparsity)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"--sparsity must be strictly between 0 and 1, got {value:g}")
        return Pattern(value)
    match = _NM.match(pattern)
    if not match:
        raise ConfigError(f"malformed --pattern '{pattern}': use 'unstructured' or N:M with integers 0 < N < M, e.g. 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"malformed --pattern '{pattern}': N:M needs 0 < N < M, e.g. 2:4 or 4:8")
    if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
        raise ConfigError(
            f"--pattern {n}:{m} means sparsity {n / m:g}, but --sparsity {float(sparsity):g} was given; "
            "drop --sparsity or make them agree"
        )
    return Pattern(n / m, n, m)


@dataclass(frozen=True)
class Quantization:
    """Weight quantization: ``bits`` per weight, one min-max grid per ``group_size`` input columns of a
    row (-1: one grid per row), symmetric (±max|w|, no zero point: W4A16 / W8A16 group 128 like
    llm-compressor's presets, the scheme plain transformers and vLLM load as they are) unless
    ``symmetric`` is False (the asymmetric min-max grid of the study's reference code, with packed zero
    points, that plain transformers cannot read with compressed-tensors 0.19-0.20). ``act_order`` processes columns by
    descending diag(H); with it, ``static_groups`` fixes the group grids on the weights before any
    update (groups stay contiguous in the original column order). Without ``act_order`` groups are
    always contiguous and fitted as GPTQ reaches them (``static_groups`` has no effect)."""

    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    static_groups: bool = True
    symmetric: bool = True

    @property
    def slug(self) -> str:
        """Canonical short name: ``w4g128``, ``w8`` (per-channel), ``w4g128-act``, ``w4g128-actdyn``, ``-asym``."""
        name = f"w{self.bits}" + (f"g{self.group_size}" if self.group_size != -1 else "")
        if self.act_order:
            name += "-act" if self.static_groups else "-actdyn"
        if not self.symmetric:
            name += "-asym"
        return name

    @property
    def scheme(self) -> str:
        """What the record and the card call the grid, and what loads it."""
        if self.symmetric:
            return (f"symmetric W{self.bits}A16 (llm-compressor's preset scheme): plain transformers with "
                    "compressed-tensors and vLLM load it as it is")
        return (f"asymmetric W{self.bits}A16 (the study's reference grid, packed zero points): vLLM and prunekit "
                "load it; plain transformers with compressed-tensors 0.19-0.20 cannot")


QUANTIZATION_BITS = (2, 3, 4, 8)
QUANTIZE_METHODS = ("gptq", "rtn")  # method names whose sweep names carry a quantization slug


def parse_quantization(
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    symmetric: bool | None = None,
    conventions: str = "prunekit",
) -> Quantization:
    """Validate ``--bits`` / ``--group-size`` (and friends) and build the Quantization. ``symmetric``
    None: the conventions' default (``default_symmetric``)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANTIZATION_BITS:
        raise ConfigError(f"--bits must be one of {', '.join(map(str, QUANTIZATION_BITS))} (the study uses 4 and 8), got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size > 0 or group_size == -1):
        raise ConfigError(
            f"--group-size must be a positive number of input columns (e.g. 128) or -1 for one grid per output row, got {group_size}"
        )
    if symmetric is None:
        symmetric = default_symmetric(conventions)
    return Quantization(int(bits), int(group_size), bool(act_order), bool(static_groups), bool(symmetric))


def default_symmetric(conventions: str = "prunekit") -> bool:
    """The grid when neither --symmetric nor --asymmetric is given: symmetric (what the ecosystem loads
    as it is), except under ``--conventions study``, which keeps the reference code's asymmetric grid."""
    return conventions != "study"


def validate_quantization(quantization: Quantization) -> Quantization:
    """Check a Quantization built by hand (the Python API) the same way as the CLI flags."""
    return parse_quantization(
        quantization.bits, quantization.group_size, quantization.act_order, quantization.static_groups, quantization.symmetric
    )


_QUANT_SLUG = re.compile(r"^w(\d+)(?:g(\d+))?((?:-(?:act|actdyn|sym|asym))*)$")


def quantization_from_name(name: str) -> Quantization | None:
    """The Quantization named by a sweep method name, or None for a pruning method.

    ``gptq-w4g128`` -> 4 bits, groups of 128; ``gptq-w8`` -> 8 bits, one grid per row;
    suffixes ``-act`` (act-order, static groups), ``-actdyn`` (act-order, groups refitted in
    activation order), ``-asym`` (the asymmetric grid; symmetric is the default, ``-sym`` is accepted
    and changes nothing). Plain ``gptq`` means the defaults (w4g128, symmetric).
    The method is the part before the first '-' (see ``split_method_name``).
    """
    method, _, slug = name.strip().partition("-")
    if method not in QUANTIZE_METHODS:
        return None
    if not slug:
        return Quantization()
    match = _QUANT_SLUG.match(slug)
    if not match:
        raise ConfigError(
            f"malformed quantization method name '{name}': use {method}-w<bits>[g<group>][-act][-asym], e.g. {method}-w4g128"
        )
    suffixes = set(filter(None, match.group(3).split("-")))
    if {"act", "actdyn"} <= suffixes:
        raise ConfigError(f"'{name}': use either -act (static groups) or -actdyn, not both")
    if {"sym", "asym"} <= suffixes:
        raise ConfigError(f"'{name}': use either -sym (the default) or -asym, not both")
    group = int(match.group(2)) if match.group(2) is not None else -1
    return parse_quantization(
        int(match.group(1)), group, act_order=bool(suffixes & {"act", "actdyn"}),
        static_groups="actdyn" not in suffixes, symmetric="asym" not in suffixes,
    )


def split_method_name(name: str) -> tuple[str, Quantization | None]:
    """``gptq-w4g128`` -> ("gptq", Quantization(4, 128)); ``wanda`` -> ("wanda", None)."""
    quantization = quantization_from_name(name)
    return (name.strip().partition("-")[0] if quantization is not None else name.strip()), quantization


@dataclass(frozen=True)
class Recipe:
    """Everything a method needs besides the weights and the statistics."""

    method: str
    pattern: Pattern | None = None
    quantization: Quantization | None = None
    dampening: float = 0.01
    blocksize: int = 128
    options: dict[str, Any] = field(default_factory=dict)
    conventions: str = "prunekit"  # "study": the reference's `<=` thresholds (prunekit.conventions)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["conventions"] == "prunekit":  # the default leaves run identities as they were
            del data["conventions"]
        if self.pattern is not None:
            data["pattern"]["name"] = self.pattern.name
        return data


DEFAULT_CALIBRATION = "en"  # the calibration language of a method that needs one when none is given


def check_calibration_size(nsamples: int | None, seqlen: int | None) -> None:
    """``--nsamples`` at least 1 and ``--seqlen`` at least 2 (None: sized to the text)."""
    if nsamples is not None and nsamples < 1:
        raise ConfigError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen is not None and seqlen < 2:
        raise ConfigError(f"--seqlen must be at least 2, got {seqlen}")


@dataclass(frozen=True)
class CalibrationSpec:
    """The calibration choice of a run, validated once, when it is made.

    Args:
        languages: a language code (``de``), an equal-share mix (``en+de``) or ``all``; None: the method's
            default (:data:`DEFAULT_CALIBRATION` for a method that calibrates, no text for one that does not).
        source: ``embedded``, ``mc4`` or a local PATH (``.txt`` / ``.jsonl`` / ``.parquet``, or a dir of them).
        nsamples / seqlen: sequences and tokens per sequence; None sizes them to the text
            (``prunekit.calibration.choose_size``).
        seed: the seed of the window sampling.
        conventions: ``prunekit`` or ``study`` (``prunekit.conventions``): how the windows are cut, and the
            run's thresholds.

    Raises:
        ConfigError: an unknown language or conventions, ``nsamples`` < 1 or ``seqlen`` < 2.

    Example: ``CalibrationSpec("en+de", nsamples=32, seqlen=256)``.
    """

    languages: str | None = None
    source: str = "embedded"
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    conventions: str = DEFAULT_CONVENTIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "conventions", parse_conventions(self.conventions))
        object.__setattr__(self, "source", str(self.source) if isinstance(self.source, Path) else self.source)
        if self.languages is not None:
            parse_languages(self.languages)
        check_calibration_size(self.nsamples, self.seqlen)

    @property
    def uses_text(self) -> bool:
        return self.languages is not None

    def for_method(self, method: str, needs_calibration: bool) -> CalibrationSpec:
        """This spec with the method's default filled in: English for a method that calibrates.

        Raises ConfigError when a method that uses no calibration text is given languages."""
        if not needs_calibration:
            if self.languages is not None:
                raise ConfigError(f"method '{method}' uses no calibration text: drop --calib {self.languages}")
            return self
        return self if self.languages is not None else replace(self, languages=DEFAULT_CALIBRATION)

    def sized(self, nsamples: int, seqlen: int) -> CalibrationSpec:
        """The spec with the size the calibration set was built with (what a run's identity records)."""
        return replace(self, nsamples=nsamples, seqlen=seqlen)

    def identity(self) -> dict[str, Any] | None:
        """What of the choice names a run (``run_identity``); None without calibration text."""
        if self.languages is None:
            return None
        return {"calib": self.languages, "source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}

    def command_arguments(self) -> list[str]:
        """The calibration flags of ``prunekit prune`` / ``quantize`` that make this choice (conventions aside)."""
        if self.languages is None:
            return []
        return ["--calib", self.languages, "--calib-source", self.source, "--nsamples", str(self.nsamples),
                "--seqlen", str(self.seqlen), "--seed", str(self.seed)]


# The names of a run's output settings, checked here without torch (``models.parse_dtype`` maps a name to
# its torch dtype, ``packing.check_format`` checks a format against a quantization).
AUTO_DTYPE = "auto"  # the checkpoint's own dtype (models.checkpoint_dtype)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
CHECKPOINT_FORMATS = ("packed", "dense")


def run_identity(
    model: str, revision: str | None, recipe: Recipe, calibration: CalibrationSpec | None, dtype: str, skip_layers: str | None,
) -> tuple[dict[str, Any], str]:
    """The canonical description of a run and its hash (what names a run in sweeps and on the Hub)."""
    identity = {
        "model": model,
        "revision": revision,
        "recipe": recipe.to_json(),
        "calibration": None if calibration is None else calibration.identity(),
        "dtype": dtype,
        "skip_layers": skip_layers or None,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return identity, digest


def check_dtype_name(name: str) -> str:
    """``--dtype``: ``auto`` or one of :data:`DTYPE_NAMES`."""
    if name != AUTO_DTYPE and name not in DTYPE_NAMES:
        raise ConfigError(f"unknown --dtype '{name}'; choose one of: {AUTO_DTYPE}, {', '.join(DTYPE_NAMES)}")
    return name


def check_format_name(checkpoint_format: str) -> str:
    """``--format``: one of :data:`CHECKPOINT_FORMATS`."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(CHECKPOINT_FORMATS)}, got '{checkpoint_format}'")
    return checkpoint_format


@dataclass(frozen=True)
class OutputSpec:
    """Where and how a run writes its checkpoint, validated once, when it is made.

    Args:
        out: the checkpoint directory (written atomically); None keeps the model in memory only.
        dtype: ``auto`` (the base checkpoint's own, kept in the output), ``bfloat16``, ``float16`` or
            ``float32``: the dtype of the model and of the saved weights.
        checkpoint_format: a quantized checkpoint's format, ``packed`` (compressed-tensors
            pack-quantized) or ``dense`` (fake-quantized weights); a pruned checkpoint is always dense.
        overwrite: replace a non-empty ``out``.
        stream: None streams the layers into ``out`` when it can (``prunekit.streaming``), True insists,
            False loads the whole model.
        resume: a streamed run continues where an interrupted run of the same command stopped (its
            staging ``.OUT.partial``, ``prunekit.staging``); False removes that staging and starts fresh.

    Raises:
        ConfigError: an unknown dtype or format.

    Example: ``OutputSpec("gemma-sw", dtype="bfloat16", overwrite=True)``.
    """

    out: Path | None = None
    dtype: str = AUTO_DTYPE
    checkpoint_format: str = "packed"
    overwrite: bool = False
    stream: bool | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        check_dtype_name(self.dtype)
        check_format_name(self.checkpoint_format)


@dataclass(frozen=True)
class EngineSpec:
    """How and where a run computes: settings that change its speed and memory, and which layers it leaves.

    Args:
        device: ``auto`` (``$PRUNEKIT_DEVICE``, else a visible GPU, else the CPU), ``cpu`` or ``cuda[:i]``:
            where each decoder layer is computed.
        skip_layers: layers left as they are (neither pruned nor quantized): ``first``, ``last`` and/or
            indices, comma-separated; None leaves none.
        batch_size: calibration sequences per forward; None: about 8192 tokens.
        solve_threads: SparseGPT on the CPU: 1 solves on one thread, 2 or more factorise the widest
            Hessians on a second thread; None: 2 on a multi-core CPU. The results are the same.
        trust_remote_code: allow model code from the Hub (off by default).

    The pipeline checks ``skip_layers`` against the model's layers and ``solve_threads`` before the
    model loads.

    Example: ``EngineSpec("cpu", skip_layers="last", solve_threads=1)``.
    """

    device: str = "auto"
    skip_layers: str | None = None
    batch_size: int | None = None
    solve_threads: int | None = None
    trust_remote_code: bool = False
