"""Airflow 3, for real: a real Airflow (`airflow standalone`: API server, scheduler, DAG processor) with one run
triggered through its REST API, and a raw-data Asset event that queues a retraining run.

The server runs over a fresh copy of the project with its own AIRFLOW_HOME (sqlite) and MLflow store. The trigger's
conf asks for the smoke profile in the `docker` mode (params.yaml says `local`): every stage a container of the CPU
image on podman's Docker API, the other modes' tasks skipped. The run must make the same artifacts and metrics as
`dvc repro`. (How each trigger-form knob becomes a stage's `--set` is tested on the DAG in tests/code; `airflow dags
test` runs the same tasks in one process, without the scheduler this run goes through.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from components.artifacts import read_manifest
from components.cli import STAGES
from components.stages import CURATE_STEPS, STEP_OUTPUT
from tests.e2e.airflow_server import DAG_ID, AirflowServer, wait_for
from tests.e2e.project import assert_same_as_dvc
from tests.helpers import pipeline_runs

pytestmark = pytest.mark.slow


def run_plan(server: AirflowServer, run: dict[str, Any]) -> dict[str, Any]:
    """What the run's `plan` task laid out (its XCom): the mode, the run's directory, each stage's command line."""
    path = f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/plan/xcomEntries/return_value"
    return server.api("GET", path)["value"]


def run_directory(server: AirflowServer, run: dict[str, Any]) -> Path:
    """Where the run wrote its artifacts: its own directory under `airflow.local_artifact_root`."""
    return Path(run_plan(server, run)["run_dir"])


def test_a_run_triggered_through_the_rest_api_runs_every_stage_in_a_container_as_its_conf_asks(
        airflow_server: AirflowServer, triggered_run: dict[str, Any]) -> None:
    assert triggered_run["state"] == "success", airflow_server.log.read_text()[-4000:]
    run_id = triggered_run["dag_run_id"]
    instances = airflow_server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances",
                                   params={"limit": 200})["task_instances"]
    states: dict[str, set[str]] = {}
    for item in instances:  # a mapped step has one instance per shard
        states.setdefault(item["task_id"], set()).add(item["state"])
    assert all(states[f"docker.{stage}"] == {"success"} for stage in STAGES)
    assert all(states[f"docker.curate_{step}"] == {"success"} for step in CURATE_STEPS)
    assert all(states[f"{mode}.{stage}"] == {"skipped"} for stage in STAGES for mode in ("local", "kubernetes"))
    assert states["plan"] == states["choose_mode"] == states["publish"] == {"success"}
    assert run_plan(airflow_server, triggered_run)["mode"] == "docker"


def test_curate_fans_out_over_the_smoke_profiles_3_shards_with_expand(airflow_server: AirflowServer,
                                                                     triggered_run: dict[str, Any]) -> None:
    """The per-shard steps were mapped over 3 shards (`.expand()`), each map index writing its shard's typed
    artifact under the run's directory; the others ran once."""
    steps = run_directory(airflow_server, triggered_run) / "curate_steps"
    for step, (_, per_shard) in CURATE_STEPS.items():
        outputs = [steps / STEP_OUTPUT[step] / f"{shard:05d}" for shard in range(3)] if per_shard else [
            steps / STEP_OUTPUT[step]]
        for path in outputs:
            assert (path / "manifest.json").is_file(), path
    assert not (steps / "prepared" / "00003").exists()


def test_the_run_publishes_every_artifact_and_tracks_one_mlflow_run_with_the_model_asset(
        airflow_server: AirflowServer, triggered_run: dict[str, Any]) -> None:
    run_dir = run_directory(airflow_server, triggered_run)
    for port in [port for stage in STAGES.values() for port in stage.outputs if port.kind is not None]:
        read_manifest(run_dir / port.path, kind=port.kind.kind, schema_version=1)
    assert "## Operating point" in (run_dir / "reports/evaluation.md").read_text()
    assert {path.stem for path in (run_dir / "metrics").iterdir()} == set(STAGES)
    from mlflow.tracking import MlflowClient

    run_id = triggered_run["dag_run_id"]
    client = MlflowClient(f"sqlite:///{airflow_server.project / 'mlflow.db'}")
    parent, children = pipeline_runs(client, f"{DAG_ID}/{run_id}")
    assert set(children) == set(STAGES)
    assert children["register"].data.metrics["gate/promoted"] == 1.0
    events = airflow_server.api("GET", "/assets/events", params={"source_dag_id": DAG_ID})["asset_events"]
    assert any(event["source_run_id"] == run_id and event["extra"].get("mlflow_run_id") == parent.info.run_id
               for event in events)


def test_the_run_makes_the_same_artifacts_and_metrics_as_dvc_repro(airflow_server: AirflowServer,
                                                                   triggered_run: dict[str, Any],
                                                                   dvc_smoke_results: Path) -> None:
    run_dir = run_directory(airflow_server, triggered_run)
    assert_same_as_dvc(dvc_smoke_results, {name: run_dir / name for name in ("data/curated", "data/mined")},
                       run_dir / "data/evaluation/grid.json")


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
