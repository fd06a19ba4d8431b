"""Languages, text sources and seeded calibration sets."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from prunekit import calibration
from prunekit.calibration import build_calibration_set, split_budget
from prunekit.errors import ConfigError, DataError
from prunekit.languages import get_language, parse_languages
from prunekit.textsources import load_texts
from tests.conftest import TATOEBA


def test_study_languages_carry_their_ids_and_any_mc4_code_works():
    sw = get_language("sw")
    assert (sw.name, sw.script, sw.mc4_config, sw.belebele) == ("Swahili", "Latn", "sw", "swh_Latn")
    assert get_language("zh").belebele == "zho_Hans"
    assert get_language("fr").mc4_config == "fr"
    assert [lang.code for lang in parse_languages("all")] == ["ar", "de", "en", "es", "ru", "sw", "zh"]
    assert [lang.code for lang in parse_languages("en+de")] == ["en", "de"]


def test_unknown_language_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_languages("en+xx")
    message = str(err.value)
    assert "unknown language code 'xx'" in message and "ar, de, en, es, ru, sw, zh" in message and " fr " in message


def test_mixture_budget_takes_equal_shares_with_deterministic_remainder():
    assert split_budget(128, ["en", "de"]) == {"en": 64, "de": 64}
    assert split_budget(5, ["en", "de"]) == {"en": 3, "de": 2}
    assert split_budget(10, ["ar", "de", "en", "es", "ru", "sw", "zh"]) == {"ar": 2, "de": 2, "en": 2, "es": 1, "ru": 1, "sw": 1, "zh": 1}


def test_mix_calibration_set_has_shares_and_provenance(tokenizer):
    calib = build_calibration_set(tokenizer, "en+de", str(TATOEBA), nsamples=5, seqlen=32, seed=0, use_cache=False)
    assert calib.input_ids.shape == (5, 32)
    assert calib.samples_per_language == {"en": 3, "de": 2}
    assert (calib.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert len(calib.document_ids) == 5 and all(calib.document_ids)
    assert calib.document_ids[0][0].startswith("en.txt:") and calib.document_ids[4][0].startswith("de.txt:")
    provenance = calib.provenance()
    assert provenance["languages"] == ["en", "de"] and provenance["num_tokens"] == 160


def test_short_swahili_sentences_are_concatenated_not_skipped(tokenizer):
    calib = build_calibration_set(tokenizer, "sw", str(TATOEBA), nsamples=8, seqlen=128, seed=0, use_cache=False)
    assert calib.input_ids.shape == (8, 128)
    assert all(len(ids) > 1 for ids in calib.document_ids)  # every window spans several sentences
    assert (calib.input_ids == tokenizer.eos_token_id).any()  # documents are joined with EOS


def test_same_seed_same_windows_other_seed_other_windows(tokenizer):
    a = build_calibration_set(tokenizer, "ru", str(TATOEBA), nsamples=4, seqlen=32, seed=1, use_cache=False)
    b = build_calibration_set(tokenizer, "ru", str(TATOEBA), nsamples=4, seqlen=32, seed=1, use_cache=False)
    c = build_calibration_set(tokenizer, "ru", str(TATOEBA), nsamples=4, seqlen=32, seed=2, use_cache=False)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_too_short_text_says_how_many_tokens_there_are_and_are_needed(tokenizer, tmp_path):
    (tmp_path / "de.txt").write_text("Ein kurzer Satz.\nNoch einer.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"calibration text too short: \d+ tokens available, 1270 needed \(10 samples × 127 tokens\)"):
        build_calibration_set(tokenizer, "de", str(tmp_path), nsamples=10, seqlen=128, seed=0)


def test_tokenized_sets_are_cached_by_content_hash(tokenizer, monkeypatch):
    first = build_calibration_set(tokenizer, "es", str(TATOEBA), nsamples=3, seqlen=32, seed=5)
    monkeypatch.setattr(calibration, "sample_windows", lambda *a, **k: pytest.fail("cache was not used"))
    second = build_calibration_set(tokenizer, "es", str(TATOEBA), nsamples=3, seqlen=32, seed=5)
    assert torch.equal(first.input_ids, second.input_ids)
    assert first.content_hash == second.content_hash


def test_local_jsonl_parquet_and_txt_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"Dokument Nummer {i} mit etwas Text."} for i in range(5)]
    (tmp_path / "de.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "es.parquet")
    (tmp_path / "en.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n", encoding="utf-8")
    assert [d.text for d in load_texts(str(tmp_path), "de").documents] == [r["text"] for r in rows]
    assert len(load_texts(str(tmp_path), "es").documents) == 5
    assert [d.text for d in load_texts(str(tmp_path), "en").documents] == ["First paragraph\nstill first.", "Second paragraph."]
    with pytest.raises(DataError, match="no text for language 'ru'"):
        load_texts(str(tmp_path), "ru")


def test_mc4_streams_the_multilingual_c4_layout(tmp_path, monkeypatch, tokenizer):
    """A local stand-in with allenai/c4's file layout exercises the real datasets streaming path."""
    folder = tmp_path / "multilingual"
    folder.mkdir()
    for name, count in (("c4-sw.tfrecord-00000-of-00002.json.gz", 400), ("c4-sw-validation.tfrecord-00000-of-00001.json.gz", 20)):
        with gzip.open(folder / name, "wt", encoding="utf-8") as handle:
            for i in range(count):
                handle.write(json.dumps({"text": f"Habari ya {name[:6]} nambari {i}. Leo ni siku njema sana.", "timestamp": "2020", "url": f"https://x/{name}/{i}"}) + "\n")
    monkeypatch.setenv("PRUNEKIT_MC4_ROOT", str(tmp_path))
    train = load_texts("mc4", "sw", "calibration", char_budget=1000)
    assert 15 <= len(train.documents) <= 30 and train.documents[0].id.startswith("https://x/c4-sw.tfrecord")
    validation = load_texts("mc4", "sw", "evaluation")
    assert len(validation.documents) == 20 and "validation" in validation.documents[0].id
    calib = build_calibration_set(tokenizer, "sw", "mc4", nsamples=4, seqlen=32, seed=0, use_cache=False)
    assert calib.input_ids.shape == (4, 32) and "c4-sw.tfrecord-00000-of-*" in calib.locations["sw"]


def test_embedded_texts_are_parallel_and_split():
    from prunekit.embedded import embedded_languages, embedded_passages, embedded_split

    assert embedded_languages() == ["ar", "de", "en", "es", "ru", "sw", "zh"]
    counts = {lang: len(embedded_passages(lang)) for lang in embedded_languages()}
    assert len(set(counts.values())) == 1
    calib, held_out = embedded_split("de", "calibration"), embedded_split("de", "evaluation")
    assert len(calib) + len(held_out) == counts["de"] and not set(calib) & set(held_out)
    assert sum(len(p) for p in embedded_passages("sw")) >= 8000 and sum(len(p) for p in embedded_passages("zh")) >= 3000
