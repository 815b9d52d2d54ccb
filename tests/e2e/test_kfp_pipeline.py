"""Kubeflow Pipelines: the committed IR is current, and the whole pipeline really runs under `kfp.local`.

The local run uses the SubprocessRunner on this interpreter (no containers here), the smoke profile, and a
fresh copy of the project; its artifacts must match what `dvc repro` made of the same inputs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from components.artifacts import read_manifest
from pipelines.kfp_pipeline import COMPILED, compile_pipeline
from tests.e2e.project import assert_same_as_dvc, tracked_copy, use_profile


def test_the_committed_pipeline_ir_is_current(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == COMPILED.read_text(), (
        "pipelines/embedforge_pipeline.yaml is stale: run `python -m pipelines.kfp_pipeline compile` and commit it")


def test_train_and_distill_request_a_gpu_on_the_cuda_image() -> None:
    import yaml

    spec = yaml.safe_load(COMPILED.read_text())
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        container = executor["container"]
        gpu = name in ("exec-train", "exec-distill")
        assert container["image"] == ("embedforge-cuda:0.1.0" if gpu else "embedforge-cpu:0.1.0"), name
        assert ("accelerator" in container.get("resources", {})) is gpu, name
    assert set(executors) == {f"exec-{stage}" for stage in
                              ("curate", "mine", "train", "distill", "quantize", "index", "evaluate", "register")}


@pytest.fixture(scope="module")
def kfp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kfp import local

    from pipelines.kfp_pipeline import embedforge_pipeline

    project = tracked_copy(tmp_path_factory.mktemp("kfp"))
    use_profile(project, "smoke")
    root = project / "kfp_outputs"
    previous = Path.cwd()
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE")}
    os.environ |= {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    os.chdir(project)
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
        started = time.perf_counter()
        embedforge_pipeline(pipeline_run="kfp-smoke")
        print(f"kfp.local, smoke profile: {time.perf_counter() - started:.0f}s")
    finally:
        os.chdir(previous)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return root


def _output(root: Path, task: str, name: str) -> Path:
    matches = sorted(root.glob(f"*/{task}/{name}"))
    assert len(matches) == 1, f"expected one {task}/{name} under {root}, found {matches}"
    return matches[0]


@pytest.mark.slow
def test_every_stage_publishes_its_artifacts_and_metrics(kfp_run: Path) -> None:
    kinds = {("curate", "curated"): "curated_pairs", ("curate", "embeddings"): "embeddings", ("curate", "beir"): "beir",
             ("mine", "mined"): "mined_pairs", ("train", "teacher"): "sentence_transformer",
             ("distill", "student"): "sentence_transformer", ("quantize", "quantized"): "quantized_embeddings",
             ("index", "indexes"): "faiss_indexes", ("evaluate", "evaluation"): "evaluation"}
    for (task, name), kind in kinds.items():
        read_manifest(_output(kfp_run, task, name), kind=kind, schema_version=1)
    metrics = {task: _metrics(kfp_run, task) for task in
               ("curate", "mine", "train", "distill", "quantize", "index", "evaluate", "register")}
    assert metrics["curate"]["rows_out"] > 0 and metrics["mine"]["queries_mined"] > 0
    assert metrics["train"]["loss_end"] < metrics["train"]["loss_start"]
    assert metrics["quantize"]["student/encode_docs_per_s"] > 0 and metrics["index"]["indexes"] == 30
    assert 0 < metrics["evaluate"]["operating_point/ndcg@10"] <= 1
    assert metrics["register"]["gate/promoted"] == 1.0
    assert "## Operating point" in _output(kfp_run, "evaluate", "report").read_text()


def _metrics(root: Path, task: str) -> dict[str, float]:
    """What the task logged to its Output[Metrics] (KFP keeps it as the artifact's metadata)."""
    executor_output = json.loads(_output(root, task, "executor_output.json").read_text())
    return executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]


@pytest.mark.slow
def test_kfp_and_dvc_make_the_same_artifacts_and_metrics_of_the_smoke_profile(kfp_run: Path,
                                                                               dvc_smoke_results: Path) -> None:
    assert_same_as_dvc(dvc_smoke_results,
                       {"data/curated": _output(kfp_run, "curate", "curated"),
                        "data/mined": _output(kfp_run, "mine", "mined")},
                       _output(kfp_run, "evaluate", "evaluation") / "grid.json")
