"""quantize: int8 calibration and round trip, binary packing, the artifact and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from components import artifacts
from components.config import ConfigError, build_config
from components.artifact_types import (
    binary_codes,
    calibration_ranges,
    dequantize_int8,
    int8_codes,
    read_quantized,
)
from components.quantize import QuantizeConfig
from tests.helpers import random_unit_vectors


def test_int8_round_trip_error_is_at_most_half_a_bucket_inside_the_calibrated_range() -> None:
    calibration, vectors = random_unit_vectors(2000, 64, seed=0), random_unit_vectors(500, 64, seed=1)
    ranges = calibration_ranges(calibration)
    clipped = np.clip(vectors, ranges[0], ranges[1])
    error = np.abs(dequantize_int8(int8_codes(vectors, ranges), ranges) - clipped)
    half_bucket = (ranges[1] - ranges[0]) / 255 / 2
    assert np.all(error <= half_bucket + 1e-6)
    cosine = np.sum(dequantize_int8(int8_codes(vectors, ranges), ranges) * vectors, axis=1) / np.linalg.norm(
        dequantize_int8(int8_codes(vectors, ranges), ranges), axis=1)
    assert cosine.min() > 0.99


def test_int8_values_outside_the_calibrated_range_are_clipped_not_wrapped() -> None:
    ranges = np.array([[-0.1, -0.1], [0.1, 0.1]], dtype=np.float32)
    codes = int8_codes(np.array([[5.0, -5.0]], dtype=np.float32), ranges)
    assert codes.tolist() == [[127, -128]]


def test_binary_codes_pack_sign_bits_into_one_byte_per_8_dims() -> None:
    vectors = np.array([[1, -1, 1, -1, 1, -1, 1, -1, -1, -1, -1, -1, -1, -1, -1, 1]], dtype=np.float32)
    codes = binary_codes(vectors)
    assert codes.dtype == np.uint8 and codes.shape == (1, 2)
    assert codes.tolist() == [[0b10101010, 0b00000001]]


@pytest.mark.parametrize("dims", [[384, 100], [64, 128], [64, 64], []])
def test_dims_that_are_not_descending_multiples_of_8_are_refused(dims: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"quantize\.dims: .*multiples of 8"):
        build_config(QuantizeConfig, {"dims": dims}, where="quantize")


def test_the_artifact_holds_every_precision_per_dim_and_the_calibration(retrieval_stack: dict[str, Path]) -> None:
    quantized = read_quantized(retrieval_stack["quantized"])
    assert quantized.dims("student") == [32, 16, 8]
    documents = len(quantized.doc_ids)
    for dim in (32, 16, 8):
        floats = quantized.float32("student", dim)
        assert floats.shape == (documents, dim)
        assert np.allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-5)
        assert quantized.int8("student", dim).dtype == np.int8
        assert quantized.ubinary("student", dim).shape == (documents, dim // 8)
        assert np.array_equal(quantized.int8("student", dim), int8_codes(floats, quantized.ranges("student", dim)))
    calibration = json.loads((retrieval_stack["quantized"] / "student" / "calibration.json").read_text())
    assert calibration["calibration_texts"] == 100 and calibration["source"] == "curated train passages"
    assert quantized.models["student"]["encode_docs_per_s"] > 0


def test_a_dim_that_was_not_quantized_is_refused_with_the_fix(retrieval_stack: dict[str, Path]) -> None:
    quantized = read_quantized(retrieval_stack["quantized"])
    with pytest.raises(artifacts.ArtifactError, match=r"quantized at dims \[32, 16, 8\], not 24; add 24 to quantize.dims"):
        quantized.int8("student", 24)
    with pytest.raises(artifacts.ArtifactError, match=r"no embeddings of model 'teacher'"):
        quantized.float32("teacher", 32)


def test_missing_calibration_or_wrong_kind_is_refused(retrieval_stack: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "quantized"
    shutil.copytree(retrieval_stack["quantized"], copy)
    (copy / "student" / "calibration.json").unlink()
    with pytest.raises(artifacts.ArtifactError, match=r"content does not match its manifest.*calibration\.json"):
        read_quantized(copy)
    with pytest.raises(artifacts.ArtifactError, match=r"expected an artifact of kind 'quantized_embeddings', found "
                                                      r"'curated_pairs'"):
        read_quantized(retrieval_stack["curated"])
