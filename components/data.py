"""Readers and writers for the data formats users bring: pair files (JSONL/Parquet) and BEIR directories.

Readers are strict: a bad row is an error naming the file, the line and what was expected, never a row
silently skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import pandas as pd

from components.text import is_blank

PAIR_REQUIRED = ("query", "positive")
PAIR_OPTIONAL = ("id", "package", "source", "negatives")
PAIR_COLUMNS = ("id", "query", "positive", "package", "source")
MAX_LINE_BYTES = 1 << 20  # one JSONL/TSV line (one pair, document or judgement) may hold at most 1 MiB


class DataError(ValueError):
    """Input data is malformed; the message names the file, the line and what was expected."""


def _open_lines(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _numbered_lines(handle: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """`(line number, raw line)` from a binary handle; a line over `MAX_LINE_BYTES` is an error, read no further
    (a file without newlines is never loaded whole into memory)."""
    line_number = 0
    while raw := handle.readline(MAX_LINE_BYTES + 1):
        line_number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(
                f"{path}:{line_number}: line longer than {MAX_LINE_BYTES} bytes (1 MiB); each line must hold one "
                f"record - check that the file has one JSON object per line, or shorten the text"
            )
        yield line_number, raw


def _check_text(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if is_blank(value):
        raise DataError(
            f"{where}: field {field!r} is empty (nothing but whitespace, control or invisible characters); "
            f"remove the row or give it text"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: field {field!r} holds a lone surrogate escape (e.g. \\ud800); fix the text") from None
    return value


def _check_record(record: object, where: str) -> dict[str, object]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {PAIR_REQUIRED}, got {type(record).__name__}")
    missing = [name for name in PAIR_REQUIRED if name not in record]
    if missing:
        raise DataError(f"{where}: missing required field(s) {missing}; every row needs {list(PAIR_REQUIRED)}")
    unknown = sorted(set(record) - set(PAIR_REQUIRED) - set(PAIR_OPTIONAL))
    if unknown:
        raise DataError(
            f"{where}: unknown field(s) {unknown}; allowed are {list(PAIR_REQUIRED + PAIR_OPTIONAL)}"
        )
    row: dict[str, object] = {name: _check_text(record[name], name, where) for name in PAIR_REQUIRED}
    for name in ("id", "package", "source"):
        if name in record:
            row[name] = _check_text(record[name], name, where)
    return row


class _Record(NamedTuple):
    where: str  # `path:line` or `path: row n`, the prefix of error messages
    label: str  # `line n` or `row n`, to point back at an earlier record
    fields: dict[str, object]


def _read_jsonl_records(path: Path, check: Callable[[object, str], dict[str, object]] | None = None) -> list[_Record]:
    """Each non-blank line's object, checked by `check` (default: a text pair)."""
    check = check or _check_record
    rows = []
    with _open_lines(path) as handle:
        try:
            for line_number, raw in _numbered_lines(handle, path):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                except (ValueError, RecursionError) as exc:  # oversized numbers, absurd nesting
                    raise DataError(f"{where}: unreadable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
                rows.append(_Record(where, f"line {line_number}", check(record, where)))
        except (EOFError, gzip.BadGzipFile, OSError) as exc:
            raise DataError(f"{path}: truncated or corrupt compressed file ({exc})") from None
    return rows


def _read_parquet_records(path: Path) -> list[_Record]:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    records = frame.to_dict(orient="records")
    return [_Record(f"{path}: row {index}", f"row {index}", _check_record(record, f"{path}: row {index}"))
            for index, record in enumerate(records)]


def read_pairs(path: Path) -> pd.DataFrame:
    """Read `(query, positive)` pairs from JSONL (optionally gzipped) or Parquet into columns `PAIR_COLUMNS`.

    Missing ids become `row-<n>`; a missing `source` (the grouping key for splits) defaults to `package`, then
    to the id, so each pair is its own group.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        records = _read_jsonl_records(path)
    elif name.endswith(".parquet"):
        records = _read_parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported format; give a .jsonl, .jsonl.gz or .parquet file")
    if not records:
        raise DataError(f"{path}: no rows; the input must hold at least one (query, positive) pair")
    frame = pd.DataFrame.from_records([record.fields for record in records])
    if "id" not in frame:
        frame["id"] = None
    frame["id"] = [value if isinstance(value, str) else f"row-{index}" for index, value in enumerate(frame["id"])]
    _check_unique_ids(records, frame["id"].tolist())
    if "package" not in frame:
        frame["package"] = None
    if "source" not in frame:
        frame["source"] = None
    frame["package"] = frame["package"].where(frame["package"].notna(), frame["id"])
    frame["source"] = frame["source"].where(frame["source"].notna(), frame["package"])
    return frame[list(PAIR_COLUMNS)].astype(str).reset_index(drop=True)


@dataclass(frozen=True)
class GeneralText:
    """One unlabelled general-domain text, and its title where the source gives one (a dictionary entry's
    headword: the short, query-like text a search box would be asked)."""

    text: str
    title: str | None = None


def read_texts(path: Path) -> list[GeneralText]:
    """Unlabelled texts from JSONL (optionally gzipped), one object per line with a `text` field (and an
    optional `id` and `title`): the general-domain texts distillation mixes in."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if not path.name.removesuffix(".gz").endswith((".jsonl", ".json")):
        raise DataError(f"{path}: unsupported format; give a .jsonl or .jsonl.gz file of {{\"text\": ...}} lines")
    records = _read_jsonl_records(path, _check_text_record)
    if not records:
        raise DataError(f"{path}: no rows; give at least one {{\"text\": ...}} line")
    return [GeneralText(**record.fields) for record in records]  # type: ignore[arg-type]


def _check_text_record(record: object, where: str) -> dict[str, object]:
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f"{where}: expected a JSON object with a 'text' field")
    unknown = sorted(set(record) - {"id", "text", "title"})
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed are ['id', 'text', 'title']")
    fields = {"text": _check_text(record["text"], "text", where)}
    if "title" in record:
        fields["title"] = _check_text(record["title"], "title", where)
    return fields


