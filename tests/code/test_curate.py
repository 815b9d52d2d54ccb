"""curate: text rules, exact and semantic dedup, source-grouped splits, BEIR export, and the whole stage."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import artifacts
from components.artifact_types import BEIR, CURATED, EMBEDDINGS
from components.config import params_digest
from components.curate import (
    DROP_REASONS,
    CurateConfig,
    CuratePaths,
    KeepRule,
    apply_text_rules,
    assign_splits,
    build_beir,
    curate,
    exact_dedup,
    semantic_dedup,
    subsample_by_source,
    subsample_trainable,
)
from components.data import DataError, read_beir, read_pairs
from components.text import normalise
from tests.helpers import unit_rows

FRACTIONS = {"train": 0.5, "dev": 0.2, "test": 0.3}


def _frame(rows: list[tuple[str, str, str]], source: str | None = None) -> pd.DataFrame:
    """(id, query, positive) rows as a read_pairs-shaped frame."""
    frame = pd.DataFrame(rows, columns=["id", "query", "positive"])
    frame["package"] = frame["id"]
    frame["source"] = source or frame["id"]
    return frame


# --- text rules ---

RULES = CurateConfig(min_query_chars=5, min_positive_chars=20, max_positive_chars=40)
OK_POSITIVE = "A mail transfer agent for all."  # 30 chars


@pytest.mark.parametrize(
    ("query", "positive", "reason"),
    [
        ("\u200b\u200d\ufeff", OK_POSITIVE, "empty"),
        ("mail agent", " \t\n\u200b ", "empty"),
        ("\u200b", "x" * 100, "empty"),  # empty wins over too long
        ("mta", OK_POSITIVE, "too_short"),
        ("m   t\u200b\u200b", OK_POSITIVE, "too_short"),  # 7 chars as written, "m t" (3) once normalised
        ("mail agent", "too short text", "too_short"),
        ("mta", "x" * 100, "too_short"),  # too short wins over too long
        ("mail agent", "x" * 41, "too_long"),
    ],
)
def test_text_rule_drops_a_pair_with_the_audited_reason(query: str, positive: str, reason: str) -> None:
    kept, audit = apply_text_rules(_frame([("p1", query, positive)]), RULES)
    assert kept.empty
    assert audit == [{"dropped_id": "p1", "kept_id": None, "similarity": None, "reason": reason, "cluster": -1}]


@pytest.mark.parametrize(
    ("query", "positive", "normalised_positive"),
    [
        ("five!", "x" * 20, "x" * 20),  # both limits are inclusive
        ("mail agent", "y" * 40, "y" * 40),
        ("mail agent", "A   mail\n\ntransfer\tagent  for   all.\u200b   ", OK_POSITIVE),  # long only before normalising
    ],
)
def test_text_rules_keep_pairs_within_limits_and_normalise_them(query: str, positive: str,
                                                                normalised_positive: str) -> None:
    kept, audit = apply_text_rules(_frame([("p1", query, positive)]), RULES)
    assert audit == []
    assert kept.loc[0, "positive"] == normalised_positive and kept.loc[0, "query"] == normalise(query)


# --- exact dedup ---

def test_exact_dedup_keeps_the_first_by_id_and_audits_the_kept_id() -> None:
    frame = _frame([("b", "mail agent", OK_POSITIVE), ("a", "mail agent", OK_POSITIVE),
                    ("c", "other query", OK_POSITIVE), ("d", "mail agent", OK_POSITIVE)])
    kept, audit = exact_dedup(frame)
    assert kept["id"].tolist() == ["a", "c"]
    assert audit == [
        {"dropped_id": "b", "kept_id": "a", "similarity": 1.0, "reason": "exact_duplicate", "cluster": -1},
        {"dropped_id": "d", "kept_id": "a", "similarity": 1.0, "reason": "exact_duplicate", "cluster": -1},
    ]


def test_exact_dedup_compares_query_and_positive_as_separate_fields() -> None:
    kept, audit = exact_dedup(_frame([("a", "ab", "c" * 20), ("b", "a", "bc" + "c" * 19)]))
    assert len(kept) == 2 and audit == []


# --- splits and subsampling ---

@pytest.fixture
def sources() -> pd.Series:
    names = [f"src-{index}" for index in range(300)]
    return pd.Series(names * 2 + names[:50])


def test_assign_splits_keeps_every_source_in_one_split(sources: pd.Series) -> None:
    splits = assign_splits(sources, FRACTIONS, seed=42)
    assert splits.groupby(sources).nunique().max() == 1
    assert set(splits) == {"train", "dev", "test"}


def test_assign_splits_is_deterministic_and_independent_of_row_order(sources: pd.Series) -> None:
    splits = assign_splits(sources, FRACTIONS, seed=42)
    shuffled = sources.sample(frac=1.0, random_state=0)
    assert splits.equals(assign_splits(sources, FRACTIONS, seed=42))
    assert dict(zip(shuffled, assign_splits(shuffled, FRACTIONS, seed=42))) == dict(zip(sources, splits))
    assert not splits.equals(assign_splits(sources, FRACTIONS, seed=43))


def test_assign_splits_follows_the_fractions_over_many_sources() -> None:
    sources = pd.Series([f"src-{index}" for index in range(5000)])
    shares = assign_splits(sources, FRACTIONS, seed=7).value_counts(normalize=True)
    for split, fraction in FRACTIONS.items():
        assert shares[split] == pytest.approx(fraction, abs=0.03)


def test_subsample_by_source_takes_whole_sources_up_to_the_limit() -> None:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(60)], "source": [f"s{i % 17}" for i in range(60)]})
    sample = subsample_by_source(frame, max_pairs=20, seed=1)
    assert 0 < len(sample) <= 20
    sizes = frame.groupby("source").size()
    assert sample.groupby("source").size().to_dict() == sizes[sample["source"].unique()].to_dict()
    assert sample.equals(subsample_by_source(frame, max_pairs=20, seed=1))
    assert subsample_by_source(frame, max_pairs=100, seed=1)["id"].tolist() == frame["id"].tolist()
    assert subsample_by_source(frame.iloc[:0], max_pairs=20, seed=1).empty


def test_subsample_trainable_caps_train_and_dev_by_source_and_keeps_every_test_pair() -> None:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(600)], "source": [f"s{i % 120}" for i in range(600)]})
    frame["split"] = assign_splits(frame["source"], FRACTIONS, seed=3)

    sample = subsample_trainable(frame, max_pairs=100, seed=3)

    trainable = sample[sample["split"] != "test"]
    assert 0 < len(trainable) <= 100
    assert sample[sample["split"] == "test"].reset_index(drop=True).equals(
        frame[frame["split"] == "test"].reset_index(drop=True))
    sizes = frame.groupby("source").size()
    assert trainable.groupby("source").size().to_dict() == sizes[trainable["source"].unique()].to_dict()
    kept = set(sample["id"])
    assert sample["id"].tolist() == [i for i in frame["id"] if i in kept]  # original order


# --- semantic dedup on hand-made unit vectors ---

def _dedup(vectors: np.ndarray, *, eps: float = 0.05, n_clusters: int = 2, keep: KeepRule = KeepRule.first):
    ids = [f"v{index}" for index in range(len(vectors))]
    return semantic_dedup(vectors, ids, n_clusters=n_clusters, eps=eps, keep_rule=keep, iterations=10, seed=0)


def test_identical_vectors_keep_one_and_audit_the_kept_id() -> None:
    vectors = unit_rows([[1, 2, 3, 0]] * 3 + [[0, 0, 0, 1]])
    result = _dedup(vectors, eps=0.01)
    assert result.keep.tolist() == [True, False, False, True]
    assert [row["dropped_id"] for row in result.audit] == ["v1", "v2"]
    for row in result.audit:
        assert row["kept_id"] == "v0" and row["reason"] == "semantic_duplicate"
        assert row["similarity"] > 1 - 0.01
    assert result.cluster_sizes.sum() == 4


def test_orthogonal_vectors_are_all_kept_even_with_a_large_eps() -> None:
    result = _dedup(np.eye(8, dtype=np.float32), eps=0.9, n_clusters=3)
    assert result.keep.all() and result.audit == []


def test_near_duplicates_in_different_clusters_are_not_compared() -> None:
    vectors = unit_rows([[1, 0.01], [1, -0.01], [-1, 0.01], [-1, -0.01]])  # two tight, opposite pairs
    result = _dedup(vectors, eps=0.05, n_clusters=2)
    assert result.keep.sum() == 2
    assert {(row["dropped_id"], row["kept_id"]) for row in result.audit} == {("v1", "v0"), ("v3", "v2")}


@pytest.fixture
def noisy_groups() -> np.ndarray:
    """12 well-separated centres in 64 dims, each with 6 noisy copies."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 64))
    return unit_rows(np.repeat(centres, 6, axis=0) + rng.normal(scale=0.25, size=(72, 64)))


