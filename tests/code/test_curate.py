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
    apply_text_rules,
    assign_splits,
    build_beir,
    curate,
    exact_dedup,
    subsample_by_source,
    subsample_trainable,
    with_dedup_keys,
)
from components.data import DataError, read_beir, read_pairs
from components.semdedup import AUDIT_DECIMALS, KeepRule, semantic_dedup
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
    assert audit == [{"dropped_id": "p1", "kept_id": None, "similarity": None, "reason": reason, "group": -1}]


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
    kept, audit = exact_dedup(with_dedup_keys(frame))
    assert kept["id"].tolist() == ["a", "c"]
    assert audit == [
        {"dropped_id": "b", "kept_id": "a", "similarity": 1.0, "reason": "exact_duplicate", "group": -1},
        {"dropped_id": "d", "kept_id": "a", "similarity": 1.0, "reason": "exact_duplicate", "group": -1},
    ]


def test_exact_dedup_compares_query_and_positive_as_separate_fields() -> None:
    kept, audit = exact_dedup(with_dedup_keys(_frame([("a", "ab", "c" * 20), ("b", "a", "bc" + "c" * 19)])))
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

def _dedup(vectors: np.ndarray, *, eps: float = 0.05, n_clusters: int = 2, keep: KeepRule = KeepRule.first,
           probes: int = 2):
    ids = [f"v{index}" for index in range(len(vectors))]
    return semantic_dedup(vectors, ids, n_clusters=n_clusters, eps=eps, keep_rule=keep, iterations=10, seed=0,
                          probes=probes)


def test_identical_vectors_keep_one_and_audit_the_kept_id() -> None:
    vectors = unit_rows([[1, 2, 3, 0]] * 3 + [[0, 0, 0, 1]])
    result = _dedup(vectors, eps=0.01)
    assert result.keep.tolist() == [True, False, False, True]
    assert [row["dropped_id"] for row in result.audit] == ["v1", "v2"]
    for row in result.audit:
        assert row["kept_id"] == "v0" and row["reason"] == "semantic_duplicate"
        assert row["similarity"] > 1 - 0.01
    assert result.group_sizes.tolist() == [3]


def test_the_audit_reports_cosines_rounded_so_float_noise_cannot_change_its_bytes() -> None:
    vectors = unit_rows([[1, 2, 3, 0], [1, 2, 3.01, 0], [1, 2, 3.0000001, 0], [0, 0, 0, 1]])
    for row in _dedup(vectors, eps=0.01).audit:
        assert row["similarity"] == round(row["similarity"], AUDIT_DECIMALS) and row["similarity"] > 1 - 0.01


def test_orthogonal_vectors_are_all_kept_even_with_a_large_eps() -> None:
    result = _dedup(np.eye(8, dtype=np.float32), eps=0.9, n_clusters=3)
    assert result.keep.all() and result.audit == []


def test_two_tight_opposite_pairs_each_keep_one() -> None:
    vectors = unit_rows([[1, 0.01], [1, -0.01], [-1, 0.01], [-1, -0.01]])
    result = _dedup(vectors, eps=0.05, n_clusters=2)
    assert result.keep.sum() == 2
    assert {(row["dropped_id"], row["kept_id"]) for row in result.audit} == {("v1", "v0"), ("v3", "v2")}


def test_near_duplicates_across_a_cluster_boundary_are_found_by_probing_the_next_cluster() -> None:
    """Clusters only find candidates: a pair split by a cluster boundary is compared when each row probes its
    two nearest clusters, and missed when it probes only its own."""
    from components import semdedup

    vectors = unit_rows([[1, 0.98], [0.98, 1], [1, -1]])  # rows 0 and 1 straddle the diagonal
    centroids = unit_rows([[1, 0], [0, 1]])
    found = {probes: semdedup.near_duplicate_pairs(vectors, semdedup.probe(vectors, centroids, probes),
                                                   np.arange(2), eps=0.05)
             for probes in (1, 2)}
    assert [(a, b) for a, b, _ in found[2].tolist()] == [(0, 1)]
    assert found[2]["cosine"][0] == pytest.approx(float(vectors[0] @ vectors[1]))
    assert len(found[1]) == 0


