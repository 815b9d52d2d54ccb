"""faiss on the GPU where there is one, on the CPU otherwise: one code path, the device chosen at run time.

The CUDA image installs faiss-gpu-cu12, the CPU image and the venv faiss-cpu (which has `get_num_gpus`, always
0, but no GPU classes). curate's k-means and the exact searches of mine and evaluate go through these helpers,
so none of them branches on the device itself and the CPU path stays the plain faiss-cpu call it always was.
Indexes written to disk (the index stage) are CPU indexes and do not come here.

`EMBEDFORGE_FAISS_DEVICE` = `auto` (default: GPU when the faiss build has GPU support and sees a GPU) | `cpu` |
`gpu` (fail rather than fall back to the CPU).

Exact search has a second GPU path: where faiss has no GPU support (a faiss-cpu build, or no faiss, on a CUDA
machine) it runs as a matrix product and top-k in torch on the GPU, the same ranking as `IndexFlatIP`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from components.config import ConfigError

DEVICE_ENV = "EMBEDFORGE_FAISS_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "gpu")
GPU_MAX_K = 2048  # faiss GPU k-selection limit: deeper searches run on the CPU

Device = Literal["cpu", "gpu"]


def faiss_gpus() -> int:
    """GPUs the installed faiss can use: 0 for a build without GPU support (faiss-cpu), without faiss, or on a
    machine without a GPU."""
    try:
        import faiss
    except ImportError:
        return 0
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def requested_device() -> str:
    """`EMBEDFORGE_FAISS_DEVICE`, checked: auto (also when unset or empty), cpu or gpu."""
    requested = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if requested not in DEVICE_CHOICES:
        raise ConfigError(f"{DEVICE_ENV}={requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    return requested


def faiss_device() -> Device:
    """The device faiss work runs on: `EMBEDFORGE_FAISS_DEVICE` if set, else the GPU when there is one."""
    requested = requested_device()
    if requested == "cpu":
        return "cpu"
    gpus = faiss_gpus()
    if requested == "gpu" and gpus == 0:
        import faiss

        found = ("the installed faiss has no GPU support (faiss-cpu)" if not hasattr(faiss, "StandardGpuResources")
                 else "faiss sees 0 GPUs")
        raise ConfigError(f"{DEVICE_ENV}=gpu, but {found}: install faiss-gpu-cu12 on a machine with a CUDA GPU, "
                          f"or unset {DEVICE_ENV} (or set it to auto or cpu) to run faiss on the CPU")
    return "gpu" if gpus else "cpu"


@dataclass(frozen=True)
class Clusters:
    centroids: np.ndarray  # (clusters, dim) float32, unit length
    assignment: np.ndarray  # (rows,) int64: the nearest centroid of each row
    similarity: np.ndarray  # (rows,) float32: inner product of each row with its centroid


def spherical_kmeans(vectors: np.ndarray, n_clusters: int, *, iterations: int, seed: int) -> Clusters:
    """faiss spherical k-means of L2-normalised rows, then each row's nearest centroid (GPU k-means where there
    is a GPU; on the CPU exactly `faiss.Kmeans(dim, n_clusters, niter, seed, spherical=True)` as before)."""
    import faiss

    gpu = {"gpu": True} if faiss_device() == "gpu" else {}
    kmeans = faiss.Kmeans(vectors.shape[1], n_clusters, niter=iterations, seed=seed, spherical=True, verbose=False,
                          **gpu)
    kmeans.train(vectors)
    similarity, assignment = kmeans.index.search(vectors, 1)
    return Clusters(centroids=kmeans.centroids, assignment=assignment[:, 0], similarity=similarity[:, 0])


def exact_search_device() -> Literal["faiss-gpu", "torch-gpu", "cpu"]:
    """Where exact search runs: faiss on the GPU; else, on a CUDA machine whose faiss has no GPU support, torch
    on the GPU; else faiss on the CPU. `EMBEDFORGE_FAISS_DEVICE=cpu` keeps it on the CPU."""
    import torch

    if faiss_device() == "gpu":
        return "faiss-gpu"
    if requested_device() != "cpu" and torch.cuda.is_available():
        return "torch-gpu"
    return "cpu"


TORCH_QUERY_CHUNK = 4096  # queries per matrix product in torch search: bounds the (chunk, rows) score matrix


def torch_inner_product_search(base: np.ndarray, queries: np.ndarray, k: int, device: str = "cuda"
                               ) -> tuple[np.ndarray, np.ndarray]:
    """`inner_product_search` as a float32 matrix product and top-k in torch on `device`."""
    import torch

    found = min(k, len(base))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    positions = np.full((len(queries), k), -1, dtype=np.int64)
    if found == 0:
        return scores, positions
    rows = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32)).to(device)
    for start in range(0, len(queries), TORCH_QUERY_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(queries[start:start + TORCH_QUERY_CHUNK], dtype=np.float32))
        top = torch.topk(chunk.to(device) @ rows.T, found, dim=1)
        scores[start:start + len(chunk), :found] = top.values.cpu().numpy()
        positions[start:start + len(chunk), :found] = top.indices.cpu().numpy()
    return scores, positions


def inner_product_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search of `queries` among `base` rows: (scores float32, positions int64), each
    (queries, k), best first, position -1 where there are fewer than k rows (faiss's own `IndexFlatIP.search`)."""
    device = exact_search_device()
    if device == "torch-gpu":
        return torch_inner_product_search(base, queries, k)
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    if device == "faiss-gpu" and k <= GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(base)
    return index.search(queries, k)