def test_larger_eps_drops_at_least_as_many(noisy_groups: np.ndarray) -> None:
    drops = [len(_dedup(noisy_groups, eps=eps, n_clusters=6).audit) for eps in (0.01, 0.03, 0.05, 0.1, 0.2, 0.5)]
    assert drops == sorted(drops)
    assert drops[0] < drops[-1]


def test_semantic_dedup_is_deterministic(noisy_groups: np.ndarray) -> None:
    first = _dedup(noisy_groups, eps=0.1, n_clusters=6, keep=KeepRule.farthest_from_centroid)
    second = _dedup(noisy_groups, eps=0.1, n_clusters=6, keep=KeepRule.farthest_from_centroid)
    assert first.audit == second.audit and (first.keep == second.keep).all()


def test_only_kept_members_absorb_duplicates_so_a_chain_can_keep_more_at_larger_eps() -> None:
    """Documented trade-off: b kept at eps 0.05 absorbs c and d; at eps 0.1 b is itself dropped (a duplicate
    of a), and nothing dropped can absorb c and d, so they survive. No pair is ever dropped for resembling a
    dropped pair."""
    def towards(deg_x: float, deg_y: float) -> list[float]:
        return [1.0, float(np.tan(np.radians(deg_x))), float(np.tan(np.radians(deg_y)))]

    vectors = unit_rows([towards(0, 20), towards(0, 0), towards(17, 0), towards(-17, 0)])
    audits = [_dedup(vectors, eps=eps, n_clusters=1).audit for eps in (0.05, 0.1)]
    assert [len(audit) for audit in audits] == [2, 1]
    kept = {index for index in range(4)} - {int(row["dropped_id"][1:]) for row in audits[1]}
    assert all(row["kept_id"] not in {row["dropped_id"] for row in audit} for audit in audits for row in audit)
    assert len(kept) == 3


