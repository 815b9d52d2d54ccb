"""index: every type is built, sized honestly, holds the calibrated codes, and loads without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.evaluate import EvaluateConfig, make_searcher, rescore
from components.artifact_types import (
    IndexRecord,
    binary_codes,
    calibration_ranges,
    dequantize_int8,
    int8_codes,
    read_index,
    read_indexes,
    read_quantized,
)
from tests.helpers import random_unit_vectors, unit_rows


def records_by(stack: dict[str, Path]) -> dict[tuple[int, str], IndexRecord]:
    return {(record.dim, record.type): record for record in read_indexes(stack["index"]).records}


def test_every_type_is_built_for_every_dim_with_its_own_manifest(retrieval_stack: dict[str, Path]) -> None:
    records = records_by(retrieval_stack)
    types = {"float_flat", "float_hnsw", "int8_flat", "binary_flat", "binary_hnsw"}
    assert set(records) == {(dim, kind) for dim in (32, 16, 8) for kind in types}
    for (dim, kind), record in records.items():
        assert (record.model, record.vectors) == ("student", 96)
        assert (retrieval_stack["index"] / record.file).stat().st_size == record.file_bytes
        assert record.build_seconds >= 0 and (retrieval_stack["index"] / record.file).with_suffix(".json").is_file()


@pytest.mark.parametrize("dim", [32, 16, 8])
def test_binary_vectors_take_exactly_1_32_of_the_float_bytes(retrieval_stack: dict[str, Path], dim: int) -> None:
    records = records_by(retrieval_stack)
    assert records[(dim, "binary_flat")].vector_bytes * 32 == records[(dim, "float_flat")].vector_bytes
    assert records[(dim, "int8_flat")].vector_bytes * 4 == records[(dim, "float_flat")].vector_bytes


def test_the_8bit_index_holds_exactly_the_calibrated_int8_codes(retrieval_stack: dict[str, Path]) -> None:
    indexes, quantized = read_indexes(retrieval_stack["index"]), read_quantized(retrieval_stack["quantized"])
    index = read_index(indexes, records_by(retrieval_stack)[(16, "int8_flat")])
    floats = quantized.float32("student", 16)
    stored = index.sa_encode(dequantize_int8(quantized.int8("student", 16), quantized.ranges("student", 16)))
    assert np.array_equal(stored.astype(np.int16) - 128, quantized.int8("student", 16))
    # faiss's own encoder agrees with the calibrated codes up to float rounding exactly at bucket edges
    difference = index.sa_encode(floats).astype(np.int16) - 128 - quantized.int8("student", 16)
    assert np.abs(difference).max() <= 1 and np.mean(difference == 0) > 0.99


def test_flat_float_search_finds_each_document_itself(retrieval_stack: dict[str, Path]) -> None:
    indexes, quantized = read_indexes(retrieval_stack["index"]), read_quantized(retrieval_stack["quantized"])
    record = records_by(retrieval_stack)[(32, "float_flat")]
    floats = quantized.float32("student", 32)
    searcher = make_searcher(read_index(indexes, record), record.type, None, EvaluateConfig())
    _, positions = searcher(floats, binary_codes(floats), 1)
    assert positions[:, 0].tolist() == list(range(len(floats)))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("store", ["float32", "int8"])
def test_rescoring_never_lowers_recall_against_binary_alone(store: str) -> None:
    import faiss

    documents = random_unit_vectors(3000, 64, seed=3)
    queries = truncate_noisy(documents[:200], seed=4)
    truth = np.argsort(-(queries @ documents.T), axis=1)[:, :10]
    index = faiss.IndexBinaryFlat(64)
    index.add(binary_codes(documents))
    _, alone = index.search(binary_codes(queries), 10)
    _, candidates = index.search(binary_codes(queries), 40)
    ranges = calibration_ranges(random_unit_vectors(2000, 64, seed=5))
    vectors = documents if store == "float32" else dequantize_int8(int8_codes(documents, ranges), ranges)
    _, rescored = rescore(queries, candidates, vectors, 10)
    assert recall_at(rescored, truth) > recall_at(alone, truth)  # never lower; on random vectors clearly higher


def truncate_noisy(vectors: np.ndarray, seed: int) -> np.ndarray:
    noisy = vectors + np.random.default_rng(seed).normal(scale=0.05, size=vectors.shape).astype(np.float32)
    return unit_rows(noisy)


def test_rescoring_ignores_missing_candidates() -> None:
    documents = np.eye(3, dtype=np.float32)
    scores, ids = rescore(documents[:1], np.array([[-1, 2, 0, -1]]), documents, 3)
    assert ids.tolist() == [[0, 2, -1]] and scores[0, 0] == 1.0 and scores[0, 2] == -np.inf


def test_index_names_from_the_manifest_or_records_cannot_reach_outside_the_artifact(
    retrieval_stack: dict[str, Path], tmp_path: Path
) -> None:
    import dataclasses
    import json
    import re
    import shutil

    from components.artifacts import MANIFEST, ArtifactError

    copy = tmp_path / "index"
    shutil.copytree(retrieval_stack["index"], copy)
    (tmp_path / "outside.json").write_text("{}")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["extra"]["indexes"][0] = "../outside.faiss"  # extra is not hashed: only the names it lists are trusted
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(f"{copy}: no file '../outside.json' in its manifest")):
        read_indexes(copy)
    indexes = read_indexes(retrieval_stack["index"])
    escaping = dataclasses.replace(indexes.records[0], file="../quantized/student/float32.npy")
    with pytest.raises(ArtifactError, match=r"no file '\.\./quantized/student/float32\.npy' in its manifest"):
        read_index(indexes, escaping)


def test_binary_ivf_counts_its_ids_and_finds_what_binary_flat_finds_when_it_probes_every_list() -> None:
    """The inverted-list index over bits: 1/32 of the float bytes plus an 8-byte id per vector, and with
    nprobe = all lists exactly the Hamming neighbours of the flat binary index (more lists, less work)."""
    import faiss

    from components.faiss_device import ivf_lists
    from components.artifact_types import binary_ivf_index
    from components.index import code_bytes

    documents = random_unit_vectors(4000, 64, seed=7)
    codes = binary_codes(documents)
    index = binary_ivf_index(codes, 64)
    assert code_bytes(index) == 64 // 8 + 8 and index.nlist == ivf_lists(4000)
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes)
    queries = binary_codes(truncate_noisy(documents[:50], seed=8))
    record = IndexRecord(model="m", dim=64, type="binary_ivf", precision="binary", vectors=4000, vector_bytes=0,
                         file_bytes=0, build_seconds=0.0, file="m/d64/binary_ivf.faiss")
    searcher = make_searcher(index, record.type, None, EvaluateConfig(ivf_nprobe=index.nlist))
    distances, _ = searcher(None, queries, 10)
    assert np.array_equal(-distances, flat.search(queries, 10)[0])
    make_searcher(index, record.type, None, EvaluateConfig(ivf_nprobe=4))
    assert index.nprobe == 4
