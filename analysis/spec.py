"""What a comparison measures and how: :class:`CompareSpec`, validated once, when it is made.

``prunekit compare`` builds it from its options (``cli/compare_options.py``), a sweep from its ``analysis:``
section (``SweepConfig.compare``); :func:`prunekit.analysis.compare` takes it whole. Like
:class:`~prunekit.evaluation.spec.EvaluationSpec`: one frozen value, its settings as JSON, and a fingerprint of
what changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from prunekit.errors import ConfigError

ANALYSES = ("masks", "lsar", "lape", "drift")
RUN_ANALYSES = ("lsar", "lape", "drift")  # the analyses that run the models (the masks are read from disk)
SUBSPACES = ("per_model", "dense")
DEFAULT_MAX_LENGTH = 512  # tokens per passage at most
DEFAULT_CHUNK_ELEMENTS = 1 << 20  # mask rows are read in blocks of about 1M elements (4 MB in fp32)
# What changes no number of compare.json (left out of the fingerprint): where and how fast it is computed.
NOT_MEASURED = ("device", "batch_size", "chunk_elements", "trust_remote_code")


def _items(value: str | Sequence[str] | None) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return [str(item).strip() for item in items if str(item).strip()]


@dataclass(frozen=True)
class CompareSpec:
    """A comparison's choices, validated once, when the spec is made.

    Args:
        langs (`str` or `Sequence[str]`, *optional*): languages for LSAR / LAPE / drift, ``"de,en,sw"`` or ``"all"``;
            default (None): the study's seven.
        text_source (`str`, defaults to `"embedded"`): ``embedded``, ``mc4`` or a PATH; its evaluation split is used.
        only (`str` or `Sequence[str]`, *optional*): analyses among masks, lsar, lape, drift; default: all four.
        max_tokens (`int`, *optional*): content tokens per language at most; default: all of the text.
        max_length (`int`, defaults to 512): tokens per passage at most (longer ones are cut).
        lsar_rank (`int`, *optional*): rank r of the LSAR subspace, 1..K−1; default K−1.
        subspace (`str`, defaults to `"per_model"`): ``per_model`` (the study) or ``dense`` (the reference's for both).
        lape_thresholds (`str` or `dict`, *optional*): ``none`` (the study), ``tang`` or a dict of ``top_rate``,
            ``filter_rate``, ``activation_bar_ratio``.
        deactivate (`bool`, defaults to `False`): also switch off each language's specific neurons and measure the
            perplexity change (K extra passes per model).
        dtype (`str`, defaults to `"auto"`): each checkpoint's own dtype, or float32 / bfloat16 / float16.
        device (`str`, defaults to `"auto"`): auto, cpu or cuda[:i].
        batch_size (`int`, defaults to 1): passages per forward pass.
        chunk_elements (`int`, defaults to 2**20): elements per block when masks are read.
        trust_remote_code (`bool`, defaults to `False`): allow model code from the Hub.
        conventions (`str`, *optional*): ``study`` or ``prunekit``, what the checkpoints should have been pruned
            with (default: what their records say).

    Raises:
        ConfigError: a value out of range or an unknown name, naming the option.

    Example: ``CompareSpec(langs="de,en,sw", only="lsar,drift", max_tokens=2048)``.
    """

    langs: tuple[str, ...] | None = None
    text_source: str = "embedded"
    only: tuple[str, ...] | None = None
    max_tokens: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    lsar_rank: int | None = None
    subspace: str = "per_model"
    lape_thresholds: Any = None
    deactivate: bool = False
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    trust_remote_code: bool = False
    conventions: str | None = None

    def __post_init__(self) -> None:
        from prunekit.analysis.lape import normalize_thresholds
        from prunekit.languages import parse_languages

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (a frozen dataclass)
        langs = "all" if self.langs is None else (self.langs if isinstance(self.langs, str) else ",".join(self.langs))
        set_("langs", tuple(lang.code for lang in parse_languages(langs)))
        only = ANALYSES if self.only is None else _items(self.only)
        unknown = [a for a in only if a not in ANALYSES]
        if unknown or not only:
            raise ConfigError(f"unknown analysis '{','.join(unknown) or self.only}' in --only; choose from {','.join(ANALYSES)}")
        set_("only", tuple(a for a in ANALYSES if a in only))
        if self.subspace not in SUBSPACES:
            raise ConfigError(f"unknown --subspace '{self.subspace}'; use one of {', '.join(SUBSPACES)}")
        set_("lape_thresholds", normalize_thresholds(self.lape_thresholds))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("--max-tokens must be a positive number of tokens per language")
        for name in ("max_length", "batch_size", "chunk_elements"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        needs_langs = [x for x in self.only if x in ("lsar", "lape")]
        if needs_langs and len(self.langs) < 2:
            raise ConfigError(f"{' and '.join(needs_langs)} compare languages: pass two or more with --langs (e.g. de,en,sw)")
        if self.lsar_rank is not None and "lsar" in self.only and not 1 <= self.lsar_rank <= len(self.langs) - 1:
            raise ConfigError(f"--lsar-rank must be between 1 and K−1 = {len(self.langs) - 1}")

    @property
    def runs_models(self) -> bool:
        """Whether an analysis that runs the models is asked for (LSAR, LAPE or drift)."""
        return any(a in RUN_ANALYSES for a in self.only)

    def to_settings(self) -> dict[str, Any]:
        """Every choice as JSON (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        """A hash of the choices that change the numbers (not where or how fast they are computed)."""
        measured = {k: v for k, v in self.to_settings().items() if k not in NOT_MEASURED}
        return hashlib.sha256(json.dumps(measured, sort_keys=True, default=str).encode()).hexdigest()[:16]
