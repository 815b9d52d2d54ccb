"""SemDeDup whose decision does not depend on how the work is split, on thread counts or on float rounding.

SemDeDup (Abbas et al., 2023) embeds, clusters with k-means and drops near-duplicates inside each cluster. Taken
literally, the k-means clustering decides which pairs are ever compared, and k-means is chaotic: a change of
1e-6 in one vector (another CPU's float kernels, another batch composition) can move a point across a cluster
boundary, the centroids with it, and the kept set. Here the clustering only *finds* candidates; it never
decides:

1. `fit_centroids`: spherical k-means on a deterministic sample (chosen by a hash of the row id);
2. `probe`: each row's `probes` nearest centroids; its home cluster is the nearest;
3. `near_duplicate_pairs`: for one group of clusters (the unit of fan-out), every pair of a row and a member
   of a cluster the row probes whose cosine exceeds `1 - eps`, recomputed in float64 from the float32 vectors
   so that BLAS blocking and thread counts cannot change it. Probing several clusters finds the pairs that
   straddle a boundary; `bench/semdedup.py` checks the found pairs against exact all-pairs search;
4. `decide`: the near-duplicate graph's connected components (groups); inside each, members are visited in
   keep-rule order (cosine to the group's own mean rounded to `ORDER_DECIMALS` decimals, then id) and one is
   dropped when it is a near-duplicate of an already kept member, which the audit names.

The result is a function of the pairs above the threshold and of the vectors of each group: not of the
sample, the centroids, the shard count or the order rows arrive in. Rounding the keep order matters: in a
two-member group both members are, in exact arithmetic, equally far from the group's mean, so unrounded float
noise picked the survivor and a 1e-6 change in the vectors flipped 758 of 10,000 decisions
(bench/semdedup.py); rounded, such ties go to the id. A flip is left only where a pair lies within the noise of
the threshold or a member's cosine to its mean sits on a rounding boundary: none at noise 1e-6 to 1e-3 there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

# Candidates are screened in float32 with this margin below the threshold, then decided in float64: float32
# dot products of unit vectors are off by < 1e-6, so no pair above the threshold is screened out.
SCREEN_MARGIN = 1e-4
# Cosines to a group's mean are compared at this many decimals, coarse against cross-CPU noise (~1e-6) and fine
# against the spread inside a group (cosines to the mean lie within [1 - eps, 1]).
ORDER_DECIMALS = 3
# The audit reports each dropped row's cosine at this many decimals, so that the same decisions on another CPU
# or in a container (float32 sums in another order) write the same audit bytes.
AUDIT_DECIMALS = 4


class KeepRule(str, Enum):
    """Which member of a near-duplicate group survives.

    SemDeDup keeps the member farthest from its cluster centroid: the least prototypical example adds the most
    diversity. Here the centroid is the group's own mean, so the choice does not depend on the clustering.
    """

    farthest_from_centroid = "farthest_from_centroid"
    closest_to_centroid = "closest_to_centroid"
    first = "first"


def sample_positions(ids: list[str], size: int | None, seed: int) -> np.ndarray:
    """Positions of at most `size` rows chosen by a seeded hash of their id (all rows when size is None or
    larger): the same rows, in the same order, however the rows were sharded."""
    if size is None or size >= len(ids):
        return np.arange(len(ids))
    scores = [hashlib.sha1(f"kmeans:{seed}:{row_id}".encode()).digest()[:8] for row_id in ids]
    return np.sort(np.argsort(scores, kind="stable")[:size])


def fit_centroids(sample: np.ndarray, n_clusters: int, *, iterations: int, seed: int) -> np.ndarray:
    """Unit-length centroids of spherical k-means on the sample (faiss; GPU where there is one)."""
    from components.faiss_device import spherical_kmeans

    return spherical_kmeans(sample, min(n_clusters, len(sample)), iterations=iterations, seed=seed).centroids


def probe(vectors: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """(rows, probes) int64: each row's nearest centroids, nearest (its home cluster) first."""
    from components.faiss_device import inner_product_search

    return inner_product_search(centroids, vectors, min(probes, len(centroids)))[1].astype(np.int64)


def clusters_of_group(n_clusters: int, group: int, groups: int) -> np.ndarray:
    """The clusters one dedup task handles: every `groups`-th, so that large and small ones mix."""
    return np.arange(group, n_clusters, groups)


