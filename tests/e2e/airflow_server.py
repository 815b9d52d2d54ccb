"""An Airflow 3 of its own for end-to-end tests: a real server in a temporary AIRFLOW_HOME.

`running_airflow` starts `airflow standalone` (API server and UI, scheduler, DAG processor, triggerer) on
127.0.0.1 with a real user and password, waits until the DAG is parsed, and stops the whole process group after.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from tests.servers import _server, free_port

DAG_ID = "embedforge_retrain"
BIN = Path(sys.executable).parent
T = TypeVar("T")


def airflow_env(home: Path, project: Path, **settings: str) -> dict[str, str]:
    """Home and sqlite database in `home`, the project's DAGs, the project's MLflow store, nothing paused."""
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **settings}
    env.pop("EMBEDFORGE_PIPELINE_RUN", None)
    return env


def wait_for(condition: Callable[[], T], what: str, timeout: float, log: Path) -> T:
    """Poll `condition` until it returns something truthy; on timeout fail with the server log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if result := condition():
                return result
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; log tail:\n{log.read_text()[-4000:]}")


@dataclass(frozen=True)
class AirflowServer:
    url: str
    username: str
    password: str
    token: str
    project: Path
    log: Path

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One REST API v2 call with the user's token; fails the test on an error status."""
        response = requests.request(method, f"{self.url}/api/v2{path}", timeout=30,
                                    headers={"Authorization": f"Bearer {self.token}"}, **kwargs)
        assert response.ok, f"{method} {path}: {response.status_code} {response.text[:2000]}"
        return response.json()


@contextlib.contextmanager
def running_airflow(project: Path, home: Path, **settings: str) -> Iterator[AirflowServer]:
    """`airflow standalone` over `project`, with `settings` added to its environment (e.g. DOCKER_HOST)."""
    username, password = "reviewer", secrets.token_urlsafe(16)
    (home / "passwords.json").write_text(json.dumps({username: password}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = airflow_env(home, project, AIRFLOW__API__HOST="127.0.0.1", AIRFLOW__API__PORT=str(port),
                      AIRFLOW__API__BASE_URL=url, AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{url}/execution/",
                      AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{username}:admin",
                      AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"), **settings)
    log = home / "standalone.log"
    with _server([str(BIN / "airflow"), "standalone"], f"{url}/api/v2/monitor/health", log, env, timeout_s=300):
        token = requests.post(f"{url}/auth/token", json={"username": username, "password": password},
                              timeout=30).json()["access_token"]
        server = AirflowServer(url, username, password, token, project, log)
        wait_for(lambda: requests.get(f"{url}/api/v2/dags/{DAG_ID}", timeout=5,
                                      headers={"Authorization": f"Bearer {token}"}).ok, "the DAG to be parsed", 300, log)
        yield server
