"""Kubeflow Pipelines: the committed IR is current, and the whole pipeline really runs under `kfp.local`.

The local run puts every task in a container of the CPU image (kfp.local's DockerRunner on podman's Docker API),
with the smoke profile and a fresh copy of the project; its artifacts must match what `dvc repro` made of the same
inputs. Failures: a task whose container exits non-zero fails the run with its message and publishes nothing;
a missing socket or image is named with what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.artifact_types import CLUSTERED, CURATE_PLAN, EMBEDDED_SHARD, NEAR_DUPLICATES, PREPARED_SHARD
from components.artifacts import read_manifest
from components.config import load_stage_config
from components.curate import CurateConfig
from components.stages import CURATE_STEPS, IMAGES, STAGES, STEP_OUTPUT
from pipelines.kfp_pipeline import COMPILED, compile_pipeline
from tests.e2e.project import assert_same_as_dvc, tracked_copy, use_profile
from tests.helpers import REPO_ROOT, pipeline_runs

SMOKE_SHARDS = load_stage_config(CurateConfig, "curate", REPO_ROOT / "params.yaml", "smoke").shards


def test_the_committed_pipeline_ir_is_current(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == COMPILED.read_text(), (
        "pipelines/embedforge_pipeline.yaml is stale: run `python -m pipelines.kfp_pipeline compile` and commit it")


def test_the_gpu_stages_request_a_gpu_on_the_cuda_image_and_the_others_run_on_the_cpu_image() -> None:
    import yaml

    spec, _ = yaml.safe_load_all(COMPILED.read_text())  # the pipeline spec, then the Kubernetes platform spec
    executors = spec["deploymentSpec"]["executors"]
    steps = {f"exec-curate-{step}" for step in (*CURATE_STEPS, "shards")}  # curate's fanned-out steps: CPU
    assert set(executors) == {f"exec-{stage}" for stage in STAGES} | steps
    for name, executor in executors.items():
        container = executor["container"]
        gpu = name not in steps and STAGES[name.removeprefix("exec-")].gpu
        assert container["image"] == IMAGES["cuda" if gpu else "cpu"], name
        assert ("accelerator" in container.get("resources", {})) is gpu, name


def run_local(project: Path, root: Path, docker_host: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m pipelines.kfp_pipeline run-local --runner docker ...` in the project copy, as a user runs it."""
    command = [sys.executable, "-m", "pipelines.kfp_pipeline", "run-local", "--runner", "docker",
               "--pipeline-root", str(root), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", *args]
    return subprocess.run(command, cwd=project, env={**os.environ, "DOCKER_HOST": docker_host}, capture_output=True,
                          text=True, timeout=1800)


@pytest.fixture(scope="module")
def kfp_run(tmp_path_factory: pytest.TempPathFactory, cpu_image: str, docker_host: str) -> Path:
    """The smoke profile under kfp.local's DockerRunner: every task a container of the CPU image (train and
    distill too, without their GPU request), the raw pairs and params.yaml mounted read-only, the artifacts on
    the bind-mounted pipeline root."""
    project = tracked_copy(tmp_path_factory.mktemp("kfp"))
    use_profile(project, "smoke")
    root = project / "kfp_outputs"
    root.mkdir()
    started = time.perf_counter()
    result = run_local(project, root, docker_host, "--image", cpu_image, "--pipeline-run", "kfp-smoke",
                       "-p", "profile=smoke")
    print(f"kfp.local DockerRunner, smoke profile: {time.perf_counter() - started:.0f}s")
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    tasks = len(STAGES) + 1 + sum(SMOKE_SHARDS if per_shard else 1 for _, per_shard in CURATE_STEPS.values())
    assert result.stdout.count(f"Found image {cpu_image!r}") == tasks, "every task runs in the CPU image"
    return root


def _output(root: Path, task: str, name: str) -> Path:
    matches = sorted(root.glob(f"*/{task}/{name}"))
    assert len(matches) == 1, f"expected one {task}/{name} under {root}, found {matches}"
    return matches[0]


@pytest.mark.slow
def test_curate_fans_out_over_the_smoke_profiles_shards_with_parallel_for(kfp_run: Path) -> None:
    """Each per-shard step ran once per shard as a ParallelFor iteration, each publishing its typed artifact;
    the steps that take every shard ran once (their outputs merged into the curate task's, compared with dvc's
    single-process result below)."""
    assert SMOKE_SHARDS == 3
    kinds = {"prepare": PREPARED_SHARD, "plan": CURATE_PLAN, "embed": EMBEDDED_SHARD, "cluster": CLUSTERED,
             "dedup": NEAR_DUPLICATES}
    for step, (_, per_shard) in CURATE_STEPS.items():
        outputs = sorted(kfp_run.glob(f"**/curate-{step}/{STEP_OUTPUT[step]}"))
        assert len(outputs) == (SMOKE_SHARDS if per_shard else 1), step
        assert all("iteration-" in path.parent.parent.name for path in outputs) == per_shard, step
        for path in outputs:
            kinds[step].read_manifest(path)


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


@pytest.mark.slow
def test_the_ui_gets_headline_metrics_and_self_contained_report_and_plots(kfp_run: Path) -> None:
    shown = _metrics(kfp_run, "evaluate")
    assert {"operating_point/ndcg@10", "student/ndcg@10", "student/ood_ndcg@10", "queries"} <= set(shown)
    assert not [key for key in shown if "_flat" in key or key.startswith("ood/")]  # the grid stays a dataset
    assert (_output(kfp_run, "evaluate", "evaluation") / "grid.json").is_file()
    report = _output(kfp_run, "evaluate", "report").read_text()
    assert "## Operating point" in report and report.count("](data:image/png;base64,") == 2
    assert "](data:image/png;base64," in _output(kfp_run, "mine", "mine_plot").read_text()
    assert "### curate_drops\n\n| " in _output(kfp_run, "curate", "curate_plot").read_text()
    assert "### ndcg_vs_dim\n\n| " in _output(kfp_run, "evaluate", "plots").read_text()


@pytest.mark.slow
def test_every_task_tracks_under_one_mlflow_parent_run_keyed_by_the_run(kfp_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    _, children = pipeline_runs(MlflowClient(f"sqlite:///{kfp_run / 'mlflow.db'}"), "kfp-smoke")
    assert set(children) == set(STAGES)


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


@pytest.mark.slow
def test_a_task_whose_container_exits_non_zero_fails_the_run_and_publishes_nothing(
        tmp_path: Path, cpu_image: str, docker_host: str) -> None:
    root = tmp_path / "kfp_outputs"
    root.mkdir()
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("this is not JSON\n")
    result = run_local(tmp_path, root, docker_host, "--image", cpu_image, "-p", "profile=smoke",
                       "-p", f"raw_pairs={bad}", "-p", "params=params.yaml")
    assert result.returncode != 0
    assert "kfp run-local: " in result.stderr and "curate" in result.stderr
    assert str(bad) in result.stdout  # the stage's own message, from inside the container, names the input
    assert not list(root.glob("*/curate/curated/manifest.json")), "a failed task must not publish its artifact"
    assert not list(root.glob("*/mine")), "nothing runs after the failed task"


def test_a_missing_docker_socket_or_image_is_named_with_what_to_do(tmp_path: Path, docker_host: str) -> None:
    no_socket = run_local(REPO_ROOT, tmp_path, f"unix://{tmp_path}/none.sock")
    assert no_socket.returncode != 0 and "no Docker API at unix://" in no_socket.stderr
    assert "podman system service" in no_socket.stderr
    no_image = run_local(REPO_ROOT, tmp_path, docker_host, "--image", "localhost/embedforge-none:0.0.0")
    assert no_image.returncode != 0 and "image localhost/embedforge-none:0.0.0 is not on the engine" in no_image.stderr
    assert "containers/build.sh" in no_image.stderr