def near_duplicate_pairs(vectors: np.ndarray, probed: np.ndarray, clusters: np.ndarray, eps: float) -> np.ndarray:
    """Pairs (a, b, cosine) with a < b row positions and cosine > 1 - eps, where b's or a's home cluster is among
    `clusters` and the other row probes it; a structured array sorted by (a, b), each pair once."""
    threshold = 1.0 - eps
    home = probed[:, 0]
    found: list[np.ndarray] = []
    for cluster in clusters:
        members = np.flatnonzero(home == cluster)
        if len(members) == 0:
            continue
        visitors = np.flatnonzero((probed == cluster).any(axis=1))
        screened = vectors[visitors] @ vectors[members].T
        rows, columns = np.nonzero(screened > threshold - SCREEN_MARGIN)
        left, right = visitors[rows], members[columns]
        distinct = left != right
        found.append(np.stack([np.minimum(left, right)[distinct], np.maximum(left, right)[distinct]], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.empty((0, 2), dtype=np.int64)
    exact = (vectors[pairs[:, 0]].astype(np.float64) * vectors[pairs[:, 1]].astype(np.float64)).sum(axis=1)
    above = exact > threshold
    result = np.empty(int(above.sum()), dtype=PAIR_DTYPE)
    result["a"], result["b"], result["cosine"] = pairs[above, 0], pairs[above, 1], exact[above]
    return result


PAIR_DTYPE = np.dtype([("a", np.int64), ("b", np.int64), ("cosine", np.float64)])


def merge_pairs(parts: list[np.ndarray]) -> np.ndarray:
    """The pairs found by every group's task, each once (a pair straddling two groups is found by both)."""
    pairs = np.concatenate(parts) if parts else np.empty(0, dtype=PAIR_DTYPE)
    pairs = pairs[np.lexsort((pairs["b"], pairs["a"]))]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = (pairs["a"][1:] != pairs["a"][:-1]) | (pairs["b"][1:] != pairs["b"][:-1])
    return pairs[first]


@dataclass(frozen=True)
class SemanticDedup:
    keep: np.ndarray  # bool mask over the rows
    audit: list[dict[str, Any]]
    group_sizes: np.ndarray  # members of each near-duplicate group (components with at least two rows)


def _components(count: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected components with at least two rows, each sorted, ordered by their first row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs["a"], pairs["b"])), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
    return sorted((group for group in groups if len(group) > 1), key=lambda group: group[0])


def _visiting_order(members: np.ndarray, vectors: np.ndarray, keep_rule: KeepRule) -> np.ndarray:
    if keep_rule is KeepRule.first:
        return members
    group = vectors[members].astype(np.float64)
    mean = group.mean(axis=0)
    to_mean = np.round(group @ (mean / max(np.linalg.norm(mean), 1e-12)), ORDER_DECIMALS)
    direction = 1.0 if keep_rule is KeepRule.farthest_from_centroid else -1.0
    return members[np.lexsort((members, direction * to_mean))]


def decide(vectors: np.ndarray, ids: list[str], pairs: np.ndarray, keep_rule: KeepRule) -> SemanticDedup:
    """Which rows survive, given every near-duplicate pair: inside each group, members in keep-rule order, each
    dropped when it is a near-duplicate of a member already kept (the most similar one is named).

    Comparing with kept members only means no row is dropped for resembling a row itself dropped.
    """
    neighbours: dict[int, dict[int, float]] = {}
    for a, b, cosine in pairs.tolist():
        neighbours.setdefault(a, {})[b] = cosine
        neighbours.setdefault(b, {})[a] = cosine
    keep = np.ones(len(ids), dtype=bool)
    audit = []
    groups = _components(len(ids), pairs)
    for number, members in enumerate(groups):
        kept: list[int] = []
        for row in _visiting_order(members, vectors, keep_rule).tolist():
            similar = [(neighbours[row][other], -other) for other in kept if other in neighbours[row]]
            if not similar:
                kept.append(row)
                continue
            cosine, negative_kept = max(similar)
            keep[row] = False
            audit.append({"dropped_id": ids[row], "kept_id": ids[-negative_kept], "similarity": round(cosine, AUDIT_DECIMALS),
                          "reason": "semantic_duplicate", "group": number})
    return SemanticDedup(keep=keep, audit=audit, group_sizes=np.array([len(g) for g in groups], dtype=np.int64))


def semantic_dedup(vectors: np.ndarray, ids: list[str], *, n_clusters: int, eps: float, keep_rule: KeepRule,
                   iterations: int, seed: int, probes: int, sample_size: int | None = None) -> SemanticDedup:
    """All four steps in one process (the curate shard steps run the same functions as separate tasks)."""
    if len(ids) < 2:
        return SemanticDedup(np.ones(len(ids), dtype=bool), [], np.empty(0, dtype=np.int64))
    sample = sample_positions(ids, sample_size, seed)
    centroids = fit_centroids(vectors[sample], n_clusters, iterations=iterations, seed=seed)
    probed = probe(vectors, centroids, probes)
    pairs = near_duplicate_pairs(vectors, probed, np.arange(len(centroids)), eps)
    return decide(vectors, ids, pairs, keep_rule)
