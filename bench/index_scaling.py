"""Index latency, memory and recall as the corpus grows: the test corpus, the whole curated corpus, 1M vectors.

Vectors are real: the base-model embeddings of every curated passage that the curate stage caches
(`data/embeddings/base`, 384 dims), and dev-split queries encoded with the same model. The 1M corpus is those
embeddings plus perturbed copies (Gaussian noise, re-normalised; cosine to the original ~0.95), so it keeps the
real distribution's shape. Latency is one query at a time (top 10), single process, as a search service sees
it; recall@10 is against exact float search on the same corpus. Prints a table and the ratios asked for.

    python bench/index_scaling.py [--sizes 5727 55000 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from components.embed import encode, load_model
from components.evaluate import EvaluateConfig, latency_ms, make_searcher, search_all
from components.artifact_types import (
    InMemoryCorpus,
    binary_codes,
    build_index,
    calibration_ranges,
    dequantize_int8,
    read_embeddings,
)
from components.index import IndexConfig


def grow(vectors: np.ndarray, size: int, seed: int, noise: float = 0.3) -> np.ndarray:
    """The real vectors first, then perturbed copies of them up to `size` rows."""
    if size <= len(vectors):
        return vectors[:size]
    rng = np.random.default_rng(seed)
    parts, total = [vectors], len(vectors)
    while total < size:
        count = min(len(vectors), size - total)
        copies = vectors[:count] + rng.normal(scale=noise / np.sqrt(vectors.shape[1]),
                                              size=(count, vectors.shape[1])).astype(np.float32)
        parts.append(copies / np.linalg.norm(copies, axis=1, keepdims=True))
        total += count
    return np.vstack(parts)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--embeddings", type=Path, default=Path("data/embeddings/base"))
    parser.add_argument("--curated", type=Path, default=Path("data/curated"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[5727, 0, 1_000_000],
                        help="corpus sizes; 0 = every cached embedding (the whole curated corpus)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", nargs="+", default=["float_flat", "float_hnsw", "int8_flat", "binary_flat",
                                                       "binary_hnsw"])
    parser.add_argument("--skip-at-1m", nargs="*", default=["float_hnsw"],
                        help="types not built at 1M (float HNSW takes most of an hour on 2 cores)")
    args = parser.parse_args()

    embeddings = read_embeddings(args.embeddings)
    manifest, vectors = embeddings.manifest, embeddings.vectors
    pairs = pd.read_parquet(args.curated / "pairs.parquet")
    texts = pairs.loc[pairs["split"] == "dev", "query"].sample(n=args.queries, random_state=0).tolist()
    model = load_model(manifest.extra["model"], max_seq_length=manifest.extra["max_seq_length"])
    queries = encode(model, texts, batch_size=64, label="bench queries").vectors
    bits = binary_codes(queries)
    ranges = calibration_ranges(vectors[np.random.default_rng(0).choice(len(vectors), 2000, replace=False)])
    evaluate_config = EvaluateConfig(top_k=10, rescore_multiplier=4, hnsw_ef_search=64)
    hnsw = {"hnsw_m": IndexConfig().hnsw_m, "hnsw_ef_construction": IndexConfig().hnsw_ef_construction}
    rows = []
    for size in [s or len(vectors) for s in args.sizes]:
        corpus = grow(vectors, size, seed=1)
        dim = corpus.shape[1]
        corpus_view = InMemoryCorpus(corpus, {dim: ranges})
        _, truth = search_all(make_searcher(build_index("float_flat", corpus_view, "m", dim, **hnsw),
                                            "float_flat", None, evaluate_config),
                              queries, bits, 10)
        int8_store = None
        for kind in args.types:
            if size >= 1_000_000 and kind in args.skip_at_1m:
                continue
            started = time.perf_counter()
            index = build_index(kind, corpus_view, "m", dim, **hnsw)
            build_s = time.perf_counter() - started
            import faiss

            serialized = (faiss.serialize_index_binary(index) if kind.startswith("binary")
                          else faiss.serialize_index(index))
            stores: list[np.ndarray | None] = [None]
            if kind.startswith("binary"):
                if int8_store is None:
                    int8_store = dequantize_int8(corpus_view.int8("m", dim), ranges)
                stores.append(int8_store)
            for store in stores:
                searcher = make_searcher(index, kind, store, evaluate_config)
                _, found = search_all(searcher, queries, bits, 10)
                p50, p99 = latency_ms(searcher, queries, bits, args.queries)
                rows.append({"vectors": size, "index": kind + ("_rescore" if store is not None else ""),
                             "build_s": build_s, "MiB": len(serialized) / 2**20, "p50_ms": p50, "p99_ms": p99,
                             "recall@10": recall_at_10(found, truth)})
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                      flush=True)
    table = pd.DataFrame(rows)
    print("\n" + table.to_markdown(index=False, floatfmt=".3f"))
    for size in sorted(table["vectors"].unique()):
        at = table[table["vectors"] == size].set_index("index")
        if {"float_flat", "binary_hnsw"} <= set(at.index):
            print(f"{size} vectors: float Flat p50 / binary HNSW p50 = "
                  f"{at.loc['float_flat', 'p50_ms'] / at.loc['binary_hnsw', 'p50_ms']:.1f}x; "
                  f"binary HNSW recall@10 {at.loc['binary_hnsw', 'recall@10']:.3f} "
                  f"(rescored {at.loc['binary_hnsw_rescore', 'recall@10']:.3f})")


if __name__ == "__main__":
    main()
