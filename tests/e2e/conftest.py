"""A real Airflow server and one REST-triggered smoke run on it, every stage in a container; the CPU image and a
Docker API (podman) socket.

The `dvc repro` smoke run that every orchestrator's end-to-end test is compared against (`dvc_smoke_project`,
`dvc_smoke_results`) lives in tests/conftest.py, so that tests/model shares the same single run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.airflow_server import DAG_ID, AirflowServer, running_airflow, wait_for
from tests.e2e.containers import build_cpu_image, podman_socket
from tests.e2e.project import tracked_copy, use_profile


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """The CPU image, built by containers/build.sh once per session."""
    return build_cpu_image()


@pytest.fixture(scope="session")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DOCKER_HOST of a podman Docker API socket for this session."""
    with podman_socket(tmp_path_factory.mktemp("podman")) as host:
        yield host


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory: pytest.TempPathFactory, cpu_image: str,
                   docker_host: str) -> Iterator[AirflowServer]:
    """A real Airflow (`airflow standalone`) on 127.0.0.1 over a fresh smoke-profile copy of the project, with
    podman's Docker API for the `docker` mode, whose stages all run on the CPU image (no GPU here)."""
    project = tracked_copy(tmp_path_factory.mktemp("airflow-server"))
    use_profile(project, "smoke")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["airflow"] |= {"cpu_image": cpu_image, "cuda_image": cpu_image}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with running_airflow(project, tmp_path_factory.mktemp("airflow-server-home"), DOCKER_HOST=docker_host) as server:
        yield server


@pytest.fixture(scope="session")
def triggered_run(airflow_server: AirflowServer) -> dict[str, Any]:
    """A run triggered through the REST API whose conf picks the smoke profile and the `docker` mode (params.yaml
    says `local`), waited for until it ends: the scheduler runs the fanned-out curate steps side by side."""
    run = airflow_server.api("POST", f"/dags/{DAG_ID}/dagRuns",
                             json={"logical_date": None, "conf": {"profile": "smoke", "mode": "docker"}})
    started = time.perf_counter()

    def finished() -> dict[str, Any] | None:
        state = airflow_server.api("GET", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}")
        return state if state["state"] in ("success", "failed") else None

    result = wait_for(finished, "the triggered run to finish", 1200, airflow_server.log)
    print(f"airflow standalone, REST-triggered smoke run, docker mode: {time.perf_counter() - started:.0f}s")
    return result