@pytest.mark.parametrize(
    ("keep", "survivor"),
    [(KeepRule.first, "v0"), (KeepRule.closest_to_centroid, "v1"), (KeepRule.farthest_from_centroid, "v2")],
)
def test_keep_rule_chooses_which_near_duplicate_survives(keep: KeepRule, survivor: str) -> None:
    vectors = unit_rows([[1, 0.0, 0], [1, 0.05, 0], [1, 0.3, 0]])  # centroid is nearest v1, farthest from v2
    result = _dedup(vectors, eps=0.1, n_clusters=1, keep=keep)
    assert [f"v{index}" for index in np.flatnonzero(result.keep)] == [survivor]
    assert {row["kept_id"] for row in result.audit} == {survivor}


# --- BEIR export ---

def test_build_beir_marks_every_passage_with_identical_text_relevant() -> None:
    test = _frame([("t1", "mail agent", OK_POSITIVE), ("t2", "editor", "A text editor for everyone."),
                   ("t3", "mail server", OK_POSITIVE)])
    beir = build_beir(test)
    assert beir.qrels == {"t1": {"t1": 1, "t3": 1}, "t2": {"t2": 1}, "t3": {"t1": 1, "t3": 1}}
    assert beir.corpus == dict(zip(test["id"], test["positive"]))
    assert beir.queries == dict(zip(test["id"], test["query"]))


# --- the whole stage ---

def _paths(root: Path, source: Path) -> CuratePaths:
    return CuratePaths(input=source, output=root / "curated", embeddings=root / "embeddings" / "base",
                       beir=root / "beir" / "test")


