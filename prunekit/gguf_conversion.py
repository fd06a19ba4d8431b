"""GGUF -> safetensors conversion: a ``.gguf`` MODEL and the embedded model are de-quantized once by
transformers and saved as a plain model folder in the user cache (models.py and embedded/ both call
:func:`convert_gguf`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from prunekit.errors import ModelError
from prunekit.io import publish_directory


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file's metadata three times for one conversion (tokenizer, config,
    weights); for Gemma's 262k-token vocabulary each parse takes ~30 s of pure Python. Within this
    block every ``gguf.GGUFReader(path)`` of the same file returns the one reader already built (a
    read-only memory map, so sharing it is safe)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    class SharedReader(original):  # a subclass, so isinstance checks still hold
        def __new__(cls, path, mode="r"):
            key = (os.path.realpath(os.fspath(path)), mode)
            if key not in readers:
                reader = object.__new__(cls)
                original.__init__(reader, path, mode)
                readers[key] = reader
            return readers[key]

        def __init__(self, path, mode="r"):  # built once in __new__
            pass

    gguf.GGUFReader = SharedReader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


SOURCE_FILE = "prunekit-source.json"  # in a converted model dir: the GGUF file it came from and its quantization


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Load a GGUF file with transformers (de-quantizing it) and save it as a safetensors model dir.
    Once for all processes and hosts sharing the cache folder (``io.publish_directory``)."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelError("loading a GGUF file needs the 'gguf' package: pip install 'prunekit[demo]'") from err
    return publish_directory(target, lambda staging: _convert_gguf_into(gguf_path, staging), has_config)


def has_config(path: Path) -> bool:
    """Whether a model folder is complete (its config.json is written last, by the rename)."""
    return (path / "config.json").exists()


def _convert_gguf_into(gguf_path: Path, staging: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A model loaded from GGUF is flagged quantized; the weights are plain fp32 now, so clear the flag.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record_gguf_source(staging, gguf_path)


def record_gguf_source(model_dir: Path, gguf_path: Path) -> dict[str, str | None]:
    """Write (atomically) which GGUF file ``model_dir`` was converted from and its quantization; returns
    :func:`gguf_source`'s view of it."""
    from prunekit.io import write_text_atomic

    quantization = gguf_quantization(gguf_path)
    write_text_atomic(Path(model_dir) / SOURCE_FILE, json.dumps({"gguf": str(gguf_path), "quantization": quantization}) + "\n")
    return {"gguf_file": str(gguf_path), "gguf_quantization": quantization}


def gguf_quantization(gguf_path: str | Path) -> str | None:
    """The quantization of a GGUF file as llama.cpp names it (``Q4_K_M``), from its ``general.file_type``; None
    when the file does not say or cannot be read."""
    try:
        import gguf

        field = gguf.GGUFReader(str(gguf_path)).fields.get("general.file_type")
        if field is None:
            return None
        name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    except Exception:  # an unknown file type or an unreadable file: the card says nothing rather than guess
        return None
    return name.removeprefix("MOSTLY_")


def gguf_source(model_dir: str | Path) -> dict[str, str | None]:
    """What a converted model dir came from: ``gguf_file`` and its ``gguf_quantization`` (read from the GGUF file
    when the conversion, made by an older prunekit, did not record it; left out when that file is gone too, so the
    caller can find it again); empty for another dir."""
    try:
        data = json.loads((Path(model_dir) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    gguf_file = data.get("gguf") if isinstance(data, dict) else None
    if not isinstance(gguf_file, str):
        return {}
    if "quantization" in data:
        return {"gguf_file": gguf_file, "gguf_quantization": data["quantization"]}
    if Path(gguf_file).is_file():
        return {"gguf_file": gguf_file, "gguf_quantization": gguf_quantization(gguf_file)}
    return {"gguf_file": gguf_file}
