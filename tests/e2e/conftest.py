"""The `dvc repro` smoke run that every orchestrator's end-to-end test is compared against (run once a session)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.airflow_server import DAG_ID, AirflowServer, running_airflow, wait_for
from tests.e2e.project import SMOKE_RESULTS, run_dvc, save_smoke_results, tracked_copy, use_profile


@pytest.fixture(scope="session")
def dvc_smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the project after `dvc repro` of the smoke profile (tests may go on changing it)."""
    project = tracked_copy(tmp_path_factory.mktemp("smoke"))
    use_profile(project, "smoke")
    started = time.perf_counter()
    result = run_dvc(project, "repro")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"dvc repro, smoke profile: {time.perf_counter() - started:.0f}s")
    save_smoke_results(project)
    return project


@pytest.fixture(scope="session")
def dvc_smoke_results(dvc_smoke_project: Path) -> Path:
    """Metrics and manifests of that run, saved before any test changed the project."""
    return SMOKE_RESULTS


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowServer]:
    """A real Airflow (`airflow standalone`) on 127.0.0.1 over a fresh smoke-profile copy of the project."""
    project = tracked_copy(tmp_path_factory.mktemp("airflow-server"))
    use_profile(project, "smoke")
    with running_airflow(project, tmp_path_factory.mktemp("airflow-server-home")) as server:
        yield server


@pytest.fixture(scope="session")
def triggered_run(airflow_server: AirflowServer) -> dict[str, Any]:
    """A run triggered through the REST API with a conf override, waited for until it ends."""
    run = airflow_server.api("POST", f"/dags/{DAG_ID}/dagRuns",
                             json={"logical_date": None, "conf": {"profile": "smoke", "eps": 0.1}})
    started = time.perf_counter()

    def finished() -> dict[str, Any] | None:
        state = airflow_server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}")
        return state if state["state"] in ("success", "failed") else None

    result = wait_for(finished, "the triggered run to finish", 1200, airflow_server.log)
    print(f"airflow standalone, REST-triggered smoke run: {time.perf_counter() - started:.0f}s")
    return result
