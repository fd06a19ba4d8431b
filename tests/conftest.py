"""Shared fixtures: a small BPE tokenizer trained in-test and tiny random decoder-only models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run on the CPU unless written for the GPU (tests/test_gpu.py asks for "cuda" explicitly): every
# device="auto" (prune, evaluate, compare, the CLI, sweep workers) resolves to the CPU, so a GPU machine
# compares against the same CPU references (CPU and CUDA break near-ties differently).
os.environ["PRUNEKIT_DEVICE"] = "cpu"

# Real text the tests carry with them (sources and licences: tests/data/README.md); nothing outside
# the repository is read.
TEST_DATA = Path(__file__).resolve().parent / "data"
TATOEBA = TEST_DATA / "tatoeba"
STUDY_LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep calibration and dense caches of the tests out of the user's cache; the converted
    embedded model (a one-time ~1 min conversion) is shared with the user's cache."""
    user_models = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("prunekit-cache")
    (root / "models").symlink_to(user_models, target_is_directory=True)
    os.environ["PRUNEKIT_CACHE"] = str(root)
    yield


@pytest.fixture(scope="session")
def embedded_gemma() -> Path:
    """The real Gemma-3-270M as a safetensors model dir (converted once from the demo extra's GGUF)."""
    from prunekit.models import resolve_model

    return resolve_model("embedded:gemma-3-270m").path


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for lang in STUDY_LANGS:
        texts.extend((TATOEBA / f"{lang}.txt").read_text(encoding="utf-8").splitlines())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import CohereConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "cohere":
        return CohereConfig(**common)
    if arch == "gemma3":
        common.setdefault("layer_types", ["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2)
                          + ["sliding_attention"] * (common["num_hidden_layers"] % 2))
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    raise ValueError(arch)


def build_tiny_model(arch: str, tokenizer, out: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


ARCHS = ["llama", "gemma3", "cohere", "qwen2", "mistral"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, tokenizer, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two fighting
    other processes. Worker processes (subprocess, submitit jobs, the local pool) inherit it."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
