"""Language registry: the study's seven languages plus every other mC4 language by code."""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    script: str
    mc4_config: str
    belebele: str | None = None
    okapi: str | None = None


STUDY_LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        Language("ar", "Arabic", "Arab", "ar", "arb_Arab", "ar"),
        Language("de", "German", "Latn", "de", "deu_Latn", "de"),
        Language("en", "English", "Latn", "en", "eng_Latn", None),
        Language("es", "Spanish", "Latn", "es", "spa_Latn", "es"),
        Language("ru", "Russian", "Cyrl", "ru", "rus_Cyrl", "ru"),
        Language("sw", "Swahili", "Latn", "sw", "swh_Latn", None),
        Language("zh", "Chinese", "Hans", "zh", "zho_Hans", "zh"),
    ]
}

# The 101 languages (plus romanized variants) of mC4 (Xue et al. 2021).
MC4_CODES = (
    "af am ar az be bg bg-Latn bn ca ceb co cs cy da de el el-Latn en eo es et eu fa fi fil fr fy "
    "ga gd gl gu ha haw hi hi-Latn hmn ht hu hy id ig is it iw ja ja-Latn jv ka kk km kn ko ku ky "
    "la lb lo lt lv mg mi mk ml mn mr ms mt my ne nl no ny pa pl ps pt ro ru ru-Latn sd si sk sl sm "
    "sn so sq sr st su sv sw ta te tg th tr uk ur uz vi xh yi yo zh zh-Latn zu"
).split()


def get_language(code: str) -> Language:
    """Look up a language by code; an unknown code fails with the list of valid ones."""
    code = code.strip()
    if code in STUDY_LANGUAGES:
        return STUDY_LANGUAGES[code]
    if code in MC4_CODES:
        return Language(code, code, "", code)
    raise ConfigError(
        f"unknown language code '{code}'{did_you_mean(code, MC4_CODES)}; valid codes are the study's "
        f"{', '.join(STUDY_LANGUAGES)} or any mC4 code: {' '.join(MC4_CODES)}"
    )


def parse_languages(spec: str) -> list[Language]:
    """Parse ``en``, ``en+de`` or ``all`` (the study's seven) into languages, in the given order."""
    spec = spec.strip()
    if spec == "all":
        return list(STUDY_LANGUAGES.values())
    parts = [p for p in spec.replace(",", "+").split("+") if p.strip()]
    if not parts:
        raise ConfigError("empty language list; give a code such as 'en', a mix such as 'en+de', or 'all'")
    langs = [get_language(p) for p in parts]
    codes = [lang.code for lang in langs]
    if len(set(codes)) != len(codes):
        raise ConfigError(f"language '{spec}' lists a language twice")
    return langs


def parse_language_list(spec: str) -> list[Language]:
    """Parse a comma-separated evaluation list such as ``ar,de,en`` (or ``all``)."""
    return parse_languages(spec)


def default_evaluation_languages(record: dict | None) -> tuple[list[str], str]:
    """The languages to evaluate when none are given: the study's seven plus any calibration
    language of the checkpoint's record (``prunekit.json``) outside them, and a line saying so."""
    study = list(STUDY_LANGUAGES)
    calib = [lang for lang in ((record or {}).get("calibration") or {}).get("languages") or [] if isinstance(lang, str)]
    extra = [lang for lang in calib if lang not in study]
    codes = study + extra
    if calib:
        why = f"its calibration language{'s' if len(calib) > 1 else ''} ({'+'.join(calib)}) plus the study's seven"
    else:
        why = "the study's seven (the checkpoint records no calibration language)"
    return codes, f"languages: {','.join(codes)}: {why}, as --langs was not given"
