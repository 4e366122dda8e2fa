"""Text normalisation and the quality rules (`config.curation.QualityRules`)."""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What exact duplicates are compared on: NFKC (full-width -> ASCII), lower case, runs of whitespace as one."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


_NOT_WORD = re.compile(r"[\W_]+")  # spaces, punctuation and symbols (Unicode-aware)


def content(text: str) -> str:
    """What shingles and decontamination n-grams are cut from: the normalised text without spaces,
    punctuation and symbols, so formatting and punctuation changes neither hide nor create a match."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).lower())


def _is_text(ch: str) -> bool:
    return ch.isalpha()  # Han characters, kana, hangul and letters are all Unicode letters


def quality_reason(text: str, rules) -> str | None:
    """The first rule `text` breaks (its config field name), or None."""
    n = len(text)
    if rules.min_chars is not None and n < rules.min_chars:
        return "min_chars"
    if rules.max_chars is not None and n > rules.max_chars:
        return "max_chars"
    chars = [ch for ch in text if not ch.isspace()]
    m = max(len(chars), 1)
    if rules.max_symbol_ratio is not None and sum(unicodedata.category(c)[0] == "S" for c in chars) / m > rules.max_symbol_ratio:
        return "max_symbol_ratio"
    if rules.max_digit_ratio is not None and sum(c.isdigit() for c in chars) / m > rules.max_digit_ratio:
        return "max_digit_ratio"
    if rules.min_text_ratio is not None and sum(map(_is_text, chars)) / m < rules.min_text_ratio:
        return "min_text_ratio"
    if rules.max_duplicate_line_fraction is not None:
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        if len(lines) > 1 and (len(lines) - len(set(lines))) / len(lines) > rules.max_duplicate_line_fraction:
            return "max_duplicate_line_fraction"
    if rules.max_duplicate_ngram_fraction is not None and duplicate_ngram_fraction(
            "".join(chars), rules.duplicate_ngram) > rules.max_duplicate_ngram_fraction:
        return "max_duplicate_ngram_fraction"
    return None


def duplicate_ngram_fraction(s: str, n: int) -> float:
    """Share of characters covered by character n-grams that occur more than once in `s` (Gopher)."""
    if len(s) < 2 * n:
        return 0.0
    seen, covered = {}, bytearray(len(s))
    for i in range(len(s) - n + 1):
        g = s[i:i + n]
        j = seen.setdefault(g, i)
        if j != i:
            covered[j:j + n] = b"\x01" * n
            covered[i:i + n] = b"\x01" * n
    return sum(covered) / len(s)
