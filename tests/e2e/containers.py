"""Real containers for end-to-end tests: the CPU image built by the project's own script, and podman's Docker API.

No Docker engine runs here, but podman (with runc) does, with the settings of containers/containers.conf; its
`system service` speaks the Docker API that kfp.local's DockerRunner and Airflow's DockerOperator use. The image
is built once per test session (podman's layer cache makes a rebuild of unchanged layers take seconds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from components.stages import IMAGES
from tests.helpers import REPO_ROOT

CPU_IMAGE = f"localhost/{IMAGES['cpu']}"  # podman's name for a local build of the table's CPU image
CONTAINERS_CONF = REPO_ROOT / "containers" / "containers.conf"


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    if shutil.which("podman") is None:
        raise AssertionError("podman not found: the container tests need it (`bash scripts/setup.sh --tests`)")
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout)


def build_cpu_image() -> str:
    """`bash containers/build.sh` (the base from Debian packages when missing, then the CPU image)."""
    started = time.perf_counter()
    result = subprocess.run(["bash", str(REPO_ROOT / "containers" / "build.sh")], cwd=REPO_ROOT, env=podman_env(),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"containers/build.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    summary = [line for line in result.stdout.splitlines() if line.startswith("containers/build.sh: built")]
    print(f"{' '.join(summary)} (this session: {time.perf_counter() - started:.0f}s)")
    return CPU_IMAGE


@contextlib.contextmanager
def podman_socket(directory: Path) -> Iterator[str]:
    """`podman system service` on a socket in `directory`; yields its DOCKER_HOST and stops it after."""
    socket = directory / "podman.sock"
    log = (directory / "podman-service.log").open("w")
    process = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=podman_env(),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert process.poll() is None and time.monotonic() < deadline, \
                f"podman system service did not start:\n{(directory / 'podman-service.log').read_text()}"
            time.sleep(0.2)
        yield f"unix://{socket}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
