"""mine: hard negatives for every training query, with positive-aware false-negative filtering.

For each train query, retrieve the nearest train passages with faiss (reusing the base-model passage
embeddings cached by curate: the corpus is never embedded twice with the same model), then walk the
candidates in rank order inside `[range_min, range_max)` and skip:

- the positive itself (`positives_skipped`), and any passage whose normalised text equals it (`duplicate`);
- a near-duplicate of the positive: passage-passage cosine above `duplicate_threshold` (`duplicate`);
- a likely false negative: query-candidate score above `max_score_ratio` x the query-positive score
  (NV-Retriever's TopK-PercPos, Moreira et al. 2024: 0.95 was their best setting).

The first `num_negatives` survivors are the hard negatives. Queries with fewer survivors are dropped and
counted, never padded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from components import artifacts
from components.artifact_types import Provenance, read_curated, read_embeddings, write_mined
from components.config import StageConfig, params_digest
from components.faiss_device import candidate_search, exact_search_device
from components.text import text_key

log = logging.getLogger(__name__)

STAGE = "mine"


class MineConfig(StageConfig):
    """The `mine` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    num_negatives: int = Field(3, ge=1, le=64, description="Hard negatives kept per query.")
    range_min: int = Field(0, ge=0, description="Skip this many top-ranked candidates first.")
    range_max: int = Field(50, ge=2, description="Look no deeper than this rank.")
    max_score_ratio: float = Field(
        0.95, gt=0.0, le=1.0,
        description="Drop candidates scoring > ratio x the positive's score (NV-Retriever TopK-PercPos).")
    duplicate_threshold: float = Field(
        0.95, gt=0.0, le=1.0,
        description="Drop candidates whose cosine to the positive passage exceeds this (near-duplicates).")
    query_batch_size: int = Field(128, ge=1, description="Queries per encode batch.")
    query_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto | float32 | bfloat16 for encoding queries (passages come cached from curate).")
    max_queries: int | None = Field(
        None, ge=1, description="Mine for at most this many train queries; null = all.")
    exact_search_up_to: int = Field(
        200_000, ge=1,
        description="Exact candidate search up to this many corpus passages; an IVF index above (its recall of "
                    "the exact candidates is measured on a sample and logged).")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists searched per query when the search is approximate.")
    recall_sample: int = Field(500, ge=1, description="Queries whose IVF candidates are checked against exact search.")
    seed: int = Field(42, description="Sampling seed when max_queries is set, and the IVF and recall-sample seed.")

    @model_validator(mode="after")
    def _check(self) -> MineConfig:
        if self.range_max - self.range_min < self.num_negatives:
            raise ValueError(
                f"range_max - range_min ({self.range_max} - {self.range_min}) must be at least "
                f"num_negatives ({self.num_negatives})"
            )
        return self


@dataclass(frozen=True)
class MinePaths:
    curated: Path
    embeddings: Path
    output: Path


@dataclass(frozen=True)
class MineResult:
    metrics: dict[str, float]
    positive_scores: np.ndarray
    negative_scores: np.ndarray
    removed_scores: np.ndarray
    data_fingerprint: str


@dataclass(frozen=True)
class Selection:
    negatives: list[list[tuple[int, float]]]  # per query: (corpus position, query score) of each chosen negative
    candidates_seen: int
    positives_skipped: int
    false_negatives_removed: int
    duplicates_removed: int
    removed_scores: list[float]


def select_negatives(
    scores: np.ndarray,
    neighbours: np.ndarray,
    positive_positions: np.ndarray,
    positive_scores: np.ndarray,
    passage_vectors: np.ndarray,
    passage_keys: list[str],
    config: MineConfig,
) -> Selection:
    """Walk each query's ranked candidates and keep the first `num_negatives` that pass every filter."""
    chosen: list[list[tuple[int, float]]] = []
    seen = positives = false_negatives = duplicates = 0
    removed_scores: list[float] = []
    for row in range(len(neighbours)):
        positive = int(positive_positions[row])
        limit = config.max_score_ratio * positive_scores[row]
        picked: list[tuple[int, float]] = []
        for rank in range(config.range_min, min(config.range_max, neighbours.shape[1])):
            candidate = int(neighbours[row, rank])
            if candidate < 0:
                break
            seen += 1
            if candidate == positive:
                positives += 1
                continue
            if (
                passage_keys[candidate] == passage_keys[positive]
                or float(passage_vectors[candidate] @ passage_vectors[positive]) > config.duplicate_threshold
            ):
                duplicates += 1
                continue
            if scores[row, rank] > limit:
                false_negatives += 1
                removed_scores.append(float(scores[row, rank]))
                continue
            picked.append((candidate, float(scores[row, rank])))
            if len(picked) == config.num_negatives:
                break
        chosen.append(picked)
    return Selection(chosen, seen, positives, false_negatives, duplicates, removed_scores)


