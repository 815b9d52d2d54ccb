"""normalise() and text_key(): the one definition of "the same text" used by dedup and qrels."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from components.text import is_blank, normalise, text_key

REMOVED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain text", "plain text"),
        ("  padded\t", "padded"),
        ("line one\nline two\r\n\tindented", "line one line two indented"),
        ("many     spaces", "many spaces"),
        ("ｆｕｌｌｗｉｄｔｈ", "fullwidth"),  # NFKC folds compatibility forms
        ("ﬁle", "file"),  # ligature
        ("caf\u0065\u0301", "caf\u00e9"),  # NFKC composes
        ("non\u00a0breaking", "non breaking"),
        ("zero\u200bwidth\u200djoin", "zerowidthjoin"),
        ("\ufeffbyte order mark", "byte order mark"),
        ("bell\x07 and null\x00 chars", "bell and null chars"),
        ("soft\u00adhyphen", "softhyphen"),
        ("\u200b\u200c\ufeff", ""),
        ("", ""),
    ],
)
def test_normalise_folds_strips_and_collapses(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@given(st.text())
def test_normalise_output_has_no_control_format_or_unassigned_chars(text: str) -> None:
    assert not {unicodedata.category(char) for char in normalise(text)} & REMOVED_CATEGORIES


@given(st.text())
def test_normalise_output_has_no_leading_trailing_or_repeated_whitespace(text: str) -> None:
    result = normalise(text)
    assert result == result.strip()
    assert "  " not in result
    assert not any(char.isspace() and char != " " for char in result)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn"))))
def test_normalise_is_idempotent_on_text_without_removed_chars(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once


@given(st.text())
@example("e\u200b\u0301")
@example("\u1100\x1f\u1161")
def test_normalise_is_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once


def test_zero_width_char_inside_an_accented_letter_does_not_change_its_key() -> None:
    assert text_key(normalise("caf\u00e9 menu")) == text_key(normalise("cafe\u200b\u0301 menu"))


def test_text_key_is_equal_for_texts_that_normalise_equally() -> None:
    assert text_key(normalise("A  tool\nfor\tmail")) == text_key(normalise("A tool for mail\u200b"))


def test_text_key_differs_for_different_texts() -> None:
    assert text_key("a tool for mail") != text_key("a tool for email")


def test_text_key_does_not_normalise_by_itself() -> None:
    assert text_key("a  b") != text_key("a b")


def test_text_key_of_several_texts_respects_field_boundaries() -> None:
    assert text_key("ab", "c") != text_key("a", "bc")
    assert text_key("ab", "c") == text_key("ab", "c")
    assert text_key("ab", "c") != text_key("c", "ab")


@given(st.text(), st.text(), st.text(), st.text())
def test_text_key_of_normalised_pairs_collides_only_for_equal_pairs(a: str, b: str, c: str, d: str) -> None:
    left, right = (normalise(a), normalise(b)), (normalise(c), normalise(d))
    assert (text_key(*left) == text_key(*right)) == (left == right)


@given(st.text())
@example("\u00a8")  # folds to a space and a combining mark: not blank
@example("\u200b\u00ad\ufeff")
@example(" \x00\x1b\x7f ")
def test_is_blank_is_exactly_normalise_giving_nothing(text: str) -> None:
    assert is_blank(text) == (normalise(text) == "")


@given(st.text(alphabet=st.characters(categories=("L", "N")), min_size=1), st.text())
def test_text_starting_with_a_letter_or_digit_is_never_blank(start: str, rest: str) -> None:
    assert not is_blank(" \t" + start + rest)
    assert normalise(start + rest) != ""
