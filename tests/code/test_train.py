"""train: the teacher fine-tune learns, resumes after a kill, and refuses bad params before any work."""

from __future__ import annotations

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
from components.embed import load_model
from components.train import TrainConfig, TrainPaths, train, training_frame
from tests.code.faults import kill_at_first_checkpoint


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"loss": "triplet"}, r"loss.*'mnrl', 'cached_mnrl' or 'gist'"),
        ({"batch_size": 1}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"epochs": -1}, "epochs"),
        ({"lr": 0.1}, r"train\.lr"),
    ],
)
def test_bad_train_params_are_rejected_naming_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, section, where="params.yaml:train")


def test_asking_for_more_hard_negatives_than_mined_is_rejected() -> None:
    mined = pd.DataFrame({"query": ["q"], "positive": ["p"], "negative_1": ["n"], "negative_ids": [["x"]]})
    with pytest.raises(ConfigError, match=r"hard_negatives=2 but the mined data has 1"):
        training_frame(mined, TrainConfig(hard_negatives=2))


def test_training_frame_orders_columns_as_the_losses_expect() -> None:
    mined = pd.DataFrame({"query": ["q"], "positive": ["p"], "negative_1": ["n1"], "negative_2": ["n2"],
                          "negative_ids": [["a", "b"]]})
    assert list(training_frame(mined, TrainConfig(hard_negatives=2)).columns) == [
        "anchor", "positive", "negative_1", "negative_2"]
    assert list(training_frame(mined, TrainConfig(hard_negatives=0)).columns) == ["anchor", "positive"]


def _train_rows(mined: Path) -> int:
    return len(pd.read_parquet(mined / "pairs.parquet"))


def _tiny_config(model: Path, **overrides: object) -> TrainConfig:
    settings = {"base_model": str(model), "batch_size": 16, "epochs": 4, "learning_rate": 1e-3, "max_seq_length": 32,
                "eval_steps": 8, "dev_queries": 16, "dev_corpus": 32, "warmup_ratio": 0.0} | overrides
    return TrainConfig(**settings)


@pytest.mark.slow
def test_training_loss_falls_and_the_best_model_is_published(
    tmp_path: Path, tiny_model_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    paths = TrainPaths(mined=mined, curated=curated, output=tmp_path / "teacher", checkpoints=tmp_path / "ckpt")
    result = train(_tiny_config(tiny_model_dir), paths)
    assert result.metrics["loss_end"] < result.metrics["loss_start"]
    assert result.metrics["steps"] == 4 * (_train_rows(mined) // 16)
    assert ("gpu_peak_memory_gib" in result.metrics) == torch.cuda.is_available()
    manifest = read_manifest(paths.output, kind="sentence_transformer", schema_version=1)
    assert manifest.counts == {"layers": 2, "dim": 32}
    assert (paths.output / "model.safetensors").is_file()
    assert not paths.checkpoints.exists()  # cleaned up once the model is published


@pytest.mark.slow
def test_a_killed_training_run_resumes_from_its_checkpoint_to_the_same_model_as_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    params = tmp_path / "params.yaml"
    section = _tiny_config(tiny_model_dir, epochs=20, eval_steps=20).model_dump(mode="json")
    params.write_text(yaml.safe_dump({"profile": "default", "train": section}))
    checkpoints = tmp_path / "ckpt"
    command = [sys.executable, "-m", "components.train", "--params", str(params), "--no-tracking",
               "--mined", str(mined), "--curated", str(curated), "--output", str(tmp_path / "teacher"),
               "--checkpoints", str(checkpoints), "--metrics", str(tmp_path / "metrics.json")]
    exit_code = kill_at_first_checkpoint(command, checkpoints)
    assert exit_code == -signal.SIGKILL, "training finished before it could be killed; make it longer"
    assert not (tmp_path / "teacher").exists()  # nothing published by the killed run

    second = subprocess.run(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=False,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed"] == 1.0
    assert metrics["steps"] == 20 * (_train_rows(mined) // 16)
    assert "resuming from" in second.stderr
    read_manifest(tmp_path / "teacher", kind="sentence_transformer", schema_version=1)

    uninterrupted = train(TrainConfig(**section), TrainPaths(mined=mined, curated=curated,
                                                              output=tmp_path / "uninterrupted",
                                                              checkpoints=tmp_path / "ckpt-uninterrupted"))
    # The trainer sums the losses of the steps this process ran over all steps: lower only if it really skipped.
    assert metrics["train_loss"] < uninterrupted.metrics["train_loss"]
    # Same data order, RNG state and optimizer state after the resume: equal up to float summation order.
    assert metrics["dev_ndcg@10_best"] == pytest.approx(uninterrupted.metrics["dev_ndcg@10_best"], abs=1e-6)
    texts = pd.read_parquet(curated / "pairs.parquet")["query"].head(32).tolist()
    resumed_vectors = load_model(str(tmp_path / "teacher")).encode(texts)
    uninterrupted_vectors = load_model(str(tmp_path / "uninterrupted")).encode(texts)
    assert np.abs(resumed_vectors - uninterrupted_vectors).max() < 1e-4


def test_the_bucketed_trainer_learns_and_publishes_the_teacher_with_its_curve(
    tmp_path: Path, tiny_model_dir: Path, training_inputs: tuple[Path, Path]
) -> None:
    curated, mined = training_inputs
    paths = TrainPaths(mined=mined, curated=curated, output=tmp_path / "teacher", checkpoints=tmp_path / "ckpt")
    result = train(_tiny_config(tiny_model_dir, trainer="bucketed", hard_negatives=2), paths)
    assert result.metrics["loss_end"] < result.metrics["loss_start"]
    assert result.metrics["dev_ndcg@10_best"] >= result.metrics["dev_ndcg@10_before"]
    assert result.metrics["steps"] <= 4 * (_train_rows(mined) // 16)  # repeated texts can cost a batch
    assert result.metrics["pairs_per_s"] > 0 and result.metrics["resumed"] == 0.0
    card = (paths.output / "README.md").read_text()
    assert "# embedforge teacher" in card  # the project's model card, not sentence-transformers' generic one
    assert read_manifest(curated, kind="curated_pairs", schema_version=1).fingerprint in card
    assert [step for step, _ in result.loss_history] == sorted(step for step, _ in result.loss_history)
    manifest = read_manifest(paths.output, kind="sentence_transformer", schema_version=1)
    assert manifest.counts == {"layers": 2, "dim": 32}
    assert load_model(str(paths.output)).max_seq_length == 128  # published at the base model's length
