"""The team DVC remote is S3 (`.dvc/config`): `dvc push`, then `dvc pull` into a copy of the project with an
empty cache and no artifacts, restores every artifact of the smoke run byte for byte (on a real moto_server).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.artifacts import file_sha256, read_manifest
from tests.helpers import REPO_ROOT
from tests.servers import S3Server, moto_server  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.slow


def _dvc(project: Path, server: S3Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **server.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("AWS_PROFILE", None)
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


def _cached_outs(project: Path) -> list[str]:
    """Every `dvc.yaml` output that goes to the DVC cache (and so to the remote): the artifacts."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            name, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if (options or {}).get("cache", True):
                outs.append(name)
    return outs


def _hashes(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): file_sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _default_remote(project: Path) -> tuple[str, str]:
    config = configparser.ConfigParser()
    config.read(project / ".dvc" / "config")
    name = config["core"]["remote"]
    return name, config[f"'remote \"{name}\"'"]["url"]


def test_the_repository_names_an_s3_remote_as_the_default() -> None:
    name, url = _default_remote(REPO_ROOT)
    assert url.startswith("s3://") and name == "team"


def test_push_then_pull_into_an_empty_cache_restores_every_artifact(
        dvc_smoke_project: Path, moto_server: S3Server, tmp_path: Path) -> None:
    project = dvc_smoke_project
    remote, url = _default_remote(project)
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    moto_server.create_bucket(bucket)
    outs = _cached_outs(project)
    assert {"data/curated", "models/teacher", "models/student", "data/index", "data/evaluation"} <= set(outs)
    before = {out: _hashes(project / out) for out in outs}

    configured = _dvc(project, moto_server, "remote", "modify", "--local", remote, "endpointurl", moto_server.endpoint)
    assert configured.returncode == 0, configured.stderr
    pushed = _dvc(project, moto_server, "push")
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    stored = moto_server.keys(bucket, prefix + "/")
    contents = {_md5(project / out / name) for out in outs for name in before[out]}
    assert len([key for key in stored if not key.endswith(".dir")]) == len(contents)  # each content once
    assert len([key for key in stored if key.endswith(".dir")]) == len(outs)  # and one listing per directory

    skipped = {project / ".dvc" / "cache", project / ".dvc" / "tmp", *(project / out for out in outs)}
    clone = Path(shutil.copytree(project, tmp_path / "clone", symlinks=True,
                                 ignore=lambda folder, names: [n for n in names if Path(folder) / n in skipped]))
    assert not any((clone / out).exists() for out in outs) and not (clone / ".dvc" / "cache").exists()
    pulled = _dvc(clone, moto_server, "pull")
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]

    for out in outs:
        assert _hashes(clone / out) == before[out], f"{out} differs after dvc pull"
        manifest = json.loads((clone / out / "manifest.json").read_text())
        read_manifest(clone / out, kind=manifest["kind"], schema_version=manifest["schema_version"])
    status = _dvc(clone, moto_server, "status", "--cloud")
    assert status.returncode == 0 and f"Cache and remote '{remote}' are in sync" in status.stdout, status.stderr
