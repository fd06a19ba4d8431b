"""Functions the task YAMLs in this folder reference with ``!function utils.NAME``.

lm-evaluation-harness imports this file by path (it must sit beside the YAMLs), so it only
imports the standard library and ``datasets`` objects it is handed.

MKQA (Longpre et al. 2020, apple/ml-mkqa)
    The official answer normalisation and token F1, written from the description of
    ``mkqa_eval_util.py``: lowercase; drop ASCII punctuation (``string.punctuation``); replace the
    language's articles by a space (the official per-language regexes; for Arabic the official
    pattern removes every "ال"); split on whitespace, or into single characters for Chinese,
    Japanese, Thai and Khmer. F1 is token-overlap F1 (1 if both sides are empty, 0 if only one
    is); the score of a question is the best over every gold answer text and alias.
    The study's filter keeps answerable questions with short answers: a question is dropped when
    any of its answers (in the evaluation language) is typed ``unanswerable`` or ``long_answer``
    (10,000 - 1,427 - 1,815 = 6,758 questions).

MGSM (Shi et al. 2022)
    Exact match on the final number of the generation (thousands separators removed).

XCOPA (Ponti et al. 2020)
    Premise without its final punctuation + a language connector for cause / effect, then the
    two alternatives with a lower-cased first letter.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Any

# ---------------------------------------------------------------------------------------- MKQA

MKQA_LANGUAGES = (
    "ar da de en es fi fr he hu it ja km ko ms nl no pl pt ru sv th tr vi zh_cn zh_hk zh_tw".split()
)
# prunekit language code -> MKQA language key
MKQA_CODE = {code: code for code in MKQA_LANGUAGES} | {"zh": "zh_cn"}
MKQA_CHARACTER_LANGUAGES = {"zh_cn", "zh_hk", "zh_tw", "ja", "th", "km"}
MKQA_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "ar": r"ال",  # the official "\sال^|ال": its first branch can never match, the second removes every "ال"
    "nl": r"\b(de|het|een|des|der|den)\b",
    "sv": r"\b(en|ett)\b",
    "da": r"\b(en|et)\b",
    "no": r"\b(en|et|ei)\b",
    "fr": r"\b(le|la|l'|les|du|de|d'|des|un|une|des)",
    "pt": r"\b(o|a|os|as|um|uma|uns|umas)\b",
    "it": r"\b(il|lo|la|l'|i|gli|le|del|dello|della|dell'|dei|degli|degl'|delle|un'|uno|una|un)",
    "fi": r"\b(se|yks|yksi)\b",
    "hu": r"\b(a|az|egy)\b",
}
MKQA_DROPPED_TYPES = {"unanswerable", "long_answer"}
_ASCII_PUNCTUATION = set(string.punctuation)


def mkqa_tokens(text: str, lang: str) -> list[str]:
    """The official MKQA normalisation of ``text`` in MKQA language ``lang``, as tokens."""
    text = "".join(ch for ch in (text or "").lower() if ch not in _ASCII_PUNCTUATION)
    pattern = MKQA_ARTICLES.get(lang)
    if pattern:
        text = re.sub(pattern, " ", text)
    if lang in MKQA_CHARACTER_LANGUAGES:
        return [ch for ch in text if not ch.isspace()]
    return text.split()


def mkqa_normalize(text: str, lang: str) -> str:
    return " ".join(mkqa_tokens(text, lang))


def mkqa_f1_single(prediction: str, gold: str, lang: str) -> float:
    pred, ref = mkqa_tokens(prediction, lang), mkqa_tokens(gold, lang)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def mkqa_f1(prediction: str, golds: list[str], lang: str) -> float:
    """Best token F1 of ``prediction`` over all gold answers and aliases."""
    if not golds:
        raise ValueError("an MKQA question needs at least one gold answer")
    return max(mkqa_f1_single(prediction, gold, lang) for gold in golds)


def mkqa_exact_match(prediction: str, golds: list[str], lang: str) -> float:
    norm = mkqa_normalize(prediction, lang)
    return float(any(norm == mkqa_normalize(gold, lang) for gold in golds))


def mkqa_keep(example: dict[str, Any], lang: str) -> bool:
    """The study's filter: answerable, not a long answer, at least one gold text."""
    answers = (example.get("answers") or {}).get(lang) or []
    if not answers:
        return False
    if any(a.get("type") in MKQA_DROPPED_TYPES for a in answers):
        return False
    return any((a.get("text") or "") or a.get("aliases") for a in answers)


def mkqa_golds(example: dict[str, Any], lang: str) -> list[str]:
    golds: list[str] = []
    for answer in (example.get("answers") or {}).get(lang) or []:
        golds.append(answer.get("text") or "")
        golds.extend(answer.get("aliases") or [])
    return sorted(set(golds))


def _mkqa_docs(dataset, lang: str):
    def flatten(example):
        return {
            "question": (example.get("queries") or {}).get(lang) or example.get("query") or "",
            "golds": mkqa_golds(example, lang),
            "mkqa_lang": lang,
            "example_id": str(example.get("example_id")),
        }

    kept = dataset.filter(lambda ex: mkqa_keep(ex, lang))
    return kept.map(flatten, remove_columns=kept.column_names)


def _make_mkqa_docs(lang: str):
    def process_docs(dataset):
        return _mkqa_docs(dataset, lang)

    process_docs.__name__ = f"mkqa_docs_{lang}"
    return process_docs


for _lang in MKQA_LANGUAGES:
    globals()[f"mkqa_docs_{_lang}"] = _make_mkqa_docs(_lang)


def first_answer_line(generation: str) -> str:
    """The answer a generation gives: its first non-empty line, stripped."""
    for line in (generation or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def mkqa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    prediction = first_answer_line(results[0])
    lang = doc["mkqa_lang"]
    return {
        "f1": mkqa_f1(prediction, doc["golds"], lang),
        "exact_match": mkqa_exact_match(prediction, doc["golds"], lang),
    }


# ---------------------------------------------------------------------------------------- MGSM

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> Decimal | None:
    """A number written with optional thousands separators ("2,125", "-3.50"), or None."""
    try:
        return Decimal(str(text).strip().replace(",", ""))
    except (InvalidOperation, ValueError):
        return None


def final_number(text: str) -> Decimal | None:
    """The last number in ``text`` (thousands separators removed), or None when there is none."""
    found = _NUMBER.findall(text or "")
    return parse_number(found[-1].rstrip(",")) if found else None


def mgsm_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    predicted = final_number(results[0])
    gold = parse_number(doc["answer"])
    return {"exact_match": float(predicted is not None and gold is not None and predicted == gold)}


# --------------------------------------------------------------------------------------- XCOPA


def xcopa_choices(doc: dict[str, Any]) -> list[str]:
    return [c[:1].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]


def _xcopa_text(doc: dict[str, Any], cause: str, effect: str, joiner: str = " ") -> str:
    premise = doc["premise"].strip()
    if premise and not premise[-1].isalnum():
        premise = premise[:-1]  # drop the final full stop
    return premise + joiner + (cause if doc["question"] == "cause" else effect)


XCOPA_CONNECTORS = {"sw": ("kwa sababu", "kwa hiyo"), "zh": ("因为", "所以")}


def xcopa_text_sw(doc: dict[str, Any]) -> str:
    return _xcopa_text(doc, *XCOPA_CONNECTORS["sw"])


def xcopa_text_zh(doc: dict[str, Any]) -> str:
    return _xcopa_text(doc, *XCOPA_CONNECTORS["zh"], joiner="")
