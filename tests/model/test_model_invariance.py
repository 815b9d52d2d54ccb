"""Invariance: how a query is typed must not change what the trained models make of it.

Extra spaces, tabs, line breaks and letter case carry no meaning in a package search, so the teacher and
the student must give a reformatted query (nearly) the same embedding and retrieve the same top passage for
it; and a Debian description re-wrapped at another line length must keep its embedding.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import numpy as np
import pytest

from tests.model.retrieval import TRAINED_MODELS, Encoded, RetrievalSet

pytestmark = pytest.mark.slow

# Cosine between a text's embedding and its reformatted twin's. Measured on the smoke teacher and student:
# 1.000000 (to 6 places) for every query and perturbation, >= 0.9999998 for every re-wrapped passage. Their
# (MiniLM) tokenizer lowercases and splits on any whitespace, so the token ids do not change at all; the bound
# leaves room only for float noise (twins are encoded in other batches, with other padding). A cased tokenizer
# fails it: the smoke student with lowercasing switched off puts 'VISUALISER OF MOLECULAR DYNAMIC SIMULATIONS'
# at cosine -0.06 to its lower-case original. So does an int8 student whose activations are quantized per
# batch rather than per text: cosine 0.991 for a twin that lands in another batch.
MIN_COSINE = 0.999


def spaced_out(text: str) -> str:
    return "  " + "   ".join(text.split()) + " \n"


def broken_over_lines(text: str) -> str:
    words = text.split()
    half = len(words) // 2
    return " ".join(words[:half]) + "\n\n" + "\t".join(words[half:])


PERTURBATIONS: dict[str, Callable[[str], str]] = {
    "extra spaces": spaced_out,
    "line breaks and tabs": broken_over_lines,
    "upper case": str.upper,
    "title case": str.title,
    "swapped case": str.swapcase,
}


@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
@pytest.mark.parametrize("model", TRAINED_MODELS)
def test_a_reformatted_query_keeps_its_embedding_and_its_top_passage(
        model: str, perturbation: str, retrieval_set: RetrievalSet, encoded: Callable[[str], Encoded],
        embed: Callable[[str, list[str]], np.ndarray]) -> None:
    perturbed = [PERTURBATIONS[perturbation](query) for query in retrieval_set.queries]
    assert perturbed != retrieval_set.queries  # the premise: the texts did change
    original = encoded(model)
    twins = embed(model, perturbed)

    cosines = np.sum(original.queries * twins, axis=1)
    worst = int(np.argmin(cosines))
    assert cosines[worst] > MIN_COSINE, (
        f"{model}: {retrieval_set.queries[worst]!r} vs {perturbed[worst]!r}: cosine {cosines[worst]:.4f}")

    # Compared by text, not position, so two copies of one description in the corpus raise no false alarm.
    top_before = np.argmax(original.queries @ original.passages.T, axis=1)
    top_after = np.argmax(twins @ original.passages.T, axis=1)
    moved = [perturbed[i] for i in range(len(perturbed))
             if retrieval_set.passages[top_before[i]] != retrieval_set.passages[top_after[i]]]
    assert not moved, f"{model}: the top passage changed for {len(moved)} queries, e.g. {moved[:3]}"


@pytest.mark.parametrize("model", TRAINED_MODELS)
def test_a_rewrapped_description_keeps_its_embedding(
        model: str, retrieval_set: RetrievalSet, encoded: Callable[[str], Encoded],
        embed: Callable[[str, list[str]], np.ndarray]) -> None:
    step = -(-len(retrieval_set.passages) // 100)  # at most 100 passages, spread over the corpus
    sample = list(range(0, len(retrieval_set.passages), step))
    originals = [retrieval_set.passages[j] for j in sample]
    # A re-wrap moves line breaks only: long words (URLs) and hyphenated ones stay whole.
    rewrapped = [textwrap.fill(text, width=40, break_long_words=False, break_on_hyphens=False)
                 for text in originals]
    assert [text.split() for text in rewrapped] == [text.split() for text in originals]  # the premise
    assert rewrapped != originals
    twins = embed(model, rewrapped)

    cosines = np.sum(encoded(model).passages[sample] * twins, axis=1)
    worst = int(np.argmin(cosines))
    assert cosines[worst] > MIN_COSINE, (
        f"{model}: {originals[worst][:80]!r}... re-wrapped: cosine {cosines[worst]:.4f}")


@pytest.mark.parametrize("model", TRAINED_MODELS)
def test_a_query_embeds_the_same_alone_and_beside_other_texts(
        model: str, retrieval_set: RetrievalSet, encoded: Callable[[str], Encoded],
        embed: Callable[[str, list[str]], np.ndarray]) -> None:
    """Served, a query is encoded alone; evaluated, in batches with passages of every length."""
    longest = max(retrieval_set.passages, key=len)
    for index in range(0, len(retrieval_set.queries), 10):
        query = retrieval_set.queries[index]
        alone = embed(model, [query])[0]
        beside_a_long_passage = embed(model, [query, longest])[0]
        cosine = float(alone @ beside_a_long_passage)
        assert cosine > MIN_COSINE, f"{model}: {query!r} alone vs beside a long passage: cosine {cosine:.4f}"
        assert float(alone @ encoded(model).queries[index]) > MIN_COSINE, f"{model}: {query!r} alone vs in its batch"