def _check_unique_ids(records: list[_Record], ids: list[str]) -> None:
    """Refuse the first repeated id, naming both records (an id may repeat a record's default id `row-<n>`)."""
    first: dict[str, int] = {}
    for position, row_id in enumerate(ids):
        if row_id in first:
            earlier = records[first[row_id]]
            how = "" if "id" in earlier.fields else " as its default id (it has no 'id' field)"
            raise DataError(
                f"{records[position].where}: duplicate id {row_id!r}, already used by {earlier.label}{how}; "
                f"ids must be unique"
            )
        first[row_id] = position


@dataclass(frozen=True)
class BeirDataset:
    """A BEIR-format retrieval set: `corpus` and `queries` map id -> text, `qrels` query id -> {doc id: grade}."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _read_beir_jsonl(path: Path, text_fields: tuple[str, ...]) -> dict[str, str]:
    texts: dict[str, str] = {}
    if not path.is_file():
        raise DataError(f"{path}: missing; a BEIR directory needs corpus.jsonl, queries.jsonl and qrels/test.tsv")
    with path.open("rb") as handle:
        for line_number, raw in _numbered_lines(handle, path):
            where = f"{path}:{line_number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # oversized numbers, absurd nesting
                raise DataError(f"{where}: unreadable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
            if not isinstance(record, dict) or not isinstance(record.get("_id"), str):
                raise DataError(f"{where}: expected an object with a string '_id'")
            for name in text_fields:
                if record.get(name) is not None and not isinstance(record[name], str):
                    raise DataError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
            text = " ".join(record.get(name) or "" for name in text_fields).strip()
            if is_blank(text):
                raise DataError(f"{where}: empty text for id {record['_id']!r}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{where}: text of id {record['_id']!r} holds a lone surrogate escape (e.g. "
                                f"\\ud800); fix the text") from None
            if record["_id"] in texts:
                raise DataError(f"{where}: duplicate id {record['_id']!r}")
            texts[record["_id"]] = text
    return texts


def read_beir(directory: Path, split: str = "test") -> BeirDataset:
    """Read a BEIR directory, checking that every qrel points at a known query and document."""
    directory = Path(directory)
    corpus = _read_beir_jsonl(directory / "corpus.jsonl", ("title", "text"))
    queries = _read_beir_jsonl(directory / "queries.jsonl", ("text",))
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise DataError(f"{qrels_path}: missing qrels file for split {split!r}")
    qrels: dict[str, dict[str, int]] = {}
    judged_on: dict[tuple[str, str], int] = {}
    with qrels_path.open("rb") as handle:
        for line_number, raw in _numbered_lines(handle, qrels_path):
            where = f"{qrels_path}:{line_number}"
            try:
                row = next(csv.reader([raw.decode("utf-8").rstrip("\r\n")], delimiter="\t"), [])
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            except csv.Error as exc:
                raise DataError(f"{where}: unreadable TSV line ({exc})") from None
            if line_number == 1 and row[:1] == ["query-id"]:
                continue
            if len(row) != 3:
                raise DataError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score)")
            query_id, doc_id, score = row
            if query_id not in queries:
                raise DataError(f"{where}: query id {query_id!r} is not in queries.jsonl")
            if doc_id not in corpus:
                raise DataError(f"{where}: corpus id {doc_id!r} is not in corpus.jsonl")
            if (query_id, doc_id) in judged_on:
                raise DataError(f"{where}: query {query_id!r} and corpus id {doc_id!r} are already judged on line "
                                f"{judged_on[query_id, doc_id]}; give each pair one score")
            try:
                qrels.setdefault(query_id, {})[doc_id] = int(score)
            except ValueError:
                raise DataError(f"{where}: score {score!r} is not an integer") from None
            judged_on[query_id, doc_id] = line_number
    if not qrels:
        raise DataError(f"{qrels_path}: no judgements")
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels)


def write_beir(directory: Path, dataset: BeirDataset, split: str = "test") -> None:
    """Write a BEIR directory (into a directory the caller publishes atomically)."""
    directory = Path(directory)
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    for name, texts in (("corpus.jsonl", dataset.corpus), ("queries.jsonl", dataset.queries)):
        with (directory / name).open("w", encoding="utf-8") as handle:
            for item_id, text in texts.items():
                record = {"_id": item_id, "title": "", "text": text} if name == "corpus.jsonl" else {
                    "_id": item_id, "text": text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    with (directory / "qrels" / f"{split}.tsv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["query-id", "corpus-id", "score"])
        for query_id, docs in dataset.qrels.items():
            for doc_id, score in docs.items():
                writer.writerow([query_id, doc_id, score])
