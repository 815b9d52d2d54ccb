"""A tracking server that is down stops a stage at once, with what to do, before any work or output, and with
the exit code of a transient failure (75), which an orchestrator retries."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from components import tracking
from components.cli import EXIT_TEMPFAIL
from tests.helpers import REPO_ROOT, run_python
from tests.servers import free_port


def _run_stage(stage: str, args: list[str], cwd: Path, tracking_uri: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    result = run_python(["-m", f"components.{stage}", "--params", str(REPO_ROOT / "params.yaml"), "--profile",
                         "smoke", *args], cwd=cwd, env={"MLFLOW_TRACKING_URI": tracking_uri})
    return result, time.perf_counter() - started


@pytest.mark.parametrize("stage", ["curate", "train"])
def test_a_stage_stops_with_exit_75_and_writes_nothing_when_the_tracking_server_is_down(
        stage: str, tmp_path: Path, pairs_rows: list[dict[str, str]],
        write_jsonl: Callable[[Path, Iterable[object]], Path]) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows)
    outputs = {"curate": ["--input", str(pairs), "--output", "out/curated", "--embeddings", "out/embeddings",
                          "--beir", "out/beir", "--metrics", "out/curate.json", "--plot", "out/drops.csv"],
               "train": ["--mined", "out/mined", "--curated", "out/curated", "--output", "out/teacher",
                         "--checkpoints", "out/checkpoints", "--metrics", "out/train.json"]}[stage]
    result, seconds = _run_stage(stage, outputs, tmp_path, uri)
    assert result.returncode == EXIT_TEMPFAIL, result.stderr[-3000:]
    assert f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) did not answer" in result.stderr
    assert "--no-tracking" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert seconds < 120, f"{stage} took {seconds:.0f}s to notice"  # interpreter and imports, not a timeout


def test_a_server_that_accepts_but_never_answers_is_refused_after_the_timeout() -> None:
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) but never sends a byte
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(tracking.TrackingUnavailable, match=f"{uri} .* did not answer within 1s"):
            tracking.check_server(uri, timeout_s=1.0)
        assert time.perf_counter() - started < 10


def test_local_stores_need_no_server() -> None:
    tracking.check_server("sqlite:///mlflow.db")
    tracking.check_server("file:///tmp/mlruns")


def test_credentials_in_the_tracking_uri_are_not_repeated_in_the_error() -> None:
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(tracking.TrackingUnavailable) as error:
        tracking.check_server(uri, timeout_s=1.0)
    assert "hunter2" not in str(error.value) and "alice" not in str(error.value)
    assert "http://127.0.0.1:" in str(error.value)
