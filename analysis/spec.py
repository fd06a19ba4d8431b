"""What a comparison computes and how: :class:`CompareSpec`, validated once, when it is made.

``prunekit compare`` builds it from its options (``cli/compare_options.py``), a sweep's analysis stage from
its ``analysis:`` section and evaluation languages; :func:`prunekit.analysis.compare` takes it whole.
Modelled on :class:`prunekit.evaluation.EvaluationSpec`: one frozen value, its settings as JSON, and a
fingerprint of what changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ANALYSES = ("masks", "lsar", "lape", "drift")
RUN_ANALYSES = ("lsar", "lape", "drift")  # the analyses that run the models over text (the masks are read from disk)
SUBSPACES = ("per_model", "dense")
DEFAULT_MAX_LENGTH = 512  # tokens per document at most
DEFAULT_CHUNK_ELEMENTS = 1 << 20  # mask rows are read in blocks of about 1M elements (4 MB in fp32)
# What changes no number of compare.json (left out of the fingerprint): where and how fast it is computed.
NOT_MEASURED = ("device", "batch_size", "chunk_elements", "trust_remote_code")  # batches are right-padded: same numbers


def _error(option: str, reason: str, message: str | None = None) -> Exception:
    """The ``OptionError`` of ``option`` (evaluation's, imported when a value is refused: the spec stays light)."""
    from prunekit.evaluation.spec import OptionError

    return OptionError(option, reason, message)


def _items(value: str | Sequence[str] | None) -> list[str]:
    return [str(p).strip() for p in (value.split(",") if isinstance(value, str) else value or ()) if p and str(p).strip()]


def _only(only: str | Sequence[str] | None) -> tuple[str, ...]:
    if only is None:
        return ANALYSES
    items = _items(only)
    unknown = [p for p in items if p not in ANALYSES]
    if unknown or not items:
        shown = ",".join(unknown) or (only if isinstance(only, str) else ",".join(only))
        from prunekit.errors import did_you_mean

        hint = did_you_mean(unknown[0], ANALYSES) if len(unknown) == 1 else ""
        raise _error("only", f"'{shown}' is not an analysis; choose from {','.join(ANALYSES)}{hint}",
                          f"unknown analysis '{shown}' in --only; choose from {','.join(ANALYSES)}{hint}")
    return tuple(a for a in ANALYSES if a in items)


def _named(option: str, check: Callable[[], Any]) -> Any:
    """``check()``, its error as the OptionError of ``option`` (same message)."""
    from prunekit.errors import PrunekitError

    try:
        return check()
    except PrunekitError as err:
        from prunekit.evaluation.spec import OptionError

        if isinstance(err, OptionError):
            raise
        raise OptionError(option, str(err), str(err)) from err


def _langs(langs: str | Sequence[str] | None) -> tuple[str, ...]:
    """The languages' codes; None: the study's seven (the library's default, ``all``)."""
    from prunekit.languages import parse_languages

    text = "all" if langs is None else (langs if isinstance(langs, str) else ",".join(langs))
    return tuple(lang.code for lang in _named("langs", lambda: parse_languages(text)))


@dataclass(frozen=True)
class CompareSpec:
    """A comparison's choices, validated once, when the spec is made.

    Args:
        only: the analyses to run, among ``masks``, ``lsar``, ``lape``, ``drift`` (``"masks,drift"`` or a list);
            None: all four. Kept as a tuple in that order.
        langs: evaluation languages of LSAR / LAPE / drift (``("de", "sw")``, ``"de,sw"`` or ``"all"``); None: the
            study's seven. Kept as a tuple of codes.
        text_source: ``embedded``, ``mc4`` or a PATH (a dir with ``{lang}.txt/.jsonl/.parquet``); its evaluation split.
        max_tokens: at most N content tokens per language (None: all the text).
        max_length: tokens per document at most (longer ones are cut).
        lsar_rank: rank r of the LSAR subspace, 1..K−1 (None: K−1).
        subspace: ``per_model`` (the study) or ``dense`` (the reference's subspace for every model).
        lape_thresholds: ``none`` (the study), ``tang`` or a dict of ``top_rate``, ``filter_rate``,
            ``activation_bar_ratio``; kept as that dict.
        deactivate: also switch each language's specific neurons off and measure the perplexity change.
        dtype: ``auto`` (each checkpoint's own), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        batch_size: documents per forward pass (right-padded).
        chunk_elements: weights read at a time per tensor by the mask analysis (memory, not results).
        trust_remote_code: allow model code from the Hub.
        conventions: ``prunekit`` or ``study``, the conventions the checkpoints should have been pruned with;
            None: what their records say.

    Raises:
        OptionError: a value out of range or unknown, naming its field (a ``ConfigError``).
        ConfigError: an unknown language code.

    Example: ``CompareSpec(langs="de,en,sw", only="masks,drift", max_tokens=2048)``.
    """

    only: tuple[str, ...] | None = None
    langs: tuple[str, ...] | None = None
    text_source: str = "embedded"
    max_tokens: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    lsar_rank: int | None = None
    subspace: str = "per_model"
    lape_thresholds: str | dict[str, float | None] | None = None
    deactivate: bool = False
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    trust_remote_code: bool = False
    conventions: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "only", _only(self.only))
        set_(self, "langs", _langs(self.langs))
        set_(self, "text_source", str(self.text_source))
        set_(self, "lape_thresholds", self._thresholds())
        set_(self, "deactivate", bool(self.deactivate))
        set_(self, "trust_remote_code", bool(self.trust_remote_code))
        if self.conventions is not None:
            from prunekit.conventions import parse_conventions

            set_(self, "conventions", _named("conventions", lambda: parse_conventions(self.conventions)))
        self._check_sizes()
        self._check_languages()
        self._check_model_settings()

    def _thresholds(self) -> dict[str, float | None]:
        from prunekit.analysis.lape import normalize_thresholds

        return _named("lape_thresholds", lambda: normalize_thresholds(self.lape_thresholds))

    def _check_sizes(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _error("max_tokens", "must be a positive number of tokens per language")
        if self.max_length < 1:
            raise _error("max_length", f"must be at least 1 token, got {self.max_length}")
        if self.batch_size < 1:
            raise _error("batch_size", "must be at least 1")
        if self.chunk_elements < 1:
            raise _error("chunk_elements", f"must be at least 1, got {self.chunk_elements}")

    def _check_languages(self) -> None:
        if self.subspace not in SUBSPACES:
            raise _error("subspace", f"must be one of {', '.join(SUBSPACES)}, got '{self.subspace}'",
                         f"unknown --subspace '{self.subspace}'; use one of {', '.join(SUBSPACES)}")
        needs = [x for x in self.only if x in ("lsar", "lape")]
        if needs and len(self.langs) < 2:
            raise _error("langs", f"needs two or more languages for {' and '.join(needs)} (e.g. de,en,sw)",
                         f"{' and '.join(needs)} compare languages: pass two or more with --langs (e.g. de,en,sw)")
        if self.lsar_rank is not None and "lsar" in self.only and not 1 <= self.lsar_rank <= len(self.langs) - 1:
            raise _error("lsar_rank", f"must be between 1 and K−1 = {len(self.langs) - 1}")

    def _check_model_settings(self) -> None:
        """dtype, device and (when a model runs) a local text source, before any model loads."""
        from prunekit.evaluation.hidden_states import torch_dtype

        _named("dtype", lambda: torch_dtype(self.dtype))
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise _error("device", f"'{self.device}' is not a device: use auto, cpu or cuda[:i]",
                             f"unknown --device '{self.device}': use auto, cpu or cuda[:i]") from err
        if self.runs_models and self.text_source not in ("embedded", "mc4"):
            from prunekit.textsources import local_file_for

            path = Path(self.text_source).expanduser()
            if not path.exists():
                raise _error("text_source", "is neither 'mc4', 'embedded' nor an existing file or directory",
                             f"text source '{self.text_source}' is neither 'mc4', 'embedded' nor an existing file or directory")
            for lang in self.langs:
                _named("text_source", lambda: local_file_for(path, lang, "evaluation"))

    @property
    def runs_models(self) -> bool:
        """Whether an analysis that runs the models over text (LSAR, LAPE, drift) is among ``only``."""
        return any(x in RUN_ANALYSES for x in self.only)

    def to_settings(self) -> dict[str, Any]:
        """Every choice as JSON (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        """A hash of the choices that change the numbers (not where or how fast they are computed)."""
        measured = {k: v for k, v in self.to_settings().items() if k not in NOT_MEASURED}
        return hashlib.sha256(json.dumps(measured, sort_keys=True, default=str).encode()).hexdigest()[:16]
