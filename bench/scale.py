"""Scale: curate's shard steps, mining's candidate search and the 1M index, at 100k, 300k and 1M pairs.

Why: the steps are meant to fan out to 10M-100M pairs (docs/scale.md plans that from these rates); this measures
how each grows with n and what a second worker process buys, and which index keeps recall at 1M within
64 bytes per vector in RAM.

Data (marked in every table): the real Debian pairs (63k) and, above that, synthesised variants: ids and
sources suffixed and a variant tag in both texts, so exact dedup keeps them. Vectors: the curate stage's cached
real base-model embeddings plus perturbed copies (`index_scaling.grow`); queries: 200 real dev queries encoded
with the base model. Embedding is not re-run at scale: its
rate is measured here on real passages (1 and 2 worker processes) and its time extrapolated linearly, since a
passage's cost does not depend on n; every other step runs the stage's own function on the data, in a fresh
spawned process per worker, timed with its peak resident memory.

    python bench/scale.py [--sizes 100000 300000 1000000] [--workers 1 2] [--index-size 1000000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench's corpus growth
from index_scaling import grow, recall_at_10  # noqa: E402

from components.artifact_types import (  # noqa: E402
    CURATE_PLAN,
    EMBEDDED_SHARD,
    Provenance,
    binary_codes,
    calibration_ranges,
    int8_codes,
    read_embeddings,
    read_step,
    write_step,
)
from components.curate import (  # noqa: E402
    CuratePaths,
    CurateConfig,
    cluster_embeddings,
    find_near_duplicates,
    merge_curation,
    plan_curation,
    prepare_shard,
)
from components.data import read_pairs  # noqa: E402
from components.embed import encode, encode_fixed_batches, load_model  # noqa: E402
from components.evaluate import EvaluateConfig, Int8Rows, latency_ms, make_searcher, search_all  # noqa: E402
from components.faiss_device import candidate_search, ivf_lists  # noqa: E402
from components.artifact_types import binary_ivf_index  # noqa: E402

SNAPSHOT = Path("data/raw/debian-bookworm/pairs.jsonl.gz")


def synthesise_pairs(real: pd.DataFrame, size: int) -> pd.DataFrame:
    """The real pairs, then variant k of each (`~k` on id and source, `[variant k]` in both texts) up to `size`."""
    parts, total, variant = [real], len(real), 1
    while total < size:
        copy = real.iloc[:min(len(real), size - total)].copy()
        for column in ("id", "source", "package"):
            copy[column] = copy[column] + f"~{variant}"
        for column in ("query", "positive"):
            copy[column] = copy[column] + f" [variant {variant}]"
        parts.append(copy)
        total += len(copy)
        variant += 1
    return pd.concat(parts, ignore_index=True).iloc[:size]


def _threads(count: int) -> None:
    """A spawned worker's share of the cores (read by torch and faiss when they start)."""
    os.environ["OMP_NUM_THREADS"] = str(count)


