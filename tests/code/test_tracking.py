"""Tracking: the parent run tells whether the pipeline is running, failed or finished, and each stage run
records what it read and wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import tracking


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "pipeline-under-test")
    monkeypatch.chdir(tmp_path)
    return uri


def _parent_status(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    return tracking.find_pipeline_run(MlflowClient(uri), "pipeline-under-test").info.status


def test_the_parent_run_is_running_until_the_last_stage_and_failed_when_a_stage_fails(store: str,
                                                                                    tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    with tracking.stage_run("curate", {}, params_path=params, final=False):
        assert _parent_status(store) == "RUNNING"
    assert _parent_status(store) == "RUNNING"
    with pytest.raises(RuntimeError), tracking.stage_run("mine", {}, params_path=params, final=False):
        raise RuntimeError("mine broke")
    assert _parent_status(store) == "FAILED"
    with tracking.stage_run("mine", {}, params_path=params, final=False):  # the retry
        assert _parent_status(store) == "RUNNING"
    with tracking.stage_run("register", {}, params_path=params, final=True):
        pass
    assert _parent_status(store) == "FINISHED"


def test_a_stage_run_records_its_artifacts_as_datasets_with_their_fingerprints(store: str, tmp_path: Path) -> None:
    import mlflow

    fingerprint = "ab" * 32
    with tracking.stage_run("index", {}, params_path=tmp_path / "params.yaml", final=False) as run_id:
        tracking.log_datasets([
            tracking.ArtifactDataset("quantized", str(tmp_path / "data/quantized"), fingerprint, "input"),
            tracking.ArtifactDataset("indexes", "s3://bucket/runs/1/index", "cd" * 32, "output")])
    inputs = mlflow.get_run(run_id).inputs.dataset_inputs
    logged = {item.dataset.name: item for item in inputs}
    assert logged["quantized"].dataset.digest == fingerprint[:tracking.DATASET_DIGEST_CHARS]
    assert {tag.key: tag.value for tag in logged["quantized"].tags} == {
        "mlflow.data.context": "input", "embedforge.fingerprint": fingerprint}
    assert str(tmp_path / "data/quantized") in logged["quantized"].dataset.source
    assert logged["indexes"].dataset.source_type == "s3"


def test_trainer_log_lines_become_metric_histories_at_their_step(store: str, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from components.training import DEV_METRIC, mlflow_curves

    curves = mlflow_curves()
    with tracking.stage_run("train", {}, params_path=tmp_path / "params.yaml", final=False) as run_id:
        for step, logs in [(2, {"loss": "0.43", "learning_rate": 1e-5, "epoch": 0.1}),
                           (4, {"loss": 0.21, "grad_norm": "6.1", "epoch": 0.2}),
                           (4, {DEV_METRIC: 0.61, "eval_runtime": 1.0})]:
            curves.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
    client = MlflowClient(store)
    history = {name: [(point.step, point.value) for point in client.get_metric_history(run_id, name)]
               for name in ("train/loss", "train/learning_rate", "train/grad_norm", "dev/ndcg_at_10")}
    assert history == {"train/loss": [(2, 0.43), (4, 0.21)], "train/learning_rate": [(2, 1e-5)],
                       "train/grad_norm": [(4, 6.1)], "dev/ndcg_at_10": [(4, 0.61)]}