@pytest.mark.slow
def test_curate_publishes_consistent_artifacts(tmp_path: Path, pairs_file: Path, tiny_model_dir: Path) -> None:
    config = CurateConfig(embed_model=str(tiny_model_dir), embed_dtype="float32", embed_max_seq_length=128,
                          n_clusters=3, kmeans_iterations=5, split_fractions=FRACTIONS, seed=1)
    paths = _paths(tmp_path / "out", pairs_file)
    result = curate(config, paths)

    curated = CURATED.read_manifest(paths.output)
    embedded = EMBEDDINGS.read_manifest(paths.embeddings)
    beir_manifest = BEIR.read_manifest(paths.beir)
    assert {curated.params_digest, embedded.params_digest, beir_manifest.params_digest} == {params_digest(config)}
    assert curated.inputs == {"raw_pairs": artifacts.file_sha256(pairs_file)} == embedded.inputs

    vectors = np.load(paths.embeddings / "embeddings.npy")
    ids = pd.read_parquet(paths.embeddings / "ids.parquet")["id"]
    assert vectors.shape == (len(ids), 32) == (embedded.counts["vectors"], embedded.counts["dim"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    raw = read_pairs(pairs_file)
    pairs = pd.read_parquet(paths.output / "pairs.parquet")
    audit = pd.read_parquet(paths.output / "audit.parquet")
    test_ids = set(pairs.loc[pairs["split"] == "test", "id"])
    assert set(pairs["id"]) - test_ids <= set(ids) <= set(raw["id"]) - test_ids  # the test split is never embedded
    assert sorted(audit["dropped_id"]) == sorted(set(raw["id"]) - set(pairs["id"]))
    kept_by = dict(zip(audit["dropped_id"], audit["kept_id"]))
    for dropped_id, kept_id in kept_by.items():  # an exact duplicate's survivor may later be a semantic duplicate
        while kept_id in kept_by:
            kept_id = kept_by[kept_id]
        assert kept_id is None or kept_id in set(pairs["id"]), dropped_id
    assert set(audit["reason"]) <= set(DROP_REASONS)
    assert (audit["reason"] == "exact_duplicate").sum() == 5

    metrics = result.metrics
    dropped = sum(metrics[f"dropped_{reason}"] for reason in DROP_REASONS)
    assert metrics["rows_in"] == metrics["rows_sampled"] == len(raw) == 40
    assert metrics["rows_trainable_capped"] == 0
    assert metrics["rows_sampled"] - dropped == metrics["rows_out"] == len(pairs)
    assert metrics["dropped_total"] == dropped == len(audit)
    assert sum(metrics[f"rows_{split}"] for split in ("train", "dev", "test")) == metrics["rows_out"]
    assert curated.counts == {"rows_train": metrics["rows_train"], "rows_dev": metrics["rows_dev"],
                              "rows_test": metrics["rows_test"], "audit": len(audit)}

    split_of_source = dict(zip(raw["source"], assign_splits(raw["source"], FRACTIONS, seed=1)))
    assert pairs.groupby("source")["split"].nunique().max() == 1
    assert pairs["split"].tolist() == pairs["source"].map(split_of_source).tolist()
    semantic = audit.loc[audit["reason"] == "semantic_duplicate", "dropped_id"]
    assert len(semantic) == metrics["dropped_semantic_duplicate"] > 0
    assert "test" not in set(semantic.map(dict(zip(raw["id"], raw["source"]))).map(split_of_source))

    beir = read_beir(paths.beir)
    test_ids = pairs.loc[pairs["split"] == "test", "id"]
    assert set(beir.queries) == set(beir.corpus) == set(test_ids) and len(test_ids) == metrics["rows_test"] > 0
    assert beir_manifest.counts["queries"] == len(beir.queries)
    assert not list(tmp_path.glob("out/**/.*tmp-*"))


@pytest.mark.slow
def test_a_trainable_cap_shrinks_train_and_dev_but_leaves_the_test_set_as_it_is(
    tmp_path: Path, pairs_file: Path, tiny_model_dir: Path
) -> None:
    settings = {"embed_model": str(tiny_model_dir), "embed_dtype": "float32", "embed_max_seq_length": 128,
                "n_clusters": 3, "kmeans_iterations": 5, "split_fractions": FRACTIONS, "seed": 1}
    whole = curate(CurateConfig(**settings), _paths(tmp_path / "whole", pairs_file))
    capped = curate(CurateConfig(**settings, max_trainable_pairs=10), _paths(tmp_path / "capped", pairs_file))

    assert capped.metrics["rows_trainable_capped"] > 0
    assert capped.metrics["rows_train"] + capped.metrics["rows_dev"] <= 10
    assert capped.metrics["dropped_total"] == len(pd.read_parquet(tmp_path / "capped" / "curated" / "audit.parquet"))
    assert read_beir(tmp_path / "capped" / "beir" / "test") == read_beir(tmp_path / "whole" / "beir" / "test")


@pytest.mark.parametrize("pre_existing", [False, True], ids=["fresh", "previous-outputs"])
def test_curate_on_bad_input_raises_naming_the_line_and_touches_no_output(
    tmp_path: Path, pairs_rows: list[dict], write_jsonl, pre_existing: bool
) -> None:
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows[:5])
    with source.open("a") as handle:
        handle.write('{"query": "truncated line", "positive": \n')
    paths = _paths(tmp_path / "out", source)
    before = {}
    if pre_existing:
        for target in (paths.output, paths.embeddings, paths.beir):
            with artifacts.publish(target, kind="old", schema_version=1, stage="curate", params_digest="x") as (tmp, _):
                (tmp / "data.txt").write_text(f"previous {target.name}")
        before = {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()}
    with pytest.raises(DataError, match=re.escape(f"{source}:6: malformed JSON")):
        curate(CurateConfig(embed_model="/nonexistent/model"), paths)
    if pre_existing:
        assert {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()} == before
    else:
        assert not (tmp_path / "out").exists()
