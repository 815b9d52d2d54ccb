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
from components.stages import IMAGES, STAGES
from pipelines.kfp_pipeline import COMPILED, compile_pipeline
from tests.e2e.project import assert_same_as_dvc, tracked_copy, use_profile


def test_the_committed_pipeline_ir_is_current(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == COMPILED.read_text(), (
        "pipelines/embedforge_pipeline.yaml is stale: run `python -m pipelines.kfp_pipeline compile` and commit it")


def test_the_gpu_stages_request_a_gpu_on_the_cuda_image_and_the_others_run_on_the_cpu_image() -> None:
    import yaml

    spec = yaml.safe_load(COMPILED.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{stage}" for stage in STAGES}
    for name, executor in executors.items():
        container = executor["container"]
        gpu = STAGES[name.removeprefix("exec-")].gpu
        assert container["image"] == IMAGES["cuda" if gpu else "cpu"], name
        assert ("accelerator" in container.get("resources", {})) is gpu, name


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
    for stage in STAGES.values():  # a task per stage, an output per artifact, named as in the table
        for port in [port for port in stage.outputs if port.kind is not None]:
            read_manifest(_output(kfp_run, stage.name, port.artifact), kind=port.kind.kind, schema_version=1)
    metrics = {task: _metrics(kfp_run, task) for task in STAGES}
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
