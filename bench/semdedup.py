"""Benchmark SemDeDup (curate step 7) on the precomputed base-model passage embeddings.

Why: inside the curate stage `semantic_dedup` runs after a long embedding pass, so its cost and the effect of
`eps` and `keep` cannot be read off a pipeline run. This replays it on exactly the rows the pipeline
deduplicated (train+dev, recovered from the curated pairs and their audit) and reports time, dedup rate, and
how many of the near-duplicate pairs (exact all-pairs search) the clusters find at each `dedup_probes`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from components import artifacts
from components.artifact_types import CURATED, EMBEDDINGS
from components import semdedup
from components.curate import CurateConfig
from components.faiss_device import faiss_device, spherical_kmeans
from components.semdedup import KeepRule, SemanticDedup, semantic_dedup

DEFAULTS = CurateConfig.model_validate({})  # the curate stage's built-in defaults


def load_train_dev(embeddings: Path, curated: Path) -> tuple[np.ndarray, list[str]]:
    """Train+dev vectors and ids in pipeline order: kept non-test pairs plus the semantic-duplicate drops."""
    try:
        vectors_manifest = EMBEDDINGS.read_manifest(embeddings)
        curated_manifest = CURATED.read_manifest(curated)
    except artifacts.ArtifactError as exc:
        sys.exit(f"{exc}\nRun `dvc repro` first: this bench needs the artifacts of the curate stage.")
    if vectors_manifest.params_digest != curated_manifest.params_digest:
        sys.exit(f"{embeddings} and {curated} come from different curate runs; run `dvc repro` first.")
    pairs = pd.read_parquet(curated / "pairs.parquet", columns=["id", "split"])
    audit = pd.read_parquet(curated / "audit.parquet", columns=["dropped_id", "reason"])
    wanted = set(pairs.loc[pairs["split"] != "test", "id"])
    wanted |= set(audit.loc[audit["reason"] == "semantic_duplicate", "dropped_id"])
    ids = pd.read_parquet(embeddings / "ids.parquet", columns=["id"])["id"]
    vectors = np.load(embeddings / "embeddings.npy", allow_pickle=False)
    mask = ids.isin(wanted).to_numpy()
    if len(ids) != len(vectors) or mask.sum() != len(wanted):
        sys.exit(f"{embeddings}: ids do not match the vectors or the curated train+dev rows; "
                 "run `dvc repro` first.")
    return vectors[mask], ids[mask].tolist()


def timed_dedup(vectors: np.ndarray, ids: list[str], args: argparse.Namespace, eps: float,
                keep: KeepRule) -> tuple[SemanticDedup, float]:
    started = time.perf_counter()
    result = semantic_dedup(vectors, ids, n_clusters=args.n_clusters, eps=eps, keep_rule=keep,
                            iterations=args.iterations, seed=args.seed, probes=args.probes)
    return result, time.perf_counter() - started


def timed_kmeans(vectors: np.ndarray, args: argparse.Namespace) -> float:
    """The k-means + assignment part alone, with the settings `semantic_dedup` uses (a separate run)."""
    started = time.perf_counter()
    spherical_kmeans(vectors, min(args.n_clusters, len(vectors)), iterations=args.iterations, seed=args.seed)
    return time.perf_counter() - started


def pair_recall(vectors: np.ndarray, args: argparse.Namespace, eps: float) -> list[dict[str, Any]]:
    """Near-duplicate pairs found through the clusters at each probe count vs every pair (exact all-pairs)."""
    every = semdedup.near_duplicate_pairs(vectors, np.zeros((len(vectors), 1), dtype=np.int64), np.arange(1), eps)
    exact = {(a, b) for a, b, _ in every.tolist()}
    centroids = semdedup.fit_centroids(vectors, args.n_clusters, iterations=args.iterations, seed=args.seed)
    rows = []
    for probes in (1, 2, 3, 5, 8):
        started = time.perf_counter()
        found = semdedup.near_duplicate_pairs(vectors, semdedup.probe(vectors, centroids, probes),
                                              np.arange(len(centroids)), eps)
        rows.append({"probes": probes, "pairs_exact": len(exact), "pairs_found": len(found),
                     "recall": len({(a, b) for a, b, _ in found.tolist()} & exact) / max(len(exact), 1),
                     "seconds": time.perf_counter() - started})
    return rows


def stability(vectors: np.ndarray, ids: list[str], args: argparse.Namespace, eps: float,
              keep: KeepRule) -> list[dict[str, Any]]:
    """Rows whose keep decision flips when every vector moves by noise of norm `scale` (another CPU's kernels:
    ~1e-6; bf16 instead of float32 inference: ~1e-2), and the pairs within `scale` of the threshold. Identical
    vectors (identical passages) move together, as they do on another machine: one text, one computation."""
    reference = timed_dedup(vectors, ids, args, eps, keep)[0]
    every = semdedup.near_duplicate_pairs(vectors, np.zeros((len(vectors), 1), dtype=np.int64), np.arange(1),
                                          eps - 0.01)
    rows = []
    for scale in (1e-6, 1e-5, 1e-4, 1e-3):
        distinct, row_of = np.unique(vectors, axis=0, return_inverse=True)
        noise = np.random.default_rng(0).normal(size=distinct.shape) * scale / np.sqrt(vectors.shape[1])
        moved = vectors + noise[row_of.ravel()].astype(np.float32)
        moved /= np.linalg.norm(moved, axis=1, keepdims=True)
        result = timed_dedup(moved, ids, args, eps, keep)[0]
        rows.append({"noise": scale, "decisions_flipped": int((result.keep != reference.keep).sum()),
                     "pairs_within_noise_of_threshold": int((np.abs(every["cosine"] - (1 - eps)) < scale).sum())})
    return rows


def summary(result: SemanticDedup, seconds: float, eps: float, keep: KeepRule) -> dict[str, Any]:
    similarity = np.array([row["similarity"] for row in result.audit])
    dropped = len(result.audit)
    return {
        "keep": keep.value, "eps": eps, "threshold": 1.0 - eps, "dropped": dropped,
        "kept": int(result.keep.sum()),
        "dedup_rate_pct": 100.0 * dropped / len(result.keep),
        "sim_median": float(np.median(similarity)) if dropped else None,
        "sim_p10": float(np.percentile(similarity, 10)) if dropped else None,
        "seconds": seconds,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--embeddings", type=Path, default=Path("data/embeddings/base"),
                        help="base-model passage embeddings artifact (curate stage)")
    parser.add_argument("--curated", type=Path, default=Path("data/curated"), help="curated pairs artifact")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.15, 0.2],
                        help="eps values for the dedup-rate table")
    parser.add_argument("--n-clusters", type=int, default=DEFAULTS.n_clusters, help="k-means clusters")
    parser.add_argument("--iterations", type=int, default=DEFAULTS.kmeans_iterations,
                        help="k-means iterations")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="k-means seed")
    parser.add_argument("--probes", type=int, default=DEFAULTS.dedup_probes, help="clusters each row probes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at the default eps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    vectors, ids = load_train_dev(args.embeddings, args.curated)
    machine = {"cores": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__,
               "faiss_device": faiss_device(), "numpy": np.__version__, "python": platform.python_version()}
    print(f"machine: {machine}\ntrain+dev rows: {len(ids)} (dim {vectors.shape[1]})\n")

    eps, keep = DEFAULTS.eps, DEFAULTS.keep
    # interleaved, so that a change in machine load hits both measurements alike
    runs = [(timed_dedup(vectors, ids, args, eps, keep)[1], timed_kmeans(vectors, args))
            for _ in range(args.repeats)]
    totals, kmeans = zip(*runs, strict=True)
    total, kmeans_s = statistics.median(totals), statistics.median(kmeans)
    timing = {"rows": len(ids), "eps": eps, "keep": keep.value, "n_clusters": args.n_clusters,
              "repeats": args.repeats, "total_s": total, "kmeans_s": kmeans_s, "greedy_s": total - kmeans_s,
              "rows_per_s": round(len(ids) / total)}
    print(f"## semantic_dedup time (median of {args.repeats})\n")
    print("k-means (train + assign) is timed in a separate `spherical_kmeans` run with the same settings; "
          "greedy_s = total_s - kmeans_s is an estimate.\n")
    print(markdown([timing]) + "\n")

    eps_rows = [summary(*timed_dedup(vectors, ids, args, value, keep), value, keep) for value in args.eps]
    print(f"## dedup rate vs eps (keep {keep.value}, one run each)\n\n{markdown(eps_rows)}\n")
    keep_rows = [summary(*timed_dedup(vectors, ids, args, eps, rule), eps, rule) for rule in KeepRule]
    print(f"## keep rule at eps {eps} (one run each)\n\n{markdown(keep_rows)}\n")
    stability_rows = stability(vectors, ids, args, eps, keep)
    print(f"## decisions flipped by perturbed embeddings (eps {eps})\n\n{markdown(stability_rows)}\n")
    recall_rows = pair_recall(vectors, args, eps)
    print(f"## near-duplicate pairs found through the clusters vs exact all-pairs, eps {eps}\n\n"
          f"{markdown(recall_rows)}")

    if args.json:
        results = {"machine": machine, "timing": timing, "eps": eps_rows, "keep": keep_rows,
                   "pair_recall": recall_rows, "stability": stability_rows}
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
