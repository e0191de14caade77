"""Language filter for self-generated calibration prefixes (LLM-QAT keeps only prefixes in the target language).

The filter is off by default (``PruningConfig.self_gen_language=None``): its detector, ``langdetect`` (a port of
Google's language-detection library, maintained on PyPI), is not a dependency of the base install; install it with
``pip install hf-recon-prune[selfgen]`` (or ``pip install langdetect``) and set ``self_gen_language="en"`` to filter
as the paper (LLM-QAT) does. langdetect samples n-grams at random, so every detector here is created from a private
factory with a fixed seed: the same text always gets the same verdict, and the library's global factory (which other
code may use) is left untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

LanguageFilter = Callable[[str], bool]

#: Seed of the private langdetect factory; any fixed value gives reproducible verdicts.
DETECTOR_SEED = 0


@functools.lru_cache(maxsize=1)
def _factory() -> Any:
    try:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
    except ImportError as err:
        raise ImportError(
            "the language filter of self-generated calibration data needs langdetect: pip install langdetect "
            "(or hf-recon-prune[selfgen]); or keep every prefix with language=None (self_gen_language=None, the "
            "default), or pass a language_filter callable."
        ) from err
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(DETECTOR_SEED)
    return factory


def supported_languages() -> list[str]:
    """The language codes langdetect knows (ISO 639-1, plus e.g. ``"zh-cn"``)."""
    return sorted(_factory().get_lang_list())


def detect_language(text: str) -> Optional[str]:
    """The most probable language code of ``text``, or None when the text has no letters to judge by."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:  # no features: empty, digits or punctuation only
        return None


def make_language_filter(language: str) -> LanguageFilter:
    """A predicate that is True when langdetect's most probable language for a text is ``language``."""
    languages = supported_languages()
    if language not in languages:
        raise ValueError(f"language={language!r} is not supported by langdetect; allowed: None (no filter) or one of {languages}.")

    def keep(text: str) -> bool:
        return detect_language(text) == language

    keep.__qualname__ = f"langdetect[{language}]"
    return keep


def resolve_language_filter(language: Optional[str], language_filter: Optional[LanguageFilter]) -> Optional[LanguageFilter]:
    """The filter to apply: an explicit callable wins, then langdetect for ``language``, else None (keep all)."""
    if language_filter is not None:
        if not callable(language_filter):
            raise TypeError(f"language_filter={language_filter!r} is not callable; expected a function str -> bool.")
        return language_filter
    if language is None:
        return None
    return make_language_filter(language)


def filter_name(language: Optional[str], language_filter: Optional[LanguageFilter]) -> Optional[str]:
    """A stable name of the filter for cache keys and descriptions (a custom callable's code is not hashed)."""
    if language_filter is not None:
        module = getattr(language_filter, "__module__", None) or type(language_filter).__module__
        name = getattr(language_filter, "__qualname__", None) or type(language_filter).__qualname__
        return f"custom:{module}.{name}"
    return None if language is None else f"langdetect:{language}:seed{DETECTOR_SEED}"
