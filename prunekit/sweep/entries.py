"""What the sweep schema normalizes to: one :class:`ModelEntry` per model and one :class:`MethodEntry` per
method (``prunekit.sweep.schema`` makes them from the validated YAML; grid, stages and report read them)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelEntry:
    spec: str  # Hub id, local path (absolute), .gguf file or embedded:NAME
    name: str  # display label in plans and reports
    dtype: str = "float32"
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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
