"""What a sweep process reuses between runs: tokenizers, tokenizer fingerprints, one GGUF parse."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from prunekit.gguf_conversion import _gguf_parsed_once
from prunekit.models import load_tokenizer, resolve_model, tokenizer_fingerprint
from tests.conftest import train_tokenizer


def test_the_same_tokenizer_files_give_the_same_object_and_changed_files_a_new_one(tiny_llama, tmp_path):
    copy = tmp_path / "llama"
    shutil.copytree(tiny_llama, copy)
    first = load_tokenizer(resolve_model(str(copy)))
    assert load_tokenizer(resolve_model(str(copy))) is first

    replacement = train_tokenizer(vocab_size=300)
    replacement.save_pretrained(copy)
    second = load_tokenizer(resolve_model(str(copy)))
    assert second is not first and len(second) == len(replacement) != len(first)


def test_fingerprint_is_remembered_but_follows_added_and_special_tokens():
    tok = train_tokenizer(vocab_size=400)
    original = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok) == original
    tok.add_tokens(["zzzz-prunekit"])
    grown = tokenizer_fingerprint(tok)
    assert grown != original
    twin = train_tokenizer(vocab_size=400)
    twin.add_tokens(["zzzz-prunekit"])
    assert tokenizer_fingerprint(twin) == grown  # a content hash, not an object id
    tok.pad_token = tok.eos_token
    assert tokenizer_fingerprint(tok) != grown


def test_a_gguf_file_is_parsed_once_per_conversion_and_the_reader_restored(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("prunekit.test", 7)
    writer.add_tensor("weight", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    original = gguf.GGUFReader
    with _gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        again = gguf.GGUFReader(path)
        assert again is first and isinstance(first, original)
        assert int(first.fields["prunekit.test"].parts[-1][0]) == 7
        assert np.array_equal(np.asarray(first.tensors[0].data), np.arange(8, dtype=np.float32))
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(str(path)) is not first
