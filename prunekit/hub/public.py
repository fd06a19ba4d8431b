"""What a push publishes carries no local absolute path. The record, the results, the card and every other small
JSON file are sanitised in the staged copy (the files on disk are never changed): a local absolute path becomes its
last component, so ``/home/me/runs/abc/checkpoint`` reads ``checkpoint`` and ``/root/.cache/prunekit/dense/x.safetensors``
reads ``x.safetensors``. Hub ids, URLs, keywords (``embedded``, ``mc4``) and relative paths stay as they are."""

from __future__ import annotations

import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from prunekit.artifacts import RECORD_FILE, RESULTS_FILE

# The documents prunekit writes: every absolute path in them is local (they hold no vocabulary).
OWN_FILES = {RECORD_FILE, RESULTS_FILE}
# Files that are never parsed: a vocabulary may hold tokens such as '/usr' that only look like paths.
NEVER_PARSED = ("tokenizer.json", ".index.json")
_ABSOLUTE = re.compile(r"^(?:~|[A-Za-z]:[\\/]|/)")
# An absolute path inside text: '/' or '~/' not preceded by what makes it part of a URL, a word or a tag.
_PATH_IN_TEXT = re.compile(r"(?<![\w:/.<~\-])~?/[^\s/`'\"|)<>\]]+(?:/[^\s/`'\"|)<>\]]*)+")
_PATH_CHARS = r"[^\s`'\"|)<>\],;]*"


def _name(path: str) -> str:
    name = re.split(r"[\\/]", path.rstrip("/\\"))[-1]
    return name or "local"


def local_roots() -> tuple[str, ...]:
    """The folders whose paths are this machine's: the checkout, the working directory, home, prunekit's and the
    Hugging Face caches, the temp folder (as given and resolved; longest first; never '/')."""
    from huggingface_hub import constants

    package = Path(__file__).resolve().parents[2]
    candidates = [package, Path.cwd(), Path.home(), Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")),
                  Path(constants.HF_HOME), Path(constants.HF_HUB_CACHE), Path(tempfile.gettempdir())]
    return _roots(tuple(str(p) for p in candidates))


@lru_cache(maxsize=8)
def _roots(candidates: tuple[str, ...]) -> tuple[str, ...]:
    roots = set()
    for candidate in candidates:
        for path in (Path(candidate).expanduser(), Path(candidate).expanduser().resolve()):
            text = str(path).rstrip("/\\")
            if len(Path(text).parts) > 1:
                roots.add(text)
    return tuple(sorted(roots, key=len, reverse=True))


def _under_roots(roots: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(root) for root in roots)
    return re.compile(rf"(?<![\w.:/\-])(?:{alternatives})(?![^\s/\\`'\"|)<>\],;]){_PATH_CHARS}")


def public_text(text: str, *, any_absolute: bool = True) -> str:
    """``text`` with every local absolute path replaced by its last component.

    Args:
        text: a card, a command line, one JSON string.
        any_absolute: also replace an absolute path outside the known local folders (:func:`local_roots`); False
            for text that may hold path-like words of its own (a tokenizer's settings).
    """
    text = _under_roots(local_roots()).sub(lambda m: _name(m.group(0)), text)
    if any_absolute:
        text = _PATH_IN_TEXT.sub(lambda m: _name(m.group(0)), text)
    return text


def public_value(value: Any, *, any_absolute: bool = True) -> Any:
    """A JSON value with its local absolute paths replaced (dicts and lists element by element): a whole-string
    absolute path by its last component, a path inside a longer string (a command) likewise."""
    if isinstance(value, dict):
        return {k: public_value(v, any_absolute=any_absolute) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v, any_absolute=any_absolute) for v in value]
    if isinstance(value, str):
        if any_absolute and _ABSOLUTE.match(value) and value.strip("/\\~"):
            return _name(value)
        return public_text(value, any_absolute=any_absolute)
    return value


def public_json(name: str, data: bytes) -> bytes:
    """The published bytes of a JSON file named ``name``: the same bytes when it holds no local path (or is not a
    file that is read), else the document with its paths replaced, written as prunekit writes JSON.

    Args:
        name: the file's path in the repo (its last component decides how strictly it is read).
        data: the file's bytes.
    """
    base = name.rsplit("/", 1)[-1]
    if not base.endswith(".json") or any(base.endswith(skip) for skip in NEVER_PARSED):
        return data
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data
    public = public_value(document, any_absolute=base in OWN_FILES)
    if public == document:
        return data
    return (json.dumps(public, indent=2, ensure_ascii=False, allow_nan=True) + "\n").encode()
