"""Data tests on the committed Debian snapshot, and the great-expectations suites that guard curate."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from components.artifacts import file_sha256
from components.data import read_pairs
from components.validation import TextLimits, ValidationFailed, validate_pairs
from tests.helpers import REPO_ROOT

SNAPSHOT_DIR = REPO_ROOT / "data" / "raw" / "debian-bookworm"
SNAPSHOT = SNAPSHOT_DIR / "pairs.jsonl.gz"
LIMITS = TextLimits(min_query_chars=8, min_positive_chars=40, max_positive_chars=4000)

pytestmark = pytest.mark.skipif(not SNAPSHOT.is_file(), reason=f"{SNAPSHOT} not checked out (dvc pull)")


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads((SNAPSHOT_DIR / "provenance.json").read_text())


@pytest.fixture(scope="module")
def snapshot() -> pd.DataFrame:
    return read_pairs(SNAPSHOT)


def test_snapshot_bytes_match_the_hash_recorded_in_provenance(provenance: dict) -> None:
    assert provenance["output"]["file"] == SNAPSHOT.name
    assert SNAPSHOT.stat().st_size == provenance["output"]["bytes"]
    assert file_sha256(SNAPSHOT) == provenance["output"]["sha256"]


def test_snapshot_reads_strictly_with_enough_unique_rows(snapshot: pd.DataFrame) -> None:
    assert len(snapshot) >= 60_000
    assert snapshot["id"].is_unique
    assert (snapshot["id"] == snapshot["package"]).all()  # one pair per binary package


def test_snapshot_counts_match_provenance(snapshot: pd.DataFrame, provenance: dict) -> None:
    counts = provenance["counts"]
    assert len(snapshot) == counts["pairs_written"]
    assert snapshot["source"].nunique() == counts["distinct_sources"]
    assert counts["packages_packages"] == (
        counts["pairs_written"] + counts["dropped_empty_long_description"] + counts["dropped_missing_translation"]
    )


@pytest.mark.slow
def test_snapshot_passes_the_raw_pairs_suite(snapshot: pd.DataFrame) -> None:
    assert validate_pairs(snapshot, suite_name="raw_pairs", source=str(SNAPSHOT)) >= 10


@pytest.fixture(scope="module")
def curated_sample(snapshot: pd.DataFrame) -> pd.DataFrame:
    """60 snapshot rows shaped like curated output: within the limits, unique pairs, a split column."""
    sample = snapshot[snapshot["positive"].str.len().between(40, 4000) & (snapshot["query"].str.len() >= 8)]
    sample = sample.drop_duplicates(["query", "positive"]).head(60).reset_index(drop=True)
    return sample.assign(split=(["train", "dev", "test"] * 20)[: len(sample)])


def test_the_curated_pairs_suite_accepts_a_well_formed_frame(curated_sample: pd.DataFrame) -> None:
    assert validate_pairs(curated_sample, suite_name="curated_pairs", source="sample", limits=LIMITS) >= 14


def test_the_curated_pairs_suite_fails_with_a_readable_report(curated_sample: pd.DataFrame) -> None:
    broken = curated_sample.copy()
    broken.loc[3, "split"] = "validation"
    broken.loc[5, "positive"] = "x" * 4001
    with pytest.raises(ValidationFailed) as raised:
        validate_pairs(broken, suite_name="curated_pairs", source="broken sample", limits=LIMITS)
    report = str(raised.value)
    lines = report.splitlines()
    assert lines[0] == "great-expectations suite 'curated_pairs' failed on broken sample:"
    assert len(lines) == 3  # exactly the two broken expectations, one line each
    assert any("expect_column_values_to_be_in_set on split: 1 unexpected row(s)" in line and "'validation'" in line
               for line in lines)
    assert any("expect_column_value_lengths_to_be_between on positive: 1 unexpected row(s)" in line
               and "'xxxx" in line for line in lines)


def test_the_raw_pairs_suite_reports_duplicate_ids_and_missing_columns() -> None:
    frame = pd.DataFrame({"id": ["a", "a"], "query": ["mail agent", "editor"], "positive": ["p" * 50, "q" * 50]})
    with pytest.raises(ValidationFailed) as raised:
        validate_pairs(frame, suite_name="raw_pairs", source="tiny frame")
    report = str(raised.value)
    assert "expect_column_values_to_be_unique on id: 2 unexpected row(s), e.g. ['a', 'a']" in report
    assert "expect_column_to_exist on source" in report
