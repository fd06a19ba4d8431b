"""What to do to each weight matrix: method, sparsity pattern and method options."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from prunekit.errors import ConfigError


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
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    static_groups: bool = True
    symmetric: bool = False


@dataclass(frozen=True)
class Recipe:
    """Everything a method needs besides the weights and the statistics."""

    method: str
    pattern: Pattern | None = None
    quantization: Quantization | None = None
    dampening: float = 0.01
    blocksize: int = 128
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.pattern is not None:
            data["pattern"]["name"] = self.pattern.name
        return data
