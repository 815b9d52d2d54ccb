"""Matryoshka: the student's embedding prefixes trade quality for size gracefully.

The student was distilled with a Matryoshka loss at the dimensions recorded next to its weights
(embedforge_matryoshka.json). Served as re-normalised prefixes, its retrieval quality (nDCG@10 of the
held-out test queries) must fall monotonically as the prefix shrinks, never rising by more than a tie's
worth, and every prefix must still retrieve far better than chance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.model.retrieval import Encoded, RetrievalSet, chance_ndcg_at_k, ndcg_at_k, prefix

pytestmark = pytest.mark.slow

# How much a smaller prefix may beat the next larger one: one query of the ~80 in the smoke split moving
# between rank 1 and rank 2 shifts the mean nDCG@10 by ~0.005, so 0.01 is two such swaps, a tie, not a trend.
# Measured on the smoke student (384/256/128/64/32): 0.911 / 0.899 / 0.873 / 0.773 / 0.690, each step a fall
# of >= 0.012. The one-layer, untrained student of tests/e2e fails it: 0.437 / 0.443 / 0.443 / 0.420 / 0.440.
TIE_TOLERANCE = 0.01
# Every prefix must reach this multiple of a random ranking's expected nDCG@10 (~0.009 on ~480 passages).
# Measured: the 32-dim prefix is at 0.690, 73x chance; 20x (~0.19) leaves a wide margin yet fails a
# collapsed prefix.
MIN_TIMES_CHANCE = 20.0


def test_the_student_records_nested_dims_starting_at_its_full_width(
        matryoshka_dims: list[int], encoded: Callable[[str], Encoded]) -> None:
    assert len(matryoshka_dims) >= 2 and matryoshka_dims == sorted(set(matryoshka_dims), reverse=True)
    assert matryoshka_dims[0] == encoded("student").queries.shape[1]


def test_student_retrieval_degrades_monotonically_as_the_prefix_shrinks(
        matryoshka_dims: list[int], retrieval_set: RetrievalSet, encoded: Callable[[str], Encoded]) -> None:
    vectors = encoded("student")
    quality = {dim: float(ndcg_at_k(prefix(vectors.queries, dim) @ prefix(vectors.passages, dim).T,
                                    retrieval_set.relevant).mean())
               for dim in matryoshka_dims}
    shown = ", ".join(f"d{dim}: {value:.3f}" for dim, value in quality.items())

    for larger, smaller in zip(matryoshka_dims, matryoshka_dims[1:]):
        assert quality[smaller] <= quality[larger] + TIE_TOLERANCE, f"d{smaller} beats d{larger}: {shown}"
    assert quality[matryoshka_dims[-1]] < quality[matryoshka_dims[0]], f"no prefix costs anything: {shown}"

    chance = chance_ndcg_at_k(retrieval_set.relevant)
    for dim, value in quality.items():
        assert value >= MIN_TIMES_CHANCE * chance, f"d{dim} is near chance ({chance:.3f}): {shown}"