def test_the_kept_set_does_not_move_when_every_vector_moves_by_1e_6(noisy_groups: np.ndarray) -> None:
    """Another CPU's float kernels change embeddings by about 1e-6: neither the clustering nor the decision may
    follow (only a pair within 1e-6 of the threshold could, and this data has none)."""
    rng = np.random.default_rng(1)
    perturbed = unit_rows(noisy_groups + rng.normal(scale=1e-6, size=noisy_groups.shape))
    for keep in KeepRule:
        first = _dedup(noisy_groups, eps=0.1, n_clusters=6, keep=keep, probes=3)
        second = _dedup(perturbed, eps=0.1, n_clusters=6, keep=keep, probes=3)
        assert first.keep.tolist() == second.keep.tolist() and len(first.audit) > 0
        assert [(row["dropped_id"], row["kept_id"]) for row in first.audit] == [
            (row["dropped_id"], row["kept_id"]) for row in second.audit]


def test_a_two_member_group_keeps_the_lower_id_however_its_vectors_are_rounded() -> None:
    """Both members of a pair are, in exact arithmetic, equally far from their mean: the tie goes to the id,
    not to float noise, under every perturbation of 1e-6."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 32))
    pairs = unit_rows(np.repeat(centres, 2, axis=0) + rng.normal(scale=0.05, size=(80, 32)))
    for trial in range(5):
        moved = unit_rows(pairs + rng.normal(scale=1e-6, size=pairs.shape)) if trial else pairs
        result = _dedup(moved, eps=0.1, n_clusters=4, keep=KeepRule.farthest_from_centroid, probes=4)
        assert [(row["kept_id"], row["dropped_id"]) for row in result.audit] == [
            (f"v{2 * group}", f"v{2 * group + 1}") for group in range(40)]


def test_the_decision_does_not_depend_on_the_clustering(noisy_groups: np.ndarray) -> None:
    """k-means only finds candidates: any cluster count and seed that finds every pair gives one result."""
    results = [_dedup(noisy_groups, eps=0.1, n_clusters=clusters, keep=KeepRule.farthest_from_centroid,
                      probes=clusters) for clusters in (1, 3, 6, 12)]
    results += [semantic_dedup(noisy_groups, [f"v{index}" for index in range(len(noisy_groups))], n_clusters=6,
                               eps=0.1, keep_rule=KeepRule.farthest_from_centroid, iterations=10, seed=seed,
                               probes=6, sample_size=30) for seed in (1, 2)]
    assert all(result.audit == results[0].audit for result in results[1:])


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


# --- the shard steps: any shard and worker count gives the single-process result ---

SNAPSHOT = Path(__file__).resolve().parents[2] / "data" / "raw" / "debian-bookworm" / "pairs.jsonl.gz"


def _published(paths: CuratePaths) -> dict[str, object]:
    """Everything curate publishes, as comparable values (manifests carry the same params digest too)."""
    return {"pairs": pd.read_parquet(paths.output / "pairs.parquet"),
            "audit": pd.read_parquet(paths.output / "audit.parquet"),
            "vectors": np.load(paths.embeddings / "embeddings.npy"),
            "ids": pd.read_parquet(paths.embeddings / "ids.parquet"),
            "beir": read_beir(paths.beir),
            "digests": {CURATED.read_manifest(paths.output).params_digest,
                        EMBEDDINGS.read_manifest(paths.embeddings).params_digest}}


@pytest.mark.slow
def test_every_shard_count_gives_the_single_process_result_on_the_smoke_data(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Rows are sharded by source, exact dedup is global (the snapshot has cross-source duplicates), embedding
    batches are fixed by the plan and the near-duplicate decision ignores the clustering: shards 1..4, and 3
    shards on 2 worker processes, publish byte-for-byte the same rows, audit, vectors and BEIR set."""
    settings = {"embed_model": str(tiny_model_dir), "embed_max_seq_length": 64, "max_pairs": 600, "n_clusters": 8,
                "kmeans_iterations": 5, "eps": 0.2}
    runs = {}
    for shards, workers in ((1, 1), (2, 1), (3, 1), (4, 1), (3, 2)):
        paths = _paths(tmp_path / f"{shards}x{workers}", SNAPSHOT)
        result = curate(CurateConfig(**settings, shards=shards, workers=workers), paths)
        runs[shards, workers] = (_published(paths), result.metrics)
    single, metrics = runs[1, 1]
    assert metrics["dropped_exact_duplicate"] > 0 and metrics["dropped_semantic_duplicate"] > 0
    for (shards, workers), (published, other) in runs.items():
        for name, value in single.items():
            same = np.array_equal(value, published[name]) if name == "vectors" else (
                value.equals(published[name]) if isinstance(value, pd.DataFrame) else value == published[name])
            assert same, f"{name} differs with {shards} shards on {workers} workers"
        counted = {key: value for key, value in other.items() if "seconds" not in key and "per_s" not in key}
        assert counted == {key: value for key, value in metrics.items() if key in counted}


