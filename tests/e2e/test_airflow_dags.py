"""Airflow 3, for real: `airflow dags test` of the smoke profile, and a real Airflow triggered through its REST API.

Both run in a fresh copy of the project with their own AIRFLOW_HOME (sqlite) and MLflow store. `dags test` runs in
the `docker` mode, every stage a container of the CPU image on podman's Docker API, and must make the same
artifacts and metrics as `dvc repro`; the server run (the `local` mode, stage subprocesses) must take the conf of
its trigger request (a different SemDeDup eps), and a raw-data Asset event must queue a retraining run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.artifacts import read_manifest
from components.cli import STAGES
from components.stages import CURATE_STEPS, STEP_OUTPUT
from tests.e2e.airflow_server import DAG_ID, AirflowServer, airflow, airflow_env, wait_for
from tests.e2e.project import assert_same_as_dvc, tracked_copy, use_profile
from tests.helpers import pipeline_runs

pytestmark = pytest.mark.slow


def json_output(text: str) -> Any:
    """The JSON document a CLI printed last (Airflow logs its warnings to stdout before it)."""
    return json.loads(text.strip().splitlines()[-1])


def dag_pipeline_runs(project: Path, pipeline_key: str) -> tuple[Any, dict[str, Any]]:
    """The MLflow parent run of one DAG run and its nested runs by stage, from the project's local store."""
    from mlflow.tracking import MlflowClient

    return pipeline_runs(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), pipeline_key)


@pytest.fixture(scope="module")
def dags_test_run(tmp_path_factory: pytest.TempPathFactory, cpu_image: str,
                  docker_host: str) -> tuple[Path, str, dict[str, str]]:
    project = tracked_copy(tmp_path_factory.mktemp("airflow-dags-test"))
    use_profile(project, "smoke")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["airflow"] |= {"cpu_image": cpu_image, "cuda_image": cpu_image}  # no GPU here: all on the CPU image
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = airflow_env(tmp_path_factory.mktemp("airflow-home"), project, DOCKER_HOST=docker_host)
    airflow(env, "db", "migrate")
    started = time.perf_counter()
    airflow(env, "dags", "test", DAG_ID, "-c", json.dumps({"profile": "smoke", "mode": "docker"}), timeout=1200)
    print(f"airflow dags test, docker mode, smoke profile: {time.perf_counter() - started:.0f}s")
    (run,) = json_output(airflow(env, "dags", "list-runs", DAG_ID, "-o", "json"))
    states = {item["task_id"]: item["state"] for item in json_output(
        airflow(env, "tasks", "states-for-dag-run", DAG_ID, run["run_id"], "-o", "json"))}
    return project, run["run_id"], states


def test_dags_test_runs_every_stage_in_a_container_and_skips_the_other_modes(dags_test_run: tuple) -> None:
    _, _, states = dags_test_run
    assert {states[f"docker.{stage}"] for stage in STAGES} == {"success"}
    assert {states[f"docker.curate_{step}"] for step in CURATE_STEPS} == {"success"}
    assert {states[f"{mode}.{stage}"] for stage in STAGES for mode in ("local", "kubernetes")} == {"skipped"}
    assert states["plan"] == states["choose_mode"] == states["publish"] == "success"


def test_curate_fans_out_over_the_smoke_profiles_3_shards_with_expand(dags_test_run: tuple) -> None:
    """The per-shard steps were mapped over 3 shards (`.expand()`), each map index writing its shard's typed
    artifact under the run's directory; the others ran once."""
    project, _, _ = dags_test_run
    (run_dir,) = (project / "airflow_runs").iterdir()
    steps = run_dir / "curate_steps"
    for step, (_, per_shard) in CURATE_STEPS.items():
        outputs = [steps / STEP_OUTPUT[step] / f"{shard:05d}" for shard in range(3)] if per_shard else [
            steps / STEP_OUTPUT[step]]
        for path in outputs:
            assert (path / "manifest.json").is_file(), path
    assert not (steps / "prepared" / "00003").exists()


def test_dags_test_publishes_every_artifact_and_tracks_one_mlflow_run_per_dag_run(dags_test_run: tuple) -> None:
    project, run_id, _ = dags_test_run
    (run_dir,) = (project / "airflow_runs").iterdir()
    # every artifact of the table
    for port in [port for stage in STAGES.values() for port in stage.outputs if port.kind is not None]:
        read_manifest(run_dir / port.path, kind=port.kind.kind, schema_version=1)
    assert "## Operating point" in (run_dir / "reports/evaluation.md").read_text()
    assert {path.stem for path in (run_dir / "metrics").iterdir()} == set(STAGES)
    parent, children = dag_pipeline_runs(project, f"{DAG_ID}/{run_id}")
    assert set(children) == set(STAGES)
    assert children["register"].data.metrics["gate/promoted"] == 1.0


def test_dags_test_makes_the_same_artifacts_and_metrics_as_dvc_repro(dags_test_run: tuple,
                                                                     dvc_smoke_results: Path) -> None:
    project, _, _ = dags_test_run
    (run_dir,) = (project / "airflow_runs").iterdir()
    assert_same_as_dvc(dvc_smoke_results, {name: run_dir / name for name in ("data/curated", "data/mined")},
                       run_dir / "data/evaluation/grid.json")


def test_a_run_triggered_through_the_rest_api_succeeds_with_its_conf(airflow_server: AirflowServer,
                                                                      triggered_run: dict[str, Any]) -> None:
    assert triggered_run["state"] == "success", airflow_server.log.read_text()[-4000:]
    run_id = triggered_run["dag_run_id"]
    instances = airflow_server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
    states = {item["task_id"]: item["state"] for item in instances}
    assert {states[f"local.{stage}"] for stage in STAGES} == {"success"}
    plan = airflow_server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/plan/xcomEntries/return_value")
    assert "eps=0.1" in json.dumps(plan["value"])
    _, children = dag_pipeline_runs(airflow_server.project, f"{DAG_ID}/{run_id}")
    assert children["curate"].data.params["eps"] == "0.1"  # the trigger's conf reached the stage
    events = airflow_server.api("GET", "/assets/events", params={"source_dag_id": DAG_ID})["asset_events"]
    assert any(event["source_run_id"] == run_id and event["extra"].get("mlflow_run_id") for event in events)


def test_an_update_of_the_raw_data_asset_queues_a_retraining_run(airflow_server: AirflowServer,
                                                                triggered_run: dict[str, Any]) -> None:
    assets = airflow_server.api("GET", "/assets", params={"name_pattern": "embedforge-raw-pairs"})["assets"]
    (raw_pairs,) = assets
    airflow_server.api("POST", "/assets/events", json={"asset_id": raw_pairs["id"], "extra": {"why": "new data"}})
    queued = wait_for(lambda: [run for run in airflow_server.api("GET", f"/dags/{DAG_ID}/dagRuns")["dag_runs"]
                               if run["run_type"] == "asset_triggered"], "an asset-triggered run", 120,
                      airflow_server.log)
    # Stop it: a whole retraining on the shared test machine would only slow the tests that follow.
    airflow_server.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{queued[0]['dag_run_id']}", json={"state": "failed"})
