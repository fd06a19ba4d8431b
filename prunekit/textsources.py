"""Text sources for calibration and evaluation: mC4 (datasets streaming), local files, embedded texts.

A SOURCE is ``mc4``, ``embedded`` or a PATH: a ``.txt`` / ``.jsonl`` / ``.parquet`` file, or a
directory holding one such file per language code (``de.txt``, ``sw.jsonl``, ...). In a directory,
``{lang}.{split}.{ext}`` (split = calibration / evaluation) is preferred over ``{lang}.{ext}``.
A ``.txt`` file holds documents separated by blank lines, or one document per line when it has
no blank lines. ``.jsonl`` and ``.parquet`` need a ``text`` field.
"""

from __future__ import annotations

import contextlib
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


def usable(text: str) -> str:
    """``text`` stripped, or '' when it holds no letter or digit in any script (only NUL bytes,
    control characters, punctuation or whitespace): such a document has nothing to calibrate or score."""
    text = text.strip()
    return text if any(ch.isalnum() for ch in text) else ""


def _take(records, lang: str, location: str, char_budget: int | None) -> list[Document]:
    docs: list[Document] = []
    total = 0
    for index, record in enumerate(records):
        text = usable(record.get("text") or "")
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


def _decode(file: Path) -> str:
    """A local text file as UTF-8, or a user error naming the file and the first byte that is not."""
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read text source {file}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{file} is not UTF-8 text: byte {err.start} (0x{raw[err.start]:02x}) cannot be decoded; "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or give another text source"
        ) from None


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.utils.enable_progress_bars()


def _read_local(file: Path) -> list[Document]:
    if file.suffix == ".txt":
        text = _decode(file)
        blocks = [b.strip() for b in text.split("\n\n")] if "\n\n" in text.strip() else text.splitlines()
        docs = [Document(f"{file.name}:{i}", usable(b)) for i, b in enumerate(blocks)]
        docs = [d for d in docs if d.text]
        if not docs:
            raise DataError(
                f"{file} holds no usable text (no letter or digit: empty, or only NUL bytes, control characters "
                "or punctuation); give a file of plain UTF-8 text"
            )
        return docs
    if file.suffix in (".jsonl", ".parquet"):
        from datasets import load_dataset

        kind = "json" if file.suffix == ".jsonl" else "parquet"
        if kind == "json":
            _decode(file)  # a file that is not UTF-8 fails here, with the byte offset
        try:
            with _quiet_datasets():  # its own log line and bar would precede prunekit's one-line error
                data = load_dataset(kind, data_files=str(file), split="train")
        except Exception as err:  # noqa: BLE001 - datasets wraps every parse failure in its own errors
            cause = err.__cause__ or err
            raise DataError(
                f"cannot read {file} as {'JSON lines' if kind == 'json' else 'Parquet'} "
                f"({type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}); "
                "fix the file or give another text source"
            ) from None
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
        raise DataError(
            f"text source '{source}' ({location}) has no usable text for language '{lang}' ({split} split); "
            "give a source with plain text in that language"
        )
    return TextSet(lang, source, location, split, docs)