def _pool(workers: int) -> ProcessPoolExecutor:
    """Fresh spawned processes sharing the cores; unlike curate's own pool they do not import torch up front,
    which would count in every step's peak memory."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_threads,
                               initargs=(max(1, (os.cpu_count() or 1) // workers),))


def _measured(step: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """Run one step call in this (worker) process: (seconds, the process's peak RSS in MiB so far). VmHWM, not
    getrusage: a spawned child's ru_maxrss starts at the parent's size at fork."""
    started = time.perf_counter()
    step(*args)
    status = Path("/proc/self/status").read_text()
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return time.perf_counter() - started, peak_kib / 1024


def run_step(step: Callable[..., Any], calls: list[tuple[Any, ...]], workers: int) -> dict[str, float]:
    """Every call of one step on `workers` fresh spawned processes: wall seconds (process start included) and
    the largest peak RSS of any of them."""
    started = time.perf_counter()
    with _pool(workers) as pool:
        results = [future.result() for future in [pool.submit(_measured, step, *call) for call in calls]]
    return {"seconds": time.perf_counter() - started, "peak_mib": max(peak for _, peak in results)}


def synthetic_embeddings(config: CurateConfig, plan: Path, vectors: np.ndarray, out: list[Path]) -> int:
    """Stand-in for the embed step: each shard's planned rows get a real or perturbed real vector."""
    planned = read_step(CURATE_PLAN, plan)
    rows = sum(len(planned.table(f"embed-{shard:05d}", columns=["id"])) for shard in range(config.shards))
    grown = grow(vectors, rows, seed=2, noise=0.5)
    start = 0
    for shard, path in enumerate(out):
        ids = planned.table(f"embed-{shard:05d}", columns=["id"])
        write_step(EMBEDDED_SHARD, path, Provenance("curate", planned.manifest.params_digest, planned.manifest.inputs),
                   tables={"ids": ids}, arrays={"embeddings": grown[start:start + len(ids)]},
                   counts={"vectors": len(ids)}, extra={"shard": shard, "seconds": 0.0})
        start += len(ids)
    return rows


def embed_rate(texts: list[str], workers: int, batch_size: int) -> float:
    """Passages per second of the embed step's own encoder on real passages, `workers` processes at once
    (process start and model load excluded: a fixed cost per task, not per passage)."""
    texts = sorted(texts, key=len, reverse=True)  # batched longest first, as the plan step does
    chunks = [texts[index::workers] for index in range(workers)]
    with _pool(workers) as pool:
        seconds = list(pool.map(_encode_chunk, chunks, [batch_size] * workers))
    return len(texts) / max(seconds)


def _encode_chunk(texts: list[str], batch_size: int) -> float:
    config = CurateConfig()
    model = load_model(config.embed_model, max_seq_length=config.embed_max_seq_length, dtype=config.embed_dtype)
    batches = [texts[start:start + batch_size] for start in range(0, len(texts), batch_size)]
    return encode_fixed_batches(model, batches, label="bench passages").seconds


def curate_at(size: int, workers: int, real: pd.DataFrame, vectors: np.ndarray, rate: float,
              scratch: Path) -> list[dict[str, Any]]:
    """Every curate step at `size` pairs, fanned out over `workers` shards and processes."""
    raw = scratch / f"pairs-{size}.parquet"
    if not raw.exists():
        synthesise_pairs(real, size).to_parquet(raw, index=False)
    config = CurateConfig(max_trainable_pairs=None, shards=workers, workers=workers,
                          n_clusters=max(100, size // 500), kmeans_sample=min(size, 100_000))
    work = scratch / f"{size}-{workers}"
    shards = range(workers)
    prepared = [work / "prepared" / str(shard) for shard in shards]
    embedded = [work / "embedded" / str(shard) for shard in shards]
    found = [work / "pairs" / str(group) for group in shards]
    paths = CuratePaths(input=raw, output=work / "curated", embeddings=work / "embeddings", beir=work / "beir")
    rows = [{"step": "prepare", **run_step(prepare_shard, [(config, raw, s, prepared[s]) for s in shards], workers)},
            {"step": "plan", **run_step(plan_curation, [(config, prepared, work / "plan")], 1)}]
    embedded_rows = synthetic_embeddings(config, work / "plan", vectors, embedded)
    rows.append({"step": "embed (extrapolated)", "seconds": embedded_rows / rate, "peak_mib": float("nan")})
    rows.append({"step": "cluster", **run_step(cluster_embeddings, [(config, embedded, work / "clustered")], 1)})
    rows.append({"step": "dedup", **run_step(find_near_duplicates,
                                             [(config, work / "clustered", g, found[g]) for g in shards], workers)})
    rows.append({"step": "merge", **run_step(merge_curation, [(config, work / "plan", work / "clustered", found,
                                                                paths)], 1)})
    synthetic = "real" if size <= len(real) else f"real {len(real)} + synthesised {size - len(real)}"
    return [{"pairs": size, "workers": workers, "data": synthetic, "embedded": embedded_rows, **row} for row in rows]


def mining_at(size: int, vectors: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """Mining's candidate search (top 50) at `size` corpus passages, exact vs IVF probing 32 lists, timed on a
    sample of queries and projected to mining's real query count (the train queries, ~0.8 n): build once, then
    a cost per query."""
    corpus = grow(vectors, size, seed=3, noise=0.5)
    mined_queries = int(0.8 * size)
    row: dict[str, Any] = {"passages": size, "queries_timed": len(queries), "queries_projected": mined_queries}
    for method, exact_up_to in (("exact", size), ("ivf", 0)):
        found = candidate_search(corpus, queries, 50, exact_up_to=exact_up_to, nprobe=32, recall_sample=200, seed=0)
        row[f"{method}_build_s"] = found.build_seconds
        row[f"{method}_ms_per_query"] = 1000 * found.search_seconds / len(queries)
        row[f"{method}_projected_s"] = found.build_seconds + found.search_seconds / len(queries) * mined_queries
        row[f"{method}_recall@50"] = found.recall
    row["ivf_lists"] = ivf_lists(size)
    row["speedup"] = row["exact_projected_s"] / row["ivf_projected_s"]
    return row


def int8_on_disk(codes: np.ndarray, ranges: np.ndarray, path: Path) -> Int8Rows:
    """Rescoring vectors kept on disk: int8 codes in a memory-mapped file, decoded per gathered candidate."""
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.int8, shape=codes.shape)
    mapped[:] = codes
    mapped.flush()
    return Int8Rows(mapped, ranges)


def index_at(size: int, vectors: np.ndarray, queries: np.ndarray, scratch: Path) -> list[dict[str, Any]]:
    """Indexes at `size` vectors side by side: recall@10 of exact float search, single-query p50/p99, and the
    bytes each keeps in RAM and on disk per vector."""
    import faiss

    corpus = grow(vectors, size, seed=1)
    dim = corpus.shape[1]
    bits = binary_codes(queries)
    exact = faiss.IndexFlatIP(dim)
    exact.add(corpus)
    _, truth = exact.search(queries, 10)
    ranges = calibration_ranges(corpus[np.random.default_rng(0).choice(size, 2000, replace=False)])
    on_disk = int8_on_disk(int8_codes(corpus, ranges), ranges, scratch / "int8.npy")
    rows = []

    def measure(name: str, index: Any, kind: str, ram: float, disk: float, build_s: float,
                store: Any = None, multiplier: int = 1, nprobe: int = 32) -> None:
        config = EvaluateConfig(top_k=10, rescore_multiplier=multiplier, hnsw_ef_search=64, ivf_nprobe=nprobe)
        searcher = make_searcher(index, kind, store, config)
        _, found = search_all(searcher, queries, bits, 10)
        p50, p99 = latency_ms(searcher, queries, bits, len(queries))
        rows.append({"vectors": size, "index": name, "ram_B_per_vector": ram, "disk_B_per_vector": disk,
                     "recall@10": recall_at_10(found, truth), "p50_ms": p50, "p99_ms": p99, "build_s": build_s})
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)

    started = time.perf_counter()
    binary_ivf = binary_ivf_index(binary_codes(corpus), dim)
    built = time.perf_counter() - started
    for nprobe in (32, 64, 128):
        for multiplier in (10, 40, 100):
            binary_ivf.nprobe = nprobe
            measure(f"binary_ivf nprobe={nprobe} + int8 rescore x{multiplier} (disk)", binary_ivf, "binary_ivf",
                    dim / 8 + 8, dim, built, on_disk, multiplier, nprobe)
    started = time.perf_counter()
    lists = ivf_lists(size)
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, 48, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(corpus[np.random.default_rng(0).choice(size, min(size, 100 * lists), replace=False)])
    pq.add(corpus)
    built = time.perf_counter() - started
    for nprobe in (32, 64):
        pq.nprobe = nprobe
        measure(f"ivf_pq48 nprobe={nprobe}", pq, "ivf_pq", 48 + 8, 0, built, nprobe=nprobe)
    started = time.perf_counter()
    hnsw = faiss.IndexBinaryHNSW(dim, 32)
    hnsw.hnsw.efConstruction = 128
    hnsw.add(binary_codes(corpus))
    built = time.perf_counter() - started
    for multiplier in (1, 4):
        measure(f"binary_hnsw M=32 + int8 rescore x{multiplier} (disk)", hnsw, "binary_hnsw", dim / 8 + 2 * 32 * 4,
                dim, built, on_disk if multiplier > 1 else None, multiplier)
    return rows


def exponent(frame: pd.DataFrame, x: str, y: str) -> float:
    """The slope of log y on log x: how the cost grows with n (1 = linear)."""
    valid = frame[(frame[y] > 0) & frame[y].notna()]
    return float(np.polyfit(np.log(valid[x]), np.log(valid[y]), 1)[0]) if len(valid) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--index-size", type=int, default=1_000_000)
    parser.add_argument("--embed-sample", type=int, default=1000, help="real passages timed for the embed rate")
    parser.add_argument("--embeddings", type=Path, default=Path("data/embeddings/base"))
    parser.add_argument("--curated", type=Path, default=Path("data/curated"), help="for real dev queries")
    args = parser.parse_args()

    real = read_pairs(SNAPSHOT)
    embeddings = read_embeddings(args.embeddings)
    vectors = embeddings.vectors
    dev = pd.read_parquet(args.curated / "pairs.parquet", columns=["query", "split"])
    model = load_model(embeddings.manifest.extra["model"], max_seq_length=embeddings.manifest.extra["max_seq_length"])
    queries = encode(model, dev.loc[dev["split"] == "dev", "query"].sample(n=200, random_state=0).tolist(),
                     batch_size=64, label="real dev queries").vectors
    print(f"machine: {os.cpu_count()} cores; real pairs {len(real)}, real vectors {len(vectors)}", flush=True)
    texts = real["positive"].sample(n=args.embed_sample, random_state=0).tolist()
    rates = {workers: embed_rate(texts, workers, CurateConfig().embed_batch_size) for workers in args.workers}
    print(f"embed rate (real passages, float32): {rates}", flush=True)

    with tempfile.TemporaryDirectory(prefix="embedforge-scale-") as scratch:
        steps = pd.DataFrame([row for size in args.sizes for workers in args.workers
                              for row in curate_at(size, workers, real, vectors, rates[workers], Path(scratch))])
        print("\n## curate steps\n\n" + steps.to_markdown(index=False, floatfmt=".1f"), flush=True)
        growth = [{"step": step, "workers": workers, "exponent": exponent(group, "pairs", "seconds"),
                   "memory_exponent": exponent(group, "pairs", "peak_mib")}
                  for (step, workers), group in steps.groupby(["step", "workers"], sort=False)]
        print("\n## growth with n (log-log slope)\n\n" + pd.DataFrame(growth).to_markdown(index=False, floatfmt=".2f"))
        totals = steps.groupby(["pairs", "workers"])["seconds"].sum().unstack()
        print("\n## total seconds (embed extrapolated) and the second worker's speed-up\n\n"
              + totals.assign(speedup=totals[1] / totals[2] if {1, 2} <= set(totals) else np.nan)
              .to_markdown(floatfmt=".2f"))
        mining_queries = grow(queries, 2000, seed=4)  # real dev queries and perturbed copies of them
        mining = pd.DataFrame([mining_at(size, vectors, mining_queries) for size in args.sizes])
        print("\n## mining's candidate search (synthesised corpus)\n\n" + mining.to_markdown(index=False,
                                                                                         floatfmt=".3f"))
        index = pd.DataFrame(index_at(args.index_size, vectors, queries, Path(scratch)))
        print(f"\n## indexes at {args.index_size} vectors (synthesised; exact float search is the truth)\n\n"
              + index.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
