"""export: a model as ONNX with int8 weights encodes like the model, loads wherever a model does, and is
served as the model it was exported from."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from components.artifact_types import MODEL, model_fingerprint
from components.artifacts import ArtifactError
from components.embed import load_model
from components.export import CHECK_TEXTS, OnnxTransformer, export_onnx, load_onnx, onnx_record
from tests.helpers import REPO_ROOT

ONNX_BACKEND_PYTHON = REPO_ROOT / ".venv-onnx-backend" / "bin" / "python"
# Run by sentence-transformers 5 with optimum-onnx: each file through `backend="onnx"`, one text a batch (as
# served: int8 activations are quantized over the whole input, so padding beside a longer text would move it).
_ENCODE_WITH_THE_ONNX_BACKEND = """
import json, sys
from sentence_transformers import SentenceTransformer
directory, texts = sys.argv[1], json.loads(sys.argv[2])
out = {}
for file_name in ("onnx/model.onnx", "onnx/model_qint8.onnx"):
    model = SentenceTransformer(directory, backend="onnx", model_kwargs={"file_name": file_name}, device="cpu")
    out[file_name] = {"runner": type(model[0].auto_model).__name__,
                      "embeddings": model.encode(texts, batch_size=1, normalize_embeddings=True).tolist()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export_onnx(str(tiny_model_dir), target)
    return target


def test_the_export_is_a_model_artifact_naming_its_source_with_float_and_int8_onnx_files(
        exported: Path, tiny_model_dir: Path) -> None:
    manifest = MODEL.read_manifest(exported)  # verifies every file
    record = onnx_record(exported)
    assert record["source_fingerprint"] == model_fingerprint(str(tiny_model_dir))
    assert {"onnx/model.onnx", "onnx/model_qint8.onnx"} <= set(manifest.files)
    assert record["bytes"]["qint8"] < record["bytes"]["float32"] / 2
    assert record["min_cosine_to_source"]["float32"] > 0.9999
    assert manifest.counts == {"dim": load_model(str(tiny_model_dir)).get_embedding_dimension()}  # a plain dir


@pytest.mark.parametrize(("variant", "floor"), [("float32", 0.9999), ("qint8", 0.98)])
def test_the_onnx_runtime_model_encodes_like_the_torch_model(exported: Path, tiny_model_dir: Path, variant: str,
                                                            floor: float) -> None:
    texts = [*CHECK_TEXTS, "a longer passage " * 30]  # past the sample's lengths: dynamic axes
    expected = load_model(str(tiny_model_dir)).encode(texts, normalize_embeddings=True, batch_size=3)
    model = load_onnx(exported, load_model(str(tiny_model_dir)), variant)
    got = model.encode(texts, normalize_embeddings=True, batch_size=3)
    assert got.shape == expected.shape
    assert np.min((got * expected).sum(axis=1)) > floor


def test_the_int8_export_runs_each_layer_as_fused_attention(exported: Path, tiny_model_dir: Path) -> None:
    layers = load_model(str(tiny_model_dir))[0].auto_model.config.num_hidden_layers
    assert onnx_record(exported)["fused_operators"]["Attention"] == layers
    assert not (exported / "onnx" / "fused.onnx").exists()  # the intermediate is not published


def test_a_text_encodes_the_same_alone_and_in_a_batch_run_side_by_side(exported: Path) -> None:
    model = load_onnx(exported, load_model(str(exported), onnx=False), threads=2)
    batch = [CHECK_TEXTS[0], "a longer passage " * 30, *CHECK_TEXTS[1:]]
    together = model.encode(batch, batch_size=len(batch))
    alone = np.stack([model.encode([text])[0] for text in batch])
    assert np.array_equal(together, alone)


def test_load_model_runs_an_export_with_onnx_runtime_and_int8_weights(exported: Path) -> None:
    model = load_model(str(exported))
    assert isinstance(model[0].model, OnnxTransformer)
    assert model[0].model.single.get_modelmeta() is not None
    assert "qint8" in json.dumps(onnx_record(exported)["files"])


def test_an_export_is_not_exported_again(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="already an ONNX export"):
        export_onnx(str(exported), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_model_published_with_onnx_int8_carries_its_export_and_loads_as_it(onnx_student_dir: Path,
                                                                             tiny_model_dir: Path) -> None:
    """distill's `onnx_int8`: the student artifact itself holds the checked export, and every load runs it
    unless asked for the torch weights (which MLflow's flavour saves)."""
    manifest = MODEL.read_manifest(onnx_student_dir)
    record = onnx_record(onnx_student_dir)
    assert {"onnx/model.onnx", "onnx/model_qint8.onnx"} <= set(manifest.files)
    assert "source_fingerprint" not in record and record["min_cosine_to_source"]["qint8"] > 0.98
    assert isinstance(load_model(str(onnx_student_dir))[0].model, OnnxTransformer)
    torch_weights = load_model(str(onnx_student_dir), onnx=False)
    assert not isinstance(torch_weights[0].model, OnnxTransformer)
    expected = load_model(str(tiny_model_dir)).encode(CHECK_TEXTS, normalize_embeddings=True)
    assert np.allclose(torch_weights.encode(CHECK_TEXTS, normalize_embeddings=True), expected, atol=1e-6)


def test_a_model_published_with_its_export_is_not_exported_again(onnx_student_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="already carries its int8 ONNX export"):
        export_onnx(str(onnx_student_dir), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_sentence_transformers_onnx_backend_loads_the_export_and_encodes_like_the_model(
        exported: Path, tiny_model_dir: Path) -> None:
    assert ONNX_BACKEND_PYTHON.is_file(), "no .venv-onnx-backend: run `bash scripts/setup.sh --tests`"
    texts = [*CHECK_TEXTS, "a longer passage " * 30]
    done = subprocess.run([str(ONNX_BACKEND_PYTHON), "-c", _ENCODE_WITH_THE_ONNX_BACKEND, str(exported),
                           json.dumps(texts)], env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    expected = load_model(str(tiny_model_dir)).encode(texts, normalize_embeddings=True)
    for file_name, floor in (("onnx/model.onnx", 0.9999), ("onnx/model_qint8.onnx", 0.98)):
        assert loaded[file_name]["runner"].startswith("ORTModel")  # optimum's ONNX Runtime model, not torch
        got = np.asarray(loaded[file_name]["embeddings"])
        assert np.min((got * expected).sum(axis=1)) > floor, file_name