def mine(config: MineConfig, paths: MinePaths) -> MineResult:
    """Mine hard negatives for the train split and publish (id, query, positive, negative_1..n) as Parquet."""
    from components.embed import encode, load_model

    started = time.perf_counter()
    curated = read_curated(paths.curated)
    embeddings = read_embeddings(paths.embeddings)
    curated_manifest, pairs = curated.manifest, curated.pairs
    embeddings_manifest, vectors, embedded_ids = embeddings.manifest, embeddings.vectors, embeddings.ids
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    if config.max_queries is not None and len(train) > config.max_queries:
        train = train.sample(n=config.max_queries, random_state=config.seed).sort_values("id").reset_index(drop=True)
    position_of = {row_id: position for position, row_id in enumerate(embedded_ids)}
    missing = [row_id for row_id in train["id"] if row_id not in position_of]
    if missing:
        raise artifacts.ArtifactError(
            f"{paths.embeddings}: no embedding for {len(missing)} curated train id(s), e.g. {missing[:3]}; "
            f"the embeddings and {paths.curated} come from different curate runs - re-run curate"
        )
    corpus = pairs[pairs["split"] == "train"].reset_index(drop=True)
    corpus_vectors = vectors[[position_of[row_id] for row_id in corpus["id"]]]
    corpus_position = {row_id: position for position, row_id in enumerate(corpus["id"])}
    positive_positions = np.array([corpus_position[row_id] for row_id in train["id"]])

    model_ref = embeddings_manifest.extra["model"]
    model = load_model(model_ref, max_seq_length=embeddings_manifest.extra["max_seq_length"], dtype=config.query_dtype)
    queries = encode(model, train["query"].tolist(), batch_size=config.query_batch_size, label="train queries")
    depth = min(config.range_max, len(corpus))
    log.info("mine: candidate search on %s", exact_search_device())
    search = candidate_search(corpus_vectors, queries.vectors, depth, exact_up_to=config.exact_search_up_to,
                              nprobe=config.ivf_nprobe, recall_sample=config.recall_sample, seed=config.seed)
    scores, neighbours = search.scores, search.positions
    if search.method == "ivf":
        log.info("mine: IVF candidate search found %.3f of the exact top %d (sample of %d queries)",
                 search.recall, depth, min(config.recall_sample, len(train)))
    positive_scores = np.einsum("ij,ij->i", queries.vectors, corpus_vectors[positive_positions])
    selection = select_negatives(
        scores, neighbours, positive_positions, positive_scores, corpus_vectors,
        [text_key(text) for text in corpus["positive"]], config,
    )
    complete = np.array([len(negatives) == config.num_negatives for negatives in selection.negatives])
    mined = train.loc[complete, ["id", "query", "positive"]].reset_index(drop=True)
    chosen = [negatives for negatives, ok in zip(selection.negatives, complete, strict=True) if ok]
    texts = corpus["positive"].tolist()
    for slot in range(config.num_negatives):
        mined[f"negative_{slot + 1}"] = [texts[negatives[slot][0]] for negatives in chosen]
    mined["negative_ids"] = [[corpus["id"][position] for position, _ in negatives] for negatives in chosen]
    negative_scores = np.array([score for negatives in chosen for _, score in negatives])

    metrics: dict[str, float] = {
        "queries": len(train),
        "queries_mined": len(mined),
        "queries_without_enough_negatives": int((~complete).sum()),
        "corpus_passages": len(corpus),
        "candidates_seen": selection.candidates_seen,
        "positives_skipped": selection.positives_skipped,
        "false_negatives_removed": selection.false_negatives_removed,
        "duplicates_removed": selection.duplicates_removed,
        "false_negative_rate": selection.false_negatives_removed / max(selection.candidates_seen, 1),
        "positive_score_mean": float(positive_scores.mean()),
        "negative_score_mean": float(negative_scores.mean()) if len(negative_scores) else 0.0,
        "encode_queries_per_s": queries.per_second,
        "candidate_search_approximate": float(search.method == "ivf"),
        "candidate_recall": search.recall,
        "candidate_search_seconds": search.build_seconds + search.search_seconds,
        "seconds": time.perf_counter() - started,
    }
    provenance = Provenance(STAGE, params_digest(config), {"curated": curated_manifest.fingerprint,
                                                           "embeddings": embeddings_manifest.fingerprint})
    write_mined(paths.output, mined, provenance, config.num_negatives,
                extra={"columns": list(mined.columns), "embedding_model": model_ref})
    log.info(
        "mine: %d/%d queries mined, %d candidates seen, %d false negatives and %d duplicates removed in %.0fs",
        len(mined), len(train), selection.candidates_seen, selection.false_negatives_removed,
        selection.duplicates_removed, metrics["seconds"],
    )
    return MineResult(
        metrics=metrics,
        positive_scores=positive_scores,
        negative_scores=negative_scores,
        removed_scores=np.array(selection.removed_scores),
        data_fingerprint=curated_manifest.fingerprint,
    )


def plot_scores(result: MineResult, path: Path) -> None:
    """Histogram of positive, chosen-negative and removed-candidate scores: shows where the filter cuts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-0.2, 1.0, 61)
    for values, label in ((result.positive_scores, "positive"), (result.negative_scores, "hard negative"),
                          (result.removed_scores, "removed (likely false negative)")):
        if len(values):
            axis.hist(values, bins=bins, alpha=0.5, label=f"{label} (n={len(values)})")
    axis.set_xlabel("cosine(query, passage), base model")
    axis.set_ylabel("count")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.mine` / `embedforge mine`."""
    from components.cli import (
        StageOutcome,
        parse_stage_args,
        run_stage,
        stage_parser,
    )

    parser = stage_parser(STAGE, MineConfig)
    args, config = parse_stage_args(parser, argv, MineConfig, STAGE)
    paths = MinePaths(curated=args.curated, embeddings=args.embeddings, output=args.output)

    def work() -> StageOutcome:
        result = mine(config, paths)
        plot_scores(result, args.plot)
        return StageOutcome(metrics=result.metrics, data_fingerprint=result.data_fingerprint, files=[args.plot])

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
