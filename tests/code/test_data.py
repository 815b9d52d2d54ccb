"""Pair files and BEIR directories: strict readers whose errors name the file, the line and what is expected."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.data import (PAIR_COLUMNS, BeirDataset, DataError, GeneralText, read_beir, read_pairs, read_texts,
                             write_beir)
from components.text import normalise

QUERY = "mail transfer agent"
POSITIVE = "A mail transfer agent that delivers local and remote electronic mail."
VALID = json.dumps({"id": "a", "query": QUERY, "positive": POSITIVE}).encode()


def _line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# (case id, file bytes, line number the error must name, what the error must say)
BAD_JSONL = [
    ("malformed-json", VALID + b"\n" + b'{"query": "abc", "positive": \n', 2, r"malformed JSON"),
    ("missing-positive", _line(query=QUERY) + b"\n", 1, r"missing required field\(s\) \['positive'\]"),
    ("empty-text", VALID + b"\n" + _line(id="b", query=QUERY, positive="") + b"\n", 2,
     r"field 'positive' is empty"),
    ("whitespace-only-text", _line(query=" \t\n ", positive=POSITIVE) + b"\n", 1, r"field 'query' is empty"),
    ("invalid-utf8", VALID + b"\n" + b'{"query": "caf\xe9 menu", "positive": "x"}\n', 2, r"not valid UTF-8"),
    ("not-an-object", VALID + b"\n" + b'["a list", "of texts"]\n', 2, r"expected a JSON object.*got list"),
    ("query-is-a-number", _line(query=42, positive=POSITIVE) + b"\n", 1, r"field 'query' must be a string, got int"),
    ("id-is-null", _line(id=None, query=QUERY, positive=POSITIVE) + b"\n", 1, r"field 'id' must be a string"),
    ("unknown-field", _line(query=QUERY, positive=POSITIVE, score=3) + b"\n", 1, r"unknown field\(s\) \['score'\]"),
    ("blank-lines-are-counted", VALID + b"\n\n\n" + b"{oops\n", 4, r"malformed JSON"),
    ("huge-line", VALID + b"\n" + b'{"query": "' + b"x" * (1 << 20) + b'", "positive": "p"}\n', 2,
     r"line longer than 1048576 bytes"),
    ("invisible-only-text", _line(query="\u200b\u2060\ufeff", positive=POSITIVE) + b"\n", 1,
     r"field 'query' is empty \(nothing but whitespace, control or invisible characters\)"),
]


@pytest.mark.parametrize(("content", "line", "expected"), [case[1:] for case in BAD_JSONL],
                         ids=[case[0] for case in BAD_JSONL])
def test_bad_jsonl_line_is_an_error_naming_file_line_and_expectation(
    tmp_path: Path, content: bytes, line: int, expected: str
) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + expected):
        read_pairs(path)


def test_bad_line_in_gzipped_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress(VALID + b"\n" + VALID.replace(b'"a"', b'"b"') + b"\n{bad\n"))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON")):
        read_pairs(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b'{"query": ' + b"1" * 5000 + b', "positive": "x"}\n', r"unreadable JSON",
                     id="integer-too-long-to-parse"),
        pytest.param(b"[" * 100_000 + b"\n", r"unreadable JSON",
                     id="nesting-too-deep"),
        pytest.param(b'{"query": "lone \\ud800 surrogate", "positive": "' + b"x" * 50 + b'"}\n', r"UTF-8|surrogate",
                     id="lone-surrogate-escape"),
    ],
)
def test_pathological_json_line_is_a_data_error_naming_the_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: ") + ".*(" + expected + ")"):
        read_pairs(path)


def test_duplicate_id_is_an_error_naming_the_file_both_lines_and_the_id(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(VALID + b"\n\n" + VALID + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: duplicate id 'a', already used by line 1; ids must be "
                                                  f"unique")):
        read_pairs(path)


def test_duplicate_id_in_parquet_names_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"id": ["a", "b", "a"], "query": [QUERY] * 3, "positive": [POSITIVE] * 3}).to_parquet(path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: duplicate id 'a', already used by row 0")):
        read_pairs(path)


def test_explicit_id_colliding_with_a_default_id_is_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_line(query=QUERY, positive=POSITIVE) + b"\n" + _line(id="row-0", query=QUERY, positive=POSITIVE))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: duplicate id 'row-0', already used by line 1 as its "
                                                  f"default id (it has no 'id' field)")):
        read_pairs(path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("pairs.jsonl", b"", r"no rows"),
        ("pairs.jsonl", b"\n  \n\n", r"no rows"),
        ("pairs.jsonl.gz", gzip.compress(VALID + b"\n" * 2000)[:40], r"truncated or corrupt compressed file"),
        ("pairs.jsonl.gz", VALID + b"\n", r"truncated or corrupt compressed file"),
        ("pairs.csv", b"query,positive\n", r"unsupported format; give a \.jsonl, \.jsonl\.gz or \.parquet file"),
        ("pairs.parquet", b"PAR1 this is not parquet", r"not a readable Parquet file"),
    ],
    ids=["empty-file", "only-blank-lines", "truncated-gz", "not-gzip", "unsupported-extension", "bad-parquet"],
)
def test_unreadable_file_is_an_error_naming_the_file(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + expected):
        read_pairs(path)


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: input file not found")):
        read_pairs(tmp_path / "nope.jsonl")


def test_bad_parquet_row_is_an_error_naming_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"query": [QUERY, None], "positive": [POSITIVE, POSITIVE]}).to_parquet(path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: field 'query' must be a string")):
        read_pairs(path)


# --- happy paths ---

def test_jsonl_gzip_and_parquet_give_the_same_frame(tmp_path: Path, pairs_rows: list[dict], write_jsonl) -> None:
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows)
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame(pairs_rows).to_parquet(parquet)
    frame = read_pairs(jsonl)
    assert list(frame.columns) == list(PAIR_COLUMNS)
    assert frame.to_dict(orient="records") == [{name: row[name] for name in PAIR_COLUMNS} for row in pairs_rows]
    pd.testing.assert_frame_equal(read_pairs(gz), frame)
    pd.testing.assert_frame_equal(read_pairs(parquet), frame)


def test_missing_ids_default_to_row_number_and_source_to_package_then_id(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"query": QUERY, "positive": POSITIVE},
        {"query": QUERY, "positive": POSITIVE, "package": "exim4-base"},
        {"query": QUERY, "positive": POSITIVE, "id": "given", "package": "exim4", "source": "exim4-src"},
        {"query": QUERY, "positive": POSITIVE, "negatives": ["ignored"]},
    ])
    frame = read_pairs(path)
    assert frame["id"].tolist() == ["row-0", "row-1", "given", "row-3"]
    assert frame["package"].tolist() == ["row-0", "exim4-base", "exim4", "row-3"]
    assert frame["source"].tolist() == ["row-0", "exim4-base", "exim4-src", "row-3"]


def test_texts_are_read_verbatim_not_normalised(tmp_path: Path, write_jsonl) -> None:
    positive = "  Tabs\tand\nnewlines\u200b stay  as written in the input file.  "
    frame = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", [{"query": "ﬁle tools", "positive": positive}]))
    assert frame.loc[0, "positive"] == positive and frame.loc[0, "query"] == "ﬁle tools"


NON_BLANK_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1).filter(normalise)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(NON_BLANK_TEXT, NON_BLANK_TEXT), min_size=1, max_size=5))
def test_any_non_blank_text_round_trips_through_jsonl_unchanged(tmp_path: Path, pairs: list[tuple[str, str]]) -> None:
    path = tmp_path / "roundtrip.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for query, positive in pairs:
            handle.write(json.dumps({"query": query, "positive": positive}, ensure_ascii=False) + "\n")
    frame = read_pairs(path)
    assert list(zip(frame["query"], frame["positive"], strict=True)) == pairs


LINE = st.one_of(
    st.binary(max_size=80).map(lambda raw: raw.replace(b"\n", b"")),
    st.sampled_from([VALID, b"", b"   ", b"{}", b"[]", b"null", b'"text"', b"{\"query\": 1}", b"\xff\xfe{",
                     _line(query=QUERY, positive=POSITIVE, extra=1), _line(query="", positive=POSITIVE)]),
    st.dictionaries(st.sampled_from(["id", "query", "positive", "package", "source", "x"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=2)))
    .map(lambda record: json.dumps(record).encode()),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, max_size=6), st.booleans())
def test_arbitrary_bytes_lines_never_raise_anything_but_data_error(
    tmp_path: Path, lines: list[bytes], gzipped: bool
) -> None:
    content = b"\n".join(lines)
    path = tmp_path / ("fuzz.jsonl.gz" if gzipped else "fuzz.jsonl")
    path.write_bytes(gzip.compress(content) if gzipped else content)
    try:
        frame = read_pairs(path)
    except DataError as exc:
        assert str(exc).startswith(str(path))
    else:
        assert len(frame) >= 1 and list(frame.columns) == list(PAIR_COLUMNS)


# --- BEIR ---

@pytest.fixture
def beir() -> BeirDataset:
    return BeirDataset(
        corpus={"d1": "Exim is a mail transfer agent.", "d2": "Postfix is a fast \"MTA\"\twith tabs.",
                "d3": "Vim is a text editor; caf\u00e9 \u2603."},
        queries={"q1": "mail server", "q2": "text editor\nwith newline"},
        qrels={"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2}},
    )


@pytest.fixture
def beir_dir(tmp_path: Path, beir: BeirDataset) -> Path:
    write_beir(tmp_path / "beir", beir)
    return tmp_path / "beir"


def test_write_then_read_beir_round_trips(beir_dir: Path, beir: BeirDataset) -> None:
    assert read_beir(beir_dir) == beir
    assert sorted(p.relative_to(beir_dir).as_posix() for p in beir_dir.rglob("*") if p.is_file()) == [
        "corpus.jsonl", "qrels/test.tsv", "queries.jsonl"]


def test_beir_corpus_text_joins_title_and_text(tmp_path: Path, write_jsonl) -> None:
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "Exim", "text": "mail transfer agent"}])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "mta"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("q1\td1\t1\n")  # the header is optional
    assert read_beir(tmp_path).corpus == {"d1": "Exim mail transfer agent"}


QRELS_HEADER = "query-id\tcorpus-id\tscore\n"


@pytest.mark.parametrize(
    ("qrels", "line", "expected"),
    [
        (QRELS_HEADER + "q1\td1\t1\nq9\td1\t1\n", 3, r"query id 'q9' is not in queries\.jsonl"),
        (QRELS_HEADER + "q1\td9\t1\n", 2, r"corpus id 'd9' is not in corpus\.jsonl"),
        (QRELS_HEADER + "q1\td1\thigh\n", 2, r"score 'high' is not an integer"),
        (QRELS_HEADER + "q1\td1\t0.5\n", 2, r"score '0\.5' is not an integer"),
        (QRELS_HEADER + "q1\td1\n", 2, r"expected 3 tab-separated columns"),
        (QRELS_HEADER + "q1 d1 1\n", 2, r"expected 3 tab-separated columns"),
        (QRELS_HEADER + "q1\td1\t1\t7\n", 2, r"expected 3 tab-separated columns"),
    ],
    ids=["unknown-query", "unknown-doc", "word-score", "fractional-score", "two-columns", "space-separated",
         "four-columns"],
)
def test_bad_qrels_line_is_an_error_naming_file_and_line(beir_dir: Path, qrels: str, line: int, expected: str) -> None:
    path = beir_dir / "qrels" / "test.tsv"
    path.write_text(qrels)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + expected):
        read_beir(beir_dir)


def test_qrels_with_only_a_header_is_an_error(beir_dir: Path) -> None:
    path = beir_dir / "qrels" / "test.tsv"
    path.write_text(QRELS_HEADER)
    with pytest.raises(DataError, match=re.escape(f"{path}: no judgements")):
        read_beir(beir_dir)


@pytest.mark.parametrize("name", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_missing_beir_file_is_an_error_naming_it(beir_dir: Path, name: str) -> None:
    (beir_dir / name).unlink()
    with pytest.raises(DataError, match=re.escape(f"{beir_dir / name}: missing")):
        read_beir(beir_dir)


@pytest.mark.parametrize(
    ("name", "bad_line", "expected"),
    [
        ("corpus.jsonl", b"{not json", r"malformed JSON"),
        ("corpus.jsonl", b'{"_id": 7, "text": "numeric id"}', r"expected an object with a string '_id'"),
        ("corpus.jsonl", b'{"_id": "d9", "title": "", "text": "  "}', r"empty text for id 'd9'"),
        ("corpus.jsonl", b'{"_id": "d1", "text": "again"}', r"duplicate id 'd1'"),
        ("queries.jsonl", b'{"_id": "q3", "text": "caf\xe9"}', r"not valid UTF-8"),
        ("queries.jsonl", b"", r"malformed JSON"),
    ],
    ids=["malformed", "numeric-id", "empty-text", "duplicate-id", "invalid-utf8", "blank-line"],
)
def test_bad_beir_jsonl_line_is_an_error_naming_file_and_line(
    beir_dir: Path, name: str, bad_line: bytes, expected: str
) -> None:
    path = beir_dir / name
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], bad_line, *lines[1:]]) + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + expected):
        read_beir(beir_dir)


BEIR_FILE_CONTENT = st.one_of(
    st.binary(max_size=120),
    st.lists(st.one_of(st.binary(max_size=40).map(lambda raw: raw.replace(b"\n", b"")),
                       st.sampled_from([b'{"_id": "d1", "text": "mail"}', b'{"_id": "q1", "text": "mta"}',
                                        b'{"_id": 1}', b'{"_id": "d1", "text": 3}', b"q1\td1\t1", b"q1\td1\tx",
                                        b"query-id\tcorpus-id\tscore", b"q1\t\"d1\t1", b"\xff", b""])),
             max_size=5).map(lambda lines: b"\n".join(lines)),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"]), BEIR_FILE_CONTENT)
def test_arbitrary_bytes_in_a_beir_file_never_raise_anything_but_data_error_naming_a_file(
    beir_dir: Path, name: str, content: bytes
) -> None:
    (beir_dir / name).write_bytes(content)
    try:
        dataset = read_beir(beir_dir)
    except DataError as exc:
        assert re.match(re.escape(str(beir_dir)) + r"/(corpus\.jsonl|queries\.jsonl|qrels/test\.tsv)(:\d+)?: ",
                        str(exc)), str(exc)
    else:
        assert dataset.qrels and all(query in dataset.queries for query in dataset.qrels)
        assert all(doc in dataset.corpus for docs in dataset.qrels.values() for doc in docs)


def test_a_line_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    prefix, suffix = b'{"query": "mail tools", "positive": "', b'"}'
    line = prefix + b"x" * ((1 << 20) - len(prefix) - len(suffix)) + suffix
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(line + b"\n")
    assert len(line) == 1 << 20 and len(read_pairs(path).loc[0, "positive"]) > 1_000_000


def test_qrels_quotes_are_read_as_written_by_write_beir(tmp_path: Path) -> None:
    dataset = BeirDataset(corpus={'d"1': "Exim is a mail transfer agent."}, queries={"q\t1": "mail"},
                          qrels={"q\t1": {'d"1': 1}})
    write_beir(tmp_path / "beir", dataset)
    assert read_beir(tmp_path / "beir") == dataset


def test_general_texts_are_read_from_gzipped_jsonl_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "a", "title": "apple", "text": "apple: a fruit"}\n\n'
                                   b'{"text": "pear: another fruit"}\n'))
    assert read_texts(path) == [GeneralText("apple: a fruit", title="apple"), GeneralText("pear: another fruit")]


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"id": "a"}', "texts.jsonl:1: expected a JSON object with a 'text' field"),
    (b'{"text": "   "}', "texts.jsonl:1: field 'text' is empty"),
    (b'{"text": "x", "title": ""}', "texts.jsonl:1: field 'title' is empty"),
    (b'{"text": "x", "label": 1}', r"texts.jsonl:1: unknown field\(s\) \['label'\]"),
    (b'["text"]', "texts.jsonl:1: expected a JSON object"),
])
def test_a_bad_general_text_line_is_an_error_naming_the_line(tmp_path: Path, line: bytes, expected: str) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(DataError, match=expected):
        read_texts(path)


def test_general_texts_must_be_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "texts.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unsupported format"):
        read_texts(path)