@pytest.mark.slow
def test_the_step_cli_runs_each_step_as_a_task_would_and_merges_to_the_stage_result(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`embedforge curate step ...` per shard and group, then `embedforge curate --plan ...`: what Kubeflow's
    ParallelFor and Airflow's .expand() run, equal to `embedforge curate`."""
    from components.cli import main as embedforge

    params = tmp_path / "params.yaml"
    params.write_text(f"curate: {{embed_model: {tiny_model_dir}, embed_max_seq_length: 64, max_pairs: 300, "
                      f"n_clusters: 4, kmeans_iterations: 5, eps: 0.2, shards: 3}}\n")
    common = ["--params", str(params)]
    work = tmp_path / "steps"
    shards = range(3)
    for shard in shards:
        assert embedforge(["curate", "step", "prepare", "--shard", str(shard), "--input", str(SNAPSHOT),
                           "--out", str(work / f"prepared-{shard}"), *common]) == 0
    assert embedforge(["curate", "step", "plan", "--prepared", *(str(work / f"prepared-{i}") for i in shards),
                       "--out", str(work / "plan"), *common]) == 0
    for shard in shards:
        assert embedforge(["curate", "step", "embed", "--shard", str(shard), "--plan", str(work / "plan"),
                           "--out", str(work / f"embedded-{shard}"), *common]) == 0
    assert embedforge(["curate", "step", "cluster", "--embedded", *(str(work / f"embedded-{i}") for i in shards),
                       "--out", str(work / "clustered"), *common]) == 0
    for group in shards:
        assert embedforge(["curate", "step", "dedup", "--shard", str(group), "--clustered", str(work / "clustered"),
                           "--out", str(work / f"pairs-{group}"), *common]) == 0
    merged, whole = _paths(tmp_path / "merged", SNAPSHOT), _paths(tmp_path / "whole", SNAPSHOT)
    outputs = [["--output", str(paths.output), "--embeddings", str(paths.embeddings), "--beir", str(paths.beir),
                "--metrics", str(paths.output.parent / "metrics.json"),
                "--plot", str(paths.output.parent / "drops.csv"), "--input", str(SNAPSHOT), "--no-tracking", *common]
               for paths in (merged, whole)]
    assert embedforge(["curate", *outputs[0], "--plan", str(work / "plan"), "--clustered", str(work / "clustered"),
                       "--near-duplicates", *(str(work / f"pairs-{i}") for i in shards)]) == 0
    assert embedforge(["curate", *outputs[1], "--set", "shards=1"]) == 0
    for name, value in _published(whole).items():
        other = _published(merged)[name]
        assert np.array_equal(value, other) if name == "vectors" else (
            value.equals(other) if isinstance(value, pd.DataFrame) else value == other), name
    # a missing group is refused with what to do
    assert embedforge(["curate", *outputs[0], "--plan", str(work / "plan"), "--clustered", str(work / "clustered"),
                       "--near-duplicates", str(work / "pairs-0"), str(work / "pairs-1")]) == 2
