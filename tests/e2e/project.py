"""A fresh copy of the project for end-to-end runs, and the smoke results every orchestrator must reproduce."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from components.artifacts import read_manifest
from tests.helpers import REPO_ROOT

SMOKE_RESULTS = Path(tempfile.mkdtemp(prefix="embedforge-smoke-results-"))
COMPARED_ARTIFACTS = ("data/curated", "data/mined")  # deterministic on CPU: fingerprints must be equal


def tracked_copy(destination: Path) -> Path:
    """Copy the files git tracks (as a fresh clone would have them) and make the copy its own git repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for command in (["git", "init", "-q"], ["git", "config", "user.name", "t"],  # dvc exp commits need a name
                    ["git", "config", "user.email", "t@example.org"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=destination, check=True)
    return destination


def use_profile(project: Path, profile: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = profile
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dvc"), *args]


def dvc_env() -> dict[str, str]:
    """This interpreter's venv first on PATH, no model downloads, and the project's local MLflow store."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("EMBEDFORGE_PIPELINE_RUN", None)
    return env


def run_dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in `project`, in `dvc_env()`."""
    return subprocess.run(dvc_command(*args), cwd=project, env=dvc_env(), capture_output=True, text=True, timeout=900)


def save_smoke_results(project: Path) -> Path:
    """Keep what `dvc repro` made of the smoke profile, before any test changes the project."""
    shutil.copytree(project / "metrics", SMOKE_RESULTS / "metrics", dirs_exist_ok=True)
    shutil.copy2(project / "data/evaluation/grid.json", SMOKE_RESULTS / "grid.json")
    for name in COMPARED_ARTIFACTS:
        target = SMOKE_RESULTS / "manifests" / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / name / "manifest.json", target / "manifest.json")
    return SMOKE_RESULTS


def assert_same_as_dvc(results: Path, artifacts: dict[str, Path], grid_file: Path) -> None:
    """Another orchestrator's smoke run made the same artifacts and the same evaluation as `dvc repro`.

    `artifacts` maps each of COMPARED_ARTIFACTS to where the other runner published it; nDCG@10 of every grid row
    must match dvc's metric to 1e-4 (model inference is deterministic on CPU up to float summation order).
    """
    assert set(artifacts) == set(COMPARED_ARTIFACTS)
    for name, path in artifacts.items():
        dvc = json.loads((results / "manifests" / name / "manifest.json").read_text())
        made = read_manifest(path, kind=dvc["kind"], schema_version=dvc["schema_version"])
        assert made.fingerprint == dvc["fingerprint"], f"{name} differs from what dvc repro made"
    def scores(grid: Path) -> dict[tuple[str, int, str, bool], float]:
        return {(row["model"], row["dim"], row["index"], row["rescored"]): row["ndcg_at_10"]
                for row in json.loads(grid.read_text())}

    dvc_scores, made_scores = scores(results / "grid.json"), scores(grid_file)
    assert set(made_scores) == set(dvc_scores)
    for key, ndcg in made_scores.items():
        assert ndcg == pytest.approx(dvc_scores[key], abs=1e-4), key
