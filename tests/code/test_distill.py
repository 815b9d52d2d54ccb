"""distill: the student is a layer subset of the teacher, trained on nested dims, and bad params fail early."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components.artifacts import read_manifest
from components.config import ConfigError, build_config
from components.artifact_types import MATRYOSHKA_FILE
from components.data import GeneralText
from components.distill import (
    DistillConfig,
    DistillPaths,
    check_against_teacher,
    distill,
    distillation_texts,
    make_student,
    principal_axes,
)
from components.embed import load_model
from components.embed import truncate
from tests.code.faults import kill_at_first_checkpoint
from tests.conftest import build_tiny_model


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"matryoshka_dims": [128, 384]}, "descending"),
        ({"matryoshka_dims": [384, 384, 64]}, "distinct"),
        ({"matryoshka_dims": [384, 0]}, r"matryoshka_dims\.1: Input should be greater than 0"),
        ({"layers": [2, 0]}, "ascending"),
        ({"layers": []}, "layers"),
        ({"contrastive_weight": -1}, "contrastive_weight"),
    ],
)
def test_bad_distill_params_are_rejected_naming_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(DistillConfig, section, where="params.yaml:distill")


@pytest.mark.parametrize(
    ("layers", "dims", "message"),
    [
        ([0, 1, 2, 3, 4, 5], [384], "fewer layers than the teacher"),
        ([0, 7], [384], r"indices 0\.\.5"),
        ([0, 2], [256, 64], "must start at the teacher's dimension 384"),
    ],
)
def test_a_student_the_teacher_cannot_seed_is_refused(layers: list[int], dims: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_against_teacher(DistillConfig(layers=layers, matryoshka_dims=dims), teacher_layers=6, teacher_dim=384)


def test_the_student_keeps_exactly_the_requested_teacher_layers(tiny_teacher_dir: Path) -> None:
    teacher = load_model(str(tiny_teacher_dir))
    student = make_student(teacher, [0, 2])
    student_layers = student[0].auto_model.encoder.layer
    teacher_layers = teacher[0].auto_model.encoder.layer
    assert len(student_layers) == 2 and student[0].auto_model.config.num_hidden_layers == 2
    for kept, source in zip(student_layers, [teacher_layers[0], teacher_layers[2]], strict=True):
        for (name, value), (_, original) in zip(kept.state_dict().items(), source.state_dict().items(), strict=True):
            assert torch.equal(value, original), name
    assert len(teacher_layers) == 4  # the teacher itself is untouched


def _anisotropic_unit_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors whose variance is spread unevenly over randomly oriented axes, like real embeddings."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    vectors = (rng.normal(size=(count, dim)) * np.linspace(3.0, 0.1, dim)) @ basis.T + 0.5
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_the_principal_axes_rotation_keeps_every_cosine_and_moves_variance_to_the_leading_dims() -> None:
    vectors = _anisotropic_unit_vectors(500, 16)
    axes = principal_axes(vectors)
    rotated = vectors @ axes
    assert np.allclose(axes.T @ axes, np.eye(16), atol=1e-5)
    assert np.allclose(rotated @ rotated.T, vectors @ vectors.T, atol=1e-5)
    variances = rotated.var(axis=0)
    assert np.all(np.diff(variances) <= 1e-7)
    assert variances[:4].sum() > np.sort(vectors.var(axis=0))[::-1][:4].sum()


def test_the_principal_axes_do_not_depend_on_the_sign_the_eigen_solver_picks() -> None:
    vectors = _anisotropic_unit_vectors(300, 8)
    axes = principal_axes(vectors)
    assert np.all(axes[np.argmax(np.abs(axes), axis=0), np.arange(8)] > 0)
    assert np.array_equal(principal_axes(vectors.copy()), axes)


_AXES_IN_A_FRESH_PROCESS = """
import hashlib
import numpy as np
from components.distill import principal_axes
rng = np.random.default_rng(3)
vectors = (rng.normal(size=(2000, 384)) * np.linspace(3.0, 0.1, 384) + 0.5).astype(np.float32)
print(hashlib.sha256(principal_axes(vectors).tobytes()).hexdigest())
"""


def test_the_principal_axes_are_the_same_whichever_kernels_numpys_openblas_picks() -> None:
    """A container sees no OPENBLAS_CORETYPE where its host sets one; the student must not change with it."""
    def axes_digest(core_type: str) -> str:
        return subprocess.run([sys.executable, "-c", _AXES_IN_A_FRESH_PROCESS], check=True, capture_output=True,
                              text=True, env={**os.environ, "OPENBLAS_CORETYPE": core_type}).stdout.strip()

    assert axes_digest("Haswell") == axes_digest("Sandybridge")


def test_a_rotated_student_embeds_as_the_plain_student_followed_by_the_rotation(tiny_teacher_dir: Path) -> None:
    teacher = load_model(str(tiny_teacher_dir))
    rotation = principal_axes(_anisotropic_unit_vectors(200, teacher.get_embedding_dimension()))
    texts = ["a mail server", "a font package", "bindings for an XML parser"]
    plain = make_student(teacher, [0, 2]).encode(texts, normalize_embeddings=True)
    rotated = make_student(teacher, [0, 2], rotation).encode(texts, normalize_embeddings=True)
    assert np.allclose(plain @ rotation, rotated, atol=1e-5)


@pytest.mark.slow
def test_distill_publishes_a_matryoshka_student_whose_truncated_embeddings_are_unit_length(
    tmp_path: Path, tiny_teacher_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    config = DistillConfig(layers=[0, 2], matryoshka_dims=[32, 16, 8], batch_size=16, max_seq_length=32,
                           eval_steps=8, dev_queries=16, dev_corpus=32, learning_rate=1e-3,
                           general_text_share=0.0, onnx_int8=False)
    paths = DistillPaths(teacher=tiny_teacher_dir, mined=mined, curated=curated, output=tmp_path / "student",
                         checkpoints=tmp_path / "ckpt")
    metrics = distill(config, paths)
    assert metrics["student_layers"] == 2
    assert metrics["examples_per_s"] > 0
    assert ("gpu_peak_memory_gib" in metrics) == torch.cuda.is_available()
    shares = [metrics[f"target_variance_share_d{dim}"] for dim in (8, 16, 32)]
    assert shares[0] < shares[1] < shares[2] == pytest.approx(1.0)
    manifest = read_manifest(paths.output, kind="sentence_transformer", schema_version=1)
    assert manifest.counts == {"layers": 2, "dim": 32}
    assert manifest.extra["layers_from_teacher"] == [0, 2] and manifest.extra["pca_rotation"] is True
    assert json.loads((paths.output / MATRYOSHKA_FILE).read_text()) == {"matryoshka_dims": [32, 16, 8]}
    student = load_model(str(paths.output))
    vectors = student.encode(["a mail server", "a font package"], normalize_embeddings=True)
    for dim in (16, 8):
        assert np.allclose(np.linalg.norm(truncate(vectors, dim), axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_a_killed_distillation_resumes_from_its_checkpoint_to_the_same_student_as_an_uninterrupted_run(
    tmp_path: Path, tiny_teacher_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    section = DistillConfig(layers=[0, 2], matryoshka_dims=[32, 16], batch_size=16, max_seq_length=32, epochs=8,
                            eval_steps=20, dev_queries=16, dev_corpus=32, general_text_share=0.0,
                            onnx_int8=False).model_dump(mode="json")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"profile": "default", "distill": section}))
    checkpoints = tmp_path / "ckpt"
    command = [sys.executable, "-m", "components.distill", "--params", str(params), "--no-tracking",
               "--teacher", str(tiny_teacher_dir), "--mined", str(mined), "--curated", str(curated),
               "--output", str(tmp_path / "student"), "--checkpoints", str(checkpoints),
               "--metrics", str(tmp_path / "metrics.json")]
    exit_code = kill_at_first_checkpoint(command, checkpoints)
    assert exit_code == -signal.SIGKILL, "distillation finished before it could be killed; make it longer"
    assert not (tmp_path / "student").exists()

    second = subprocess.run(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=False,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed"] == 1.0

    uninterrupted = distill(DistillConfig(**section), DistillPaths(
        teacher=tiny_teacher_dir, mined=mined, curated=curated, output=tmp_path / "uninterrupted",
        checkpoints=tmp_path / "ckpt-uninterrupted"))
    assert metrics["steps"] == uninterrupted["steps"]
    # The trainer sums the losses of the steps this process ran over all steps: lower only if it really skipped.
    assert metrics["train_loss"] < uninterrupted["train_loss"]
    assert metrics["student_dev_ndcg@10"] == pytest.approx(uninterrupted["student_dev_ndcg@10"], abs=1e-6)
    texts = pd.read_parquet(curated / "pairs.parquet")["query"].head(32).tolist()
    resumed_vectors = load_model(str(tmp_path / "student")).encode(texts)
    uninterrupted_vectors = load_model(str(tmp_path / "uninterrupted")).encode(texts)
    assert np.abs(resumed_vectors - uninterrupted_vectors).max() < 1e-4


def test_the_bucketed_trainer_distils_a_matryoshka_student(
    tmp_path: Path, tiny_teacher_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    config = DistillConfig(trainer="bucketed", layers=[0, 2], matryoshka_dims=[32, 16, 8], batch_size=16,
                           max_seq_length=32, eval_steps=8, dev_queries=16, dev_corpus=32, learning_rate=1e-3,
                           general_text_share=0.0, onnx_int8=False)
    paths = DistillPaths(teacher=tiny_teacher_dir, mined=mined, curated=curated, output=tmp_path / "student",
                         checkpoints=tmp_path / "ckpt")
    metrics = distill(config, paths)
    assert metrics["student_layers"] == 2 and metrics["steps"] > 0 and metrics["examples_per_s"] > 0
    assert metrics["student_dev_ndcg@10"] > 0
    manifest = read_manifest(paths.output, kind="sentence_transformer", schema_version=1)
    assert manifest.counts == {"layers": 2, "dim": 32}
    assert json.loads((paths.output / MATRYOSHKA_FILE).read_text()) == {"matryoshka_dims": [32, 16, 8]}
    card = (paths.output / "README.md").read_text()
    assert "# embedforge student" in card and "usable prefixes: 32, 16, 8" in card


def test_the_general_share_of_the_distillation_texts_comes_from_the_general_input() -> None:
    debian = [f"debian {index}" for index in range(100)]
    general = [GeneralText(f"general {index}") for index in range(50)]
    general_texts = [entry.text for entry in general]
    mixed_debian, mixed_general = distillation_texts(debian, general, DistillConfig(distill_texts=40,
                                                                                    general_text_share=0.25))
    assert (len(mixed_debian), len(mixed_general)) == (30, 10)
    assert set(mixed_debian) <= set(debian) and set(mixed_general) <= set(general_texts)
    only_debian, none = distillation_texts(debian, general, DistillConfig(distill_texts=40, general_text_share=0))
    assert none == [] and only_debian == pd.Series(debian).sample(n=40, random_state=42).tolist()
    every_debian, capped = distillation_texts(debian, general, DistillConfig(distill_texts=None,
                                                                             general_text_share=0.5))
    assert sorted(every_debian) == sorted(debian) and sorted(capped) == sorted(general_texts)  # 100 wanted, 50 there


def test_general_titles_follow_their_sampled_texts_on_top_of_the_share() -> None:
    debian = [f"debian {index}" for index in range(100)]
    general = [GeneralText(f"word{index}: meaning {index}", title=f"word{index}") for index in range(40)]
    general.append(GeneralText("untitled: a text without a title"))
    config = DistillConfig(distill_texts=40, general_text_share=0.25, general_titles=True)
    _, mixed = distillation_texts(debian, general, config)
    texts, titles = mixed[:10], mixed[10:]
    assert titles == [text.split(":")[0] for text in texts if not text.startswith("untitled")]
    without_titles = distillation_texts(debian, general, config.model_copy(update={"general_titles": False}))[1]
    assert without_titles == texts  # the titles change no sample


def test_a_general_share_without_a_general_text_input_is_refused(
    tmp_path: Path, tiny_teacher_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    paths = DistillPaths(teacher=tiny_teacher_dir, mined=mined, curated=curated, output=tmp_path / "student",
                         checkpoints=tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="general_text_share is 0.3, but no general-text input"):
        distill(DistillConfig(layers=[0, 2], matryoshka_dims=[32, 16], general_text_share=0.3), paths)
    assert not paths.output.exists()


def test_a_student_distilled_on_general_text_with_base_targets_records_that_input(
    tmp_path: Path, training_inputs: tuple[Path, Path]
) -> None:
    from sentence_transformers import SentenceTransformer

    from components.artifact_types import Provenance, write_model
    from components.artifacts import file_sha256

    base = build_tiny_model(tmp_path / "base", layers=4)
    teacher = tmp_path / "teacher"
    write_model(SentenceTransformer(str(base), device="cpu"), teacher, Provenance("train", "test", {}), metrics={},
                extra={"base_model": str(base)})
    general = tmp_path / "texts.jsonl.gz"
    general.write_bytes(gzip.compress("".join(json.dumps({"text": f"word {index}: a general meaning"}) + "\n"
                                              for index in range(40)).encode()))
    curated, mined = training_inputs
    config = DistillConfig(trainer="bucketed", layers=[0, 2], matryoshka_dims=[32, 16], batch_size=16,
                           max_seq_length=32, eval_steps=8, dev_queries=16, dev_corpus=32, distill_texts=80,
                           general_text_share=0.25, general_targets="base")
    paths = DistillPaths(teacher=teacher, mined=mined, curated=curated, output=tmp_path / "student",
                         checkpoints=tmp_path / "ckpt", general_text=general)
    metrics = distill(config, paths)
    assert (metrics["distill_texts"], metrics["general_texts"]) == (80, 20)
    manifest = read_manifest(paths.output, kind="sentence_transformer", schema_version=1)
    assert manifest.inputs["general_text"] == file_sha256(general)
    assert file_sha256(general) in (paths.output / "README.md").read_text()
