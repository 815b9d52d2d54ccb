"""A fresh copy of the project for end-to-end runs, and where each runner leaves its smoke results to compare."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE_RESULTS = Path(tempfile.mkdtemp(prefix="embedforge-smoke-results-"))
(SMOKE_RESULTS / "dvc-manifests").mkdir()


def tracked_copy(destination: Path) -> Path:
    """Copy the files git tracks (as a fresh clone would have them) and make the copy its own git repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=destination, check=True)
    return destination


def use_profile(project: Path, profile: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = profile
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
