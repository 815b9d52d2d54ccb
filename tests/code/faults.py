"""Fault injections of issue #7 item 3 (the light ones), run on the real curate stage over tiny inputs.

- `kill_while_publishing`: curate runs as its own process and is killed with SIGKILL while it publishes an
  artifact (its temporary directory holds the data files, the manifest is next); then the same command is
  re-run in-process, as the next `dvc repro` would.
- `disk_full_while_publishing`: the disk fills up while curate writes an artifact: the writer of one file
  writes part of it and fails with ENOSPC, as a full file system does.
- `kill_at_first_checkpoint`: a training stage (train, distill) is killed with SIGKILL once it has written a
  checkpoint, for the resume tests.

Shared by `tests/code/test_faults.py` and `bench/reliability.py`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tests.code.bad_input_cases import RunOutcome, Workspace, fingerprints, leftovers, run_stage, snapshot, write_inputs
from tests.helpers import REPO_ROOT

# Runs the curate CLI; an audit hook holds the process when it opens the manifest of the embeddings artifact in
# its temporary directory (all data files written, nothing published), so that the kill lands exactly there.
_HELD_CURATE = """
import os, sys, time
def hold(event, args):
    if event == "open" and isinstance(args[0], str) and "/.embeddings.tmp-" in args[0] and args[0].endswith(
            "/manifest.json"):
        time.sleep(600)
sys.addaudithook(hold)
from components.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class FaultResult:
    name: str
    exit_code: int | None  # of the faulty run (-9: killed)
    message: str  # its error message, if any
    hit_mid_publish: bool  # the fault really landed while an artifact was half written
    previous_intact: bool  # the artifact being written is byte-identical to its previous version
    all_verified: bool  # every artifact under out/ matches its manifest
    leftovers: list[str]  # temporary dirs left after the fault (a kill leaves one until the next publish)
    rerun_exit_code: int | None = None
    rerun_leftovers: tuple[str, ...] = ()

    @property
    def survived(self) -> bool:
        clean_after = self.rerun_exit_code in (None, 0) and not self.rerun_leftovers
        return self.hit_mid_publish and self.previous_intact and self.all_verified and clean_after

    @property
    def corrupted(self) -> bool:
        return not (self.previous_intact and self.all_verified)


def _verified(out: Path) -> bool:
    try:
        fingerprints(out)
    except Exception:  # noqa: BLE001 - any failure to verify counts as corruption
        return False
    return True


def published(out: Path) -> dict[str, bytes]:
    """The files of the published outputs: `snapshot` without the temporary dirs a kill leaves behind."""
    stale = set(leftovers(out))
    return {name: data for name, data in snapshot(out).items() if name.split("/")[0] not in stale}


def prepare(root: Path, model: Path) -> Workspace:
    """A workspace whose out/ already holds curate's published artifacts from a valid run."""
    workspace = Workspace(root)
    write_inputs(workspace, model)
    outcome = run_stage(workspace, "curate", model)
    if outcome.exit_code != 0:
        raise RuntimeError(f"the valid curate run failed: {outcome.crash or outcome.errors or outcome.console[-2000:]}")
    return workspace


def kill_while_publishing(root: Path, model: Path, timeout_s: float = 240.0) -> FaultResult:
    """SIGKILL curate while its embeddings artifact is half published; then re-run it."""
    workspace = prepare(root, model)
    before = published(workspace.out)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", _HELD_CURATE, *workspace.argv("curate", "pairs.jsonl", model)],
                               cwd=workspace.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hit = False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        half = [path for path in workspace.out.glob(".embeddings.tmp-*")
                if {"embeddings.npy", "ids.parquet"} <= {child.name for child in path.iterdir()}]
        if half:
            hit = True
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    left = leftovers(workspace.out)
    previous_intact = published(workspace.out) == before
    all_verified = _verified(workspace.out)
    rerun = run_stage(workspace, "curate", model)
    return FaultResult("SIGKILL while publishing (curate)", process.returncode, stderr[-300:] if not hit else "", hit,
                       previous_intact, all_verified and _verified(workspace.out), left, rerun.exit_code,
                       tuple(leftovers(workspace.out)))


def kill_at_first_checkpoint(command: list[str], checkpoints: Path, timeout_s: float = 240.0) -> int:
    """Start a training stage's CLI and SIGKILL it once it has written a checkpoint; returns its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{command[2]} wrote no checkpoint in {timeout_s:.0f}s")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    return process.wait()


@contextlib.contextmanager
def replaced(owner: Any, name: str, replacement: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Put `replacement` in place of `owner.name` for the duration; yields the original."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def _disk_full(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


FullPoint = Literal["data-file", "manifest"]


def disk_full_while_publishing(root: Path, model: Path, point: FullPoint) -> FaultResult:
    """The disk fills while curate writes: `data-file` fails the embeddings matrix (the first artifact) half
    written; `manifest` fails the manifest of the BEIR export (the last artifact) half written."""
    workspace = prepare(root, model)
    marker, artifact = (".embeddings.tmp-", "embeddings") if point == "data-file" else (".beir.tmp-", "beir")
    before = snapshot(workspace.out / artifact)
    hit: list[str] = []

    def partial_then_full(path: object, data: bytes) -> None:
        hit.append(str(path))
        with open(path, "wb") as handle:  # noqa: PTH123 - the bytes that fit before the disk was full
            handle.write(data[: max(1, len(data) // 2)])
        raise _disk_full(path)

    if point == "data-file":
        original_save = np.save

        def save(file: object, array: np.ndarray, *args: Any, **kwargs: Any) -> None:
            if marker not in str(file):
                return original_save(file, array, *args, **kwargs)
            return partial_then_full(file, array.tobytes())

        context = replaced(np, "save", save)
    else:
        original_write_text = pathlib.Path.write_text

        def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if marker not in str(self) or self.name != "manifest.json":
                return original_write_text(self, data, *args, **kwargs)
            partial_then_full(self, data.encode())
            return 0

        context = replaced(pathlib.Path, "write_text", write_text)
    with context:
        outcome: RunOutcome = run_stage(workspace, "curate", model)
    intact, verified, left = snapshot(workspace.out / artifact) == before, _verified(workspace.out), leftovers(
        workspace.out)
    rerun = run_stage(workspace, "curate", model)  # space freed: the next run completes
    return FaultResult(
        f"disk full writing the {artifact} {'matrix' if point == 'data-file' else 'manifest'} (curate)",
        outcome.exit_code, outcome.errors[0] if outcome.errors else (outcome.crash or "")[-500:], bool(hit),
        intact, verified and _verified(workspace.out), left, rerun.exit_code, tuple(leftovers(workspace.out)))
