"""One helper per need that several test modules share: the repository root, a project module run as its own
process, the MLflow runs a pipeline run tracked, and unit vectors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.tracking import EXPERIMENT

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- processes ----------------------------------------------------------------------------------------------

def run_python(args: Sequence[str], *, cwd: Path = REPO_ROOT, env: Mapping[str, str | None] | None = None,
               timeout: float = 300, stdin: str | bytes = b"") -> subprocess.CompletedProcess[str]:
    """`python ARGS` on this interpreter as its own process (`["-m", "components.train", ...]` for a stage
    CLI, `["bench/x.py", ...]` for a script), in `cwd`, stdout and stderr captured as text.

    Its environment is this process's with the repository on PYTHONPATH, updated by `env`, where a None value
    removes the variable; `stdin` is its standard input. (`python -m` puts `cwd` before PYTHONPATH: a copy of the project in `cwd` runs its
    own code.)
    """
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, timeout=timeout,
                          input=stdin.encode() if isinstance(stdin, str) else stdin)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


# --- MLflow -------------------------------------------------------------------------------------------------

def experiment_runs(client: Any, filter_string: str = "") -> list[Any]:
    """The runs of the project's MLflow experiment in `client`'s store (those `filter_string` selects)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=filter_string)


def pipeline_runs(client: Any, pipeline_key: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The one MLflow pipeline run in the store (the one with `pipeline_key`, if given) and its nested runs by
    stage."""
    runs = experiment_runs(client)
    parents = [run for run in runs if run.data.tags.get("embedforge.role") == "pipeline"
               and pipeline_key in (None, run.data.tags.get("embedforge.pipeline_key"))]
    assert len(parents) == 1, f"expected one pipeline run {pipeline_key or ''}, found {len(parents)}"
    children = {run.data.tags["embedforge.stage"]: run for run in runs
                if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return parents[0], children


def stage_run(client: Any, stage: str) -> Any:
    """The one run of `stage` in the store, whichever pipeline run it belongs to."""
    runs = experiment_runs(client, f"tags.`embedforge.stage` = '{stage}'")
    assert len(runs) == 1, f"expected one {stage} run, found {len(runs)}"
    return runs[0]


# --- vectors ------------------------------------------------------------------------------------------------

def unit_rows(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """`matrix` as C-contiguous float32 with every row scaled to unit length (no row may be zero)."""
    vectors = np.asarray(matrix, dtype=np.float32)
    return np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)


def random_unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """`count` float32 unit vectors of `dim` components in Gaussian random directions, the same for a seed."""
    return unit_rows(np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32))