@dataclass(frozen=True)
class CandidateSearch:
    scores: np.ndarray  # (queries, k) float32, best first
    positions: np.ndarray  # (queries, k) int64, -1 where fewer than k were found
    method: Literal["exact", "ivf"]
    recall: float  # share of the exact top-k found, on a sample of queries (1.0 for exact search)
    build_seconds: float  # training and filling the IVF index (0 for exact search)
    search_seconds: float


IVF_TRAINING_ROWS_PER_LIST = 64  # k-means of the coarse quantizer sees at most this many rows per list


def ivf_lists(rows: int) -> int:
    """IVF lists for a corpus: about 2 sqrt(n) (faiss's guideline is 1-16 sqrt(n): fewer lists train faster,
    more scan less per probe), with at least 39 training rows per list."""
    return max(1, min(int(2 * np.sqrt(rows)), rows // 39))


def candidate_search(base: np.ndarray, queries: np.ndarray, k: int, *, exact_up_to: int, nprobe: int,
                     recall_sample: int, seed: int) -> CandidateSearch:
    """Top-k inner-product candidates: exact below `exact_up_to` corpus rows, else an IVF-Flat index probing
    `nprobe` of its lists (cost ~ nprobe / lists of exact), its recall of the exact top-k measured on a seeded
    sample of queries, so a run says what the approximation cost."""
    started = time.perf_counter()
    if len(base) <= exact_up_to:
        scores, positions = inner_product_search(base, queries, k)
        return CandidateSearch(scores, positions, "exact", 1.0, 0.0, time.perf_counter() - started)
    import faiss

    lists = ivf_lists(len(base))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(base.shape[1]), base.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.max_points_per_centroid = IVF_TRAINING_ROWS_PER_LIST
    index.train(base)
    index.add(base)
    index.nprobe = min(nprobe, lists)
    built = time.perf_counter()
    scores, positions = index.search(queries, k)
    searched = time.perf_counter()
    sample = np.random.default_rng(seed).choice(len(queries), size=min(recall_sample, len(queries)), replace=False)
    _, exact = inner_product_search(base, queries[sample], k)
    found = [len(set(positions[row]) & set(exact[number]) - {-1}) for number, row in enumerate(sample)]
    recall = float(np.sum(found) / max(int((exact >= 0).sum()), 1))
    return CandidateSearch(scores, positions, "ivf", recall, built - started, searched - built)
