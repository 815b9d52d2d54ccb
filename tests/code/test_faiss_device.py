"""faiss device: the GPU where faiss has one, else faiss-cpu with results identical to plain faiss-cpu calls;
`EMBEDFORGE_FAISS_DEVICE` overrides the choice and fails clearly when it cannot be honoured."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest

from components import faiss_device as device_module
from components.config import ConfigError
from components.faiss_device import (
    DEVICE_ENV,
    faiss_device,
    inner_product_search,
    spherical_kmeans,
)


@pytest.fixture(autouse=True)
def _default_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)


@pytest.fixture
def unit_vectors() -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def a_gpu_is_seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """faiss as the CUDA image has it on a one-GPU machine, with the GPU calls recorded and run on the CPU."""
    calls: dict[str, Any] = {}
    plain_kmeans = faiss.Kmeans

    def kmeans(*args: Any, **kwargs: Any) -> Any:
        calls["kmeans_gpu"] = kwargs.pop("gpu", None)
        return plain_kmeans(*args, **kwargs)

    def to_gpus(index: Any) -> Any:
        calls["index_to_gpus"] = type(index).__name__
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "Kmeans", kmeans)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus)
    return calls


def test_the_installed_faiss_cpu_has_no_gpu_so_auto_runs_on_the_cpu() -> None:
    assert device_module.faiss_gpus() == 0
    assert faiss_device() == "cpu"


def test_on_the_cpu_k_means_is_exactly_plain_faiss_spherical_k_means(unit_vectors: np.ndarray) -> None:
    clusters = spherical_kmeans(unit_vectors, 8, iterations=10, seed=3)

    plain = faiss.Kmeans(16, 8, niter=10, seed=3, spherical=True, verbose=False)
    plain.train(unit_vectors)
    similarity, assignment = plain.index.search(unit_vectors, 1)
    np.testing.assert_array_equal(clusters.centroids, plain.centroids)
    np.testing.assert_array_equal(clusters.assignment, assignment[:, 0])
    np.testing.assert_array_equal(clusters.similarity, similarity[:, 0])
    assert clusters.assignment.shape == (300,) and clusters.assignment.dtype == np.int64


def test_on_the_cpu_search_is_exactly_a_plain_flat_inner_product_index(unit_vectors: np.ndarray) -> None:
    base, queries = unit_vectors[:250], unit_vectors[250:]
    scores, positions = inner_product_search(base, queries, 20)

    plain = faiss.IndexFlatIP(16)
    plain.add(base)
    expected_scores, expected_positions = plain.search(queries, 20)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(positions, expected_positions)
    assert (scores.dtype, positions.dtype, positions.shape) == (np.float32, np.int64, (50, 20))


def test_search_deeper_than_the_base_pads_with_minus_one_as_faiss_does(unit_vectors: np.ndarray) -> None:
    _, positions = inner_product_search(unit_vectors[:3], unit_vectors[3:5], 5)
    assert (positions[:, 3:] == -1).all() and sorted(positions[0, :3]) == [0, 1, 2]


def test_where_faiss_sees_a_gpu_auto_moves_search_and_k_means_there(
    a_gpu_is_seen: dict[str, Any], unit_vectors: np.ndarray
) -> None:
    assert faiss_device() == "gpu"
    inner_product_search(unit_vectors, unit_vectors[:4], 5)
    spherical_kmeans(unit_vectors, 4, iterations=2, seed=0)
    assert a_gpu_is_seen == {"index_to_gpus": "IndexFlatIP", "kmeans_gpu": True}


def test_cpu_overrides_a_gpu_that_faiss_sees(
    a_gpu_is_seen: dict[str, Any], unit_vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert faiss_device() == "cpu"
    inner_product_search(unit_vectors, unit_vectors[:4], 5)
    spherical_kmeans(unit_vectors, 4, iterations=2, seed=0)
    assert a_gpu_is_seen == {"kmeans_gpu": None}


def test_gpu_on_faiss_cpu_fails_naming_the_variable_the_build_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError) as error:
        faiss_device()
    message = str(error.value)
    assert f"{DEVICE_ENV}=gpu" in message and "no GPU support (faiss-cpu)" in message
    assert "install faiss-gpu-cu12" in message and f"unset {DEVICE_ENV}" in message


def test_gpu_fails_where_a_gpu_build_sees_no_gpu(monkeypatch: pytest.MonkeyPatch, unit_vectors: np.ndarray) -> None:
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError, match="faiss sees 0 GPUs"):
        inner_product_search(unit_vectors, unit_vectors[:4], 5)
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert faiss_device() == "cpu"


@pytest.mark.parametrize("value", ["cuda", "GPU0", "1"])
def test_an_unknown_choice_is_rejected_listing_the_valid_ones(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(ConfigError, match=f"{DEVICE_ENV}=.* is not one of auto, cpu, gpu"):
        faiss_device()


@pytest.mark.parametrize("value", ["", "auto", " CPU "])
def test_empty_and_differently_cased_choices_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DEVICE_ENV, value)
    assert faiss_device() == "cpu"


def test_curate_and_evaluate_run_their_faiss_work_on_the_chosen_device(
    a_gpu_is_seen: dict[str, Any], unit_vectors: np.ndarray
) -> None:
    from components.evaluate import exact_search
    from components.semdedup import KeepRule, semantic_dedup

    ids = [str(i) for i in range(300)]
    semantic_dedup(unit_vectors, ids, n_clusters=4, eps=0.01, keep_rule=KeepRule.closest_to_centroid,
                   iterations=2, seed=0, probes=2)
    exact_search(unit_vectors, unit_vectors[:4], ids, ids[:4], top_k=10)
    assert a_gpu_is_seen == {"index_to_gpus": "IndexFlatIP", "kmeans_gpu": True}


def test_candidate_search_is_exact_up_to_its_threshold_and_ivf_with_measured_recall_above() -> None:
    """Mining's candidate search on a large corpus: IVF probing 32 of its lists finds nearly all of the exact
    top 50 (measured on a sample, and the measurement agrees with a full check); a small corpus stays exact."""
    from components.faiss_device import candidate_search, inner_product_search, ivf_lists

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    base = centres[rng.integers(0, 50, size=20000)] + rng.normal(scale=0.6, size=(20000, 32))
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    queries = base[rng.choice(20000, size=300, replace=False)] + rng.normal(scale=0.05, size=(300, 32))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)

    exact = candidate_search(base, queries, 50, exact_up_to=20000, nprobe=32, recall_sample=100, seed=0)
    assert exact.method == "exact" and exact.recall == 1.0
    assert np.array_equal(exact.positions, inner_product_search(base, queries, 50)[1])

    approximate = candidate_search(base, queries, 50, exact_up_to=10000, nprobe=32, recall_sample=100, seed=0)
    assert approximate.method == "ivf" and ivf_lists(20000) == 282
    full = np.mean([len(set(found) & set(truth)) / 50
                    for found, truth in zip(approximate.positions, exact.positions, strict=True)])
    assert approximate.recall >= 0.9 and abs(approximate.recall - full) < 0.03
    fewer = candidate_search(base, queries, 50, exact_up_to=10000, nprobe=2, recall_sample=100, seed=0)
    assert fewer.recall < approximate.recall  # the recall reported follows what the search really found


def test_torch_search_ranks_as_faiss_flat_search_does(unit_vectors: np.ndarray) -> None:
    from components.faiss_device import torch_inner_product_search

    queries = unit_vectors[:40] + 0.01
    expected_scores, expected_positions = inner_product_search(unit_vectors, queries, 10)
    scores, positions = torch_inner_product_search(unit_vectors, queries, 10, device="cpu")
    assert np.array_equal(positions, expected_positions)
    assert np.allclose(scores, expected_scores, atol=1e-5)


def test_torch_search_pads_with_minus_one_where_fewer_rows_than_k(unit_vectors: np.ndarray) -> None:
    from components.faiss_device import torch_inner_product_search

    scores, positions = torch_inner_product_search(unit_vectors[:3], unit_vectors[:2], 5, device="cpu")
    assert (positions[:, 3:] == -1).all() and sorted(positions[0, :3].tolist()) == [0, 1, 2]
    assert np.isneginf(scores[:, 3:]).all()


def test_exact_search_uses_torch_on_a_cuda_machine_whose_faiss_has_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from components.faiss_device import exact_search_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert exact_search_device() == "torch-gpu"
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert exact_search_device() == "cpu"


def test_exact_search_stays_on_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from components.faiss_device import exact_search_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert exact_search_device() == "cpu"
