"""Readers and writers for the data formats users bring: pair files (JSONL/Parquet) and BEIR directories.

Readers are strict: a bad row is an error naming the file, the line and what was expected, never a row
silently skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PAIR_REQUIRED = ("query", "positive")
PAIR_OPTIONAL = ("id", "package", "source", "negatives")
PAIR_COLUMNS = ("id", "query", "positive", "package", "source")


class DataError(ValueError):
    """Input data is malformed; the message names the file, the line and what was expected."""


def _open_lines(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _check_text(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty; remove the row or give it text")
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


def _read_jsonl_records(path: Path) -> list[dict[str, object]]:
    rows = []
    with _open_lines(path) as handle:
        try:
            for line_number, raw in enumerate(handle, start=1):
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
                rows.append(_check_record(record, where))
        except (EOFError, gzip.BadGzipFile, OSError) as exc:
            raise DataError(f"{path}: truncated or corrupt compressed file ({exc})") from None
    return rows


def _read_parquet_records(path: Path) -> list[dict[str, object]]:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    records = frame.to_dict(orient="records")
    return [_check_record(record, f"{path}: row {index}") for index, record in enumerate(records)]


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
    frame = pd.DataFrame.from_records(records)
    if "id" not in frame:
        frame["id"] = None
    frame["id"] = [value if isinstance(value, str) else f"row-{index}" for index, value in enumerate(frame["id"])]
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{path}: duplicate id(s) {sorted(set(duplicated))[:5]}; ids must be unique")
    if "package" not in frame:
        frame["package"] = None
    if "source" not in frame:
        frame["source"] = None
    frame["package"] = frame["package"].where(frame["package"].notna(), frame["id"])
    frame["source"] = frame["source"].where(frame["source"].notna(), frame["package"])
    return frame[list(PAIR_COLUMNS)].astype(str).reset_index(drop=True)


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
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("_id"), str):
                raise DataError(f"{where}: expected an object with a string '_id'")
            text = " ".join(str(record.get(name) or "") for name in text_fields).strip()
            if not text:
                raise DataError(f"{where}: empty text for id {record['_id']!r}")
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
    with qrels_path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for line_number, row in enumerate(reader, start=1):
            where = f"{qrels_path}:{line_number}"
            if line_number == 1 and row[:1] == ["query-id"]:
                continue
            if len(row) != 3:
                raise DataError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score)")
            query_id, doc_id, score = row
            if query_id not in queries:
                raise DataError(f"{where}: query id {query_id!r} is not in queries.jsonl")
            if doc_id not in corpus:
                raise DataError(f"{where}: corpus id {doc_id!r} is not in corpus.jsonl")
            try:
                qrels.setdefault(query_id, {})[doc_id] = int(score)
            except ValueError:
                raise DataError(f"{where}: score {score!r} is not an integer") from None
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
