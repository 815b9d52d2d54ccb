"""Real local servers for tests: an S3-compatible `moto_server` and an `mlflow server` on 127.0.0.1.

Each runs as a subprocess on a free port in its own process group and is stopped by its fixture's finalizer,
also when a test fails. Import the fixtures where they are needed:

    from tests.servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)

`moto_server` does not touch `os.environ`; `s3_env` points this process at it for one test, and
`S3Server.env` is the environment to give a subprocess (test credentials, region, `AWS_ENDPOINT_URL`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
# Fresh each session and unlike any other text, so that a test can search logs and stores for the secret.
TEST_SECRET_KEY = f"embedforge-test-secret-{secrets.token_hex(12)}"
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def _wait_until_answering(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering {url}:\n"
                               f"{_log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s:\n{_log_tail(log)}")


@contextlib.contextmanager
def _server(command: list[str], url: str, log: Path, env: dict[str, str], timeout_s: float) -> Iterator[None]:
    """Start `command` in the log's folder, wait until `url` answers, and always stop its process group after."""
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                   start_new_session=True)
    try:
        _wait_until_answering(url, process, log, timeout_s)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use this server through boto3's own chain (never a real profile)."""
        empty = self.log.parent / "aws-config-empty"  # no ~/.aws profile may leak into a test
        empty.touch()
        return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                     aws_secret_access_key=TEST_SECRET_KEY,
                                     region_name="us-east-1").client("s3", endpoint_url=self.endpoint)

    def create_bucket(self, name: str) -> str:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def _moto_api(self, path: str, method: str = "POST") -> bytes:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict[str, Any]]]:
        """Record the requests the server receives, in order (moto's recorder); the list fills on exit."""
        import json

        requests: list[dict[str, Any]] = []
        self._moto_api("recorder/reset-recording")
        self._moto_api("recorder/start-recording")
        try:
            yield requests
        finally:
            self._moto_api("recorder/stop-recording")
            lines = self._moto_api("recorder/download-recording", method="GET").decode().splitlines()
            requests.extend(json.loads(line) for line in lines if line.strip())


@contextlib.contextmanager
def running_moto(workdir: Path) -> Iterator[S3Server]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = workdir / "moto_server.log"
    with _server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"{endpoint}/moto-api/", log,
                 dict(os.environ), timeout_s=60):
        yield S3Server(endpoint, log)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: str  # s3://bucket/prefix where the server keeps artifacts
    log: Path


@contextlib.contextmanager
def running_mlflow(s3: S3Server, workdir: Path, bucket: str) -> Iterator[MlflowServer]:
    """`mlflow server`: SQLite backend store in `workdir`, artifacts proxied to `s3://bucket/mlartifacts`."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    artifacts = f"s3://{s3.create_bucket(bucket)}/mlartifacts"
    log = workdir / "mlflow_server.log"
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with _server(command, f"{uri}/health", log, env, timeout_s=180):
        yield MlflowServer(uri, artifacts, log)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (moto) on 127.0.0.1, for the whole session."""
    with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_env(moto_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Point boto3 in this process at `moto_server` with test credentials, and the artifact cache at tmp."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for name, value in moto_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EMBEDFORGE_CACHE_DIR", str(tmp_path / "s3-cache"))
    return moto_server


@pytest.fixture(scope="session")
def mlflow_server(moto_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` (SQLite store, artifacts on `moto_server`), for the whole session."""
    with running_mlflow(moto_server, tmp_path_factory.mktemp("mlflow-server"), "embedforge-mlflow") as server:
        yield server


class StoppingProxy:
    """A TCP proxy to a server that stops: after it has forwarded `stop_after_puts` HTTP PUT requests it drops
    every open connection and stops listening, as a crashed server does, while the server behind it (and what
    it stored) lives on for the test to inspect. `endpoint` is what the client under test uses."""

    def __init__(self, upstream_port: int, stop_after_puts: int) -> None:
        self.stop_after_puts = stop_after_puts
        self.puts = 0
        self.stopped = threading.Event()
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self.stopped.is_set():  # accepted while stopping: a dead server never answers it
                    self._reset(client)
                    return
                upstream = socket.create_connection(self._upstream)
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if from_client and chunk.startswith(b"PUT "):
                    with self._lock:
                        if self.stopped.is_set():
                            return
                        self.puts += 1
                        if self.puts > self.stop_after_puts:
                            self.stop()
                            return
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.stopped.set()
        for sock in self._sockets:
            self._reset(sock)

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        """Shut down first: that wakes a thread blocked on the socket, which a plain close does not."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@contextlib.contextmanager
def running_serve(arguments: list[str], workdir: Path, env: dict[str, str]) -> Iterator[str]:
    """`embedforge serve` on a free port of 127.0.0.1; yields its base URL once /healthz answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _server([str(BIN / "embedforge"), "serve", "--port", str(port), *arguments], f"{url}/healthz",
                 workdir / "serve.log", {**os.environ, **env}, timeout_s=120):
        yield url
