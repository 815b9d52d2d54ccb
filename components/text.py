"""Text normalisation shared by curation, qrels and deduplication: one definition of "the same text"."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
_NON_SPACE = re.compile(r"\S")
_INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn")


def normalise(text: str) -> str:
    """Drop control and format characters (zero-width, BOM), NFKC-fold, collapse whitespace to single spaces.

    Invisible characters go before folding, so that a zero-width space between a letter and its combining
    accent cannot stop them composing: `normalise` is idempotent. Newlines and tabs count as whitespace:
    embedding models see a flat token stream, and Debian's reflowed paragraphs differ only there.
    """
    visible = "".join(
        " " if char in "\t\n\r\f\v" else char
        for char in text
        if char in "\t\n\r\f\v" or unicodedata.category(char) not in _INVISIBLE
    )
    folded = unicodedata.normalize("NFKC", visible)
    return _WHITESPACE.sub(" ", folded).strip()


def is_blank(text: str) -> bool:
    """Whether `normalise(text)` is empty: only whitespace, control, format or unassigned characters.

    Fast for ordinary text: when its first non-space character is a letter or digit the answer is settled
    without normalising the whole text (NFKC never folds a letter or digit into nothing or into whitespace).
    """
    first = _NON_SPACE.search(text)
    if first is not None and unicodedata.category(first.group())[0] in "LN":
        return False
    return not normalise(text)


def text_key(*texts: str) -> str:
    """A hash identifying normalised text(s); used for exact deduplication and for qrels of equal passages."""
    joined = "\x1f".join(texts)
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()
