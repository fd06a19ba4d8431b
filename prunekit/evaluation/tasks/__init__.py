"""The study's downstream suite as named groups, plus prunekit's own task configs.

A GROUP expands over the evaluation languages into CELLS; a cell is one lm-eval task in one
language, or an ``n/a`` cell with a note when the benchmark has no data in that language
(Swahili ARC, Chinese HellaSwag, Swahili MKQA, ...): a missing cell is reported, never dropped.

=============  ==========================================================================
group          cells
=============  ==========================================================================
arc            en: arc_challenge + arc_easy; other languages: Okapi's arc_{lang}
hellaswag      en: hellaswag; others: Okapi's hellaswag_{lang} (there is no hellaswag_zh)
mmlu           en: the mmlu group (57 subjects); others: Okapi's m_mmlu_{lang}
belebele       belebele_{FLORES code}, e.g. belebele_deu_Latn
mkqa           prunekit's mkqa_{lang} (generate_until, official MKQA F1; ar de en es ru zh)
xcopa          prunekit's xcopa_local_{lang}, from local files (sw, zh)
mgsm           prunekit's mgsm_local_{lang}, from local files (de en es ru sw zh)
study          arc + hellaswag + mmlu + belebele + mkqa (the study's suite)
=============  ==========================================================================

Which Okapi languages exist is read from lm-eval's own task folders, so the table follows the
installed harness. The prunekit task YAMLs in this folder use ``"{task_data}"`` in their
``data_files``; :func:`prunekit.evaluation.harness.build_task_config` replaces it with the
absolute ``--task-data`` directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from prunekit.languages import MC4_CODES, STUDY_LANGUAGES, get_language

TASKS_DIR = Path(__file__).resolve().parent
SUITE = ("arc", "hellaswag", "mmlu", "belebele", "mkqa")
LOCAL_GROUPS = ("xcopa", "mgsm")
GROUPS = SUITE + LOCAL_GROUPS
ALIASES = {"study": SUITE, "suite": SUITE}

XCOPA_LANGUAGES = "et ht id it qu sw ta th tr vi zh".split()
MGSM_LANGUAGES = "bn de en es fr ja ru sw te th zh".split()
MKQA_LANGUAGES = "ar da de en es fi fr he hu it ja km ko ms nl no pl pt ru sv th tr vi zh".split()


@dataclass(frozen=True)
class TaskCell:
    """One cell of the results table: a task in one language, runnable or not."""

    name: str  # the lm-eval / prunekit task name (or a placeholder such as arc_sw for n/a cells)
    group: str
    language: str | None
    kind: str  # "lm-eval" (built-in task or group), "prunekit" (a YAML in this folder), "n/a"
    note: str | None = None

    @property
    def yaml(self) -> Path | None:
        return TASKS_DIR / f"{self.name}.yaml" if self.kind == "prunekit" else None


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:  # pragma: no cover - lm-eval is a dependency
        raise ImportError("lm-eval is not installed")
    return Path(spec.origin).parent / "tasks"


@dataclass(frozen=True)
class OkapiFamily:
    """A benchmark lm-eval has in English and, translated by Okapi, in some other languages."""

    folder: str  # lm-eval's tasks/okapi/<folder>
    prefix: str  # its tasks are <prefix><lang>
    english: tuple[str, ...]  # lm-eval's English task(s)
    missing: str  # the n/a note, with {language} and {languages} (those Okapi has)


OKAPI = {
    "arc": OkapiFamily("arc_multilingual", "arc_", ("arc_challenge", "arc_easy"),
                       "no ARC in {language}: lm-eval has English ARC and Okapi's translated ARC-Challenge only in {languages}"),
    "hellaswag": OkapiFamily("hellaswag_multilingual", "hellaswag_", ("hellaswag",),
                             "no HellaSwag in {language}: lm-eval has English HellaSwag and Okapi's translations only in {languages}"),
    "mmlu": OkapiFamily("mmlu_multilingual", "m_mmlu_", ("mmlu",),
                        "no MMLU in {language}: lm-eval has English MMLU and Okapi's m_mmlu only in {languages}"),
}


@lru_cache(maxsize=None)
def okapi_languages(kind: str) -> tuple[str, ...]:
    """Languages of an Okapi family in the installed lm-eval (kind: arc, hellaswag, mmlu)."""
    family = OKAPI[kind]
    files = (_lm_eval_tasks_dir() / "okapi" / family.folder).glob(f"{family.prefix}*.yaml")
    return tuple(sorted(f.stem[len(family.prefix):] for f in files))


def _name(code: str) -> str:
    lang = STUDY_LANGUAGES.get(code)
    return lang.name if lang else f"'{code}'"


def _missing(group: str, name: str, lang: str, why: str) -> TaskCell:
    return TaskCell(name, group, lang, "n/a", why)


def cells_for(group: str, lang: str) -> list[TaskCell]:
    """The cells of ``group`` in language ``lang`` (n/a cells included)."""
    if group in OKAPI:
        family = OKAPI[group]
        if lang == "en":
            return [TaskCell(name, group, lang, "lm-eval") for name in family.english]
        name = f"{family.prefix}{lang}"
        if lang in okapi_languages(group):
            return [TaskCell(name, group, lang, "lm-eval")]
        return [_missing(group, name, lang, family.missing.format(language=_name(lang),
                                                                  languages=", ".join(okapi_languages(group))))]
    if group == "belebele":
        code = get_language(lang).belebele
        if code:
            return [TaskCell(f"belebele_{code}", group, lang, "lm-eval")]
        return [_missing(group, f"belebele_{lang}", lang, f"prunekit knows no FLORES-200 code for '{lang}'; "
                         "run the lm-eval task by its name instead, e.g. --tasks belebele_fra_Latn")]
    if group == "mkqa":
        if (TASKS_DIR / f"mkqa_{lang}.yaml").exists():
            return [TaskCell(f"mkqa_{lang}", group, lang, "prunekit")]
        why = (f"MKQA has no {_name(lang)}" if lang not in MKQA_LANGUAGES
               else f"prunekit ships MKQA tasks for {', '.join(shipped('mkqa'))} only")
        return [_missing(group, f"mkqa_{lang}", lang, why)]
    if group in ("xcopa", "mgsm"):
        name = f"{group}_local_{lang}"
        if (TASKS_DIR / f"{name}.yaml").exists():
            return [TaskCell(name, group, lang, "prunekit")]
        known = XCOPA_LANGUAGES if group == "xcopa" else MGSM_LANGUAGES
        bench = group.upper()
        why = (f"{bench} has no {_name(lang)}" if lang not in known
               else f"prunekit ships local {bench} tasks for {', '.join(shipped(group))} only")
        return [_missing(group, name, lang, why)]
    raise KeyError(group)


def shipped(group: str) -> list[str]:
    prefix = "mkqa_" if group == "mkqa" else f"{group}_local_"
    return sorted(p.stem[len(prefix):] for p in TASKS_DIR.glob(f"{prefix}*.yaml"))


@lru_cache(maxsize=None)
def known_cells() -> dict[str, TaskCell]:
    """Every runnable cell name -> cell, over the study's languages and every mC4 code."""
    cells: dict[str, TaskCell] = {}
    for lang in list(STUDY_LANGUAGES) + [c for c in MC4_CODES if c not in STUDY_LANGUAGES]:
        for group in GROUPS:
            for cell in cells_for(group, lang):
                if cell.kind != "n/a":
                    cells.setdefault(cell.name, cell)
    return cells
