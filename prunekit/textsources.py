"""Text sources for calibration and evaluation: mC4 (datasets streaming), local files, embedded texts.

A SOURCE is ``mc4``, ``embedded`` or a PATH: a ``.txt`` / ``.jsonl`` / ``.parquet`` file, or a
directory holding one such file per language code (``de.txt``, ``sw.jsonl``, ...). In a directory,
``{lang}.{split}.{ext}`` (split = calibration / evaluation) is preferred over ``{lang}.{ext}``.
A ``.txt`` file holds documents separated by blank lines, or one document per line when it has
no blank lines. ``.jsonl`` and ``.parquet`` need a ``text`` field.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from prunekit.errors import ConfigError, DataError
from prunekit.languages import get_language

SPLITS = ("calibration", "evaluation")
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
MC4_DEFAULT_ROOT = "hf://datasets/allenai/c4"


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class TextSet:
    lang: str
    source: str  # what the user gave
    location: str  # the concrete files or dataset read
    split: str
    documents: list[Document]

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(doc.id.encode())
            digest.update(b"\0")
            digest.update(doc.text.encode())
            digest.update(b"\1")
        return digest.hexdigest()

    @property
    def num_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; use one of {SPLITS}")


def mc4_data_files(lang: str, split: str, root: str | None = None) -> str:
    """The mC4 file pattern of the first shard of a language (the layout of allenai/c4 ``multilingual/``)."""
    root = (root or os.environ.get("PRUNEKIT_MC4_ROOT") or MC4_DEFAULT_ROOT).rstrip("/")
    config = get_language(lang).mc4_config
    name = f"c4-{config}" if split == "calibration" else f"c4-{config}-validation"
    return f"{root}/multilingual/{name}.tfrecord-00000-of-*.json.gz"


def _take(records, lang: str, location: str, char_budget: int | None) -> list[Document]:
    docs: list[Document] = []
    total = 0
    for index, record in enumerate(records):
        text = (record.get("text") or "").strip()
        if not text:
            continue
        docs.append(Document(str(record.get("url") or f"{location}#{index}"), text))
        total += len(text)
        if char_budget is not None and total >= char_budget:
            break
    return docs


def _load_mc4(lang: str, split: str, char_budget: int | None) -> tuple[str, list[Document]]:
    from datasets import load_dataset

    pattern = mc4_data_files(lang, split)
    try:
        stream = load_dataset("json", data_files={"train": pattern}, split="train", streaming=True)
        docs = _take(stream, lang, pattern, char_budget)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        raise DataError(
            f"could not read mC4 '{lang}' ({split}) from {pattern}: {type(err).__name__}: {err}. "
            "Without network access, use --calib-source embedded or a local PATH "
            "(or point PRUNEKIT_MC4_ROOT at a local copy of allenai/c4)"
        ) from err
    return pattern, docs


def local_file_for(path: Path, lang: str, split: str) -> Path:
    if path.is_file():
        return path
    for stem in (f"{lang}.{split}", lang):
        for ext in LOCAL_EXTENSIONS:
            candidate = path / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    found = sorted(p.name for p in path.iterdir() if p.suffix in LOCAL_EXTENSIONS)
    raise DataError(
        f"no text for language '{lang}' in {path}: expected {lang}.txt, {lang}.jsonl or {lang}.parquet "
        f"(found: {', '.join(found) or 'nothing'})"
    )


def _read_local(file: Path) -> list[Document]:
    if file.suffix == ".txt":
        text = file.read_text(encoding="utf-8")
        blocks = [b.strip() for b in text.split("\n\n")] if "\n\n" in text.strip() else text.splitlines()
        return [Document(f"{file.name}:{i}", b.strip()) for i, b in enumerate(blocks) if b.strip()]
    if file.suffix in (".jsonl", ".parquet"):
        from datasets import load_dataset

        kind = "json" if file.suffix == ".jsonl" else "parquet"
        data = load_dataset(kind, data_files=str(file), split="train")
        if "text" not in data.column_names:
            raise DataError(f"{file} has no 'text' field (fields: {', '.join(data.column_names)})")
        return _take(data, "", file.name, None)
    raise DataError(f"unsupported text file {file}: use .txt, .jsonl or .parquet")


def load_texts(source: str, lang: str, split: str = "calibration", char_budget: int | None = None) -> TextSet:
    """Documents of one language from a source."""
    _check_split(split)
    get_language(lang)
    if source == "embedded":
        from prunekit.embedded import embedded_split

        passages = embedded_split(lang, split)
        docs = [Document(f"embedded:{lang}:{split}:{i}", p) for i, p in enumerate(passages)]
        location = f"prunekit/embedded/texts/{lang}.txt ({split})"
    elif source == "mc4":
        location, docs = _load_mc4(lang, split, char_budget)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"text source '{source}' is neither 'mc4', 'embedded' nor an existing file or directory")
        file = local_file_for(path, lang, split)
        docs = _read_local(file)
        location = str(file)
    if not docs:
        raise DataError(f"text source '{source}' has no text for language '{lang}' ({split} split)")
    return TextSet(lang, source, location, split, docs)
