"""End to end: `dvc repro` of the smoke profile (every stage) in a temporary copy of the repository.

Specifies what a user gets from the embedded default: every artifact published with a manifest, metrics and
plots written, one MLflow parent run with a nested run per stage, and a second `dvc repro` that re-runs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.artifacts import read_manifest
from components.data import read_beir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tracked_copy(destination: Path) -> Path:
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


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("EMBEDFORGE_PIPELINE_RUN", None)
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = _tracked_copy(tmp_path_factory.mktemp("smoke"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = "smoke"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = _dvc(project, "repro")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return project


STAGES = {"curate", "mine", "train", "distill", "evaluate"}


def test_smoke_repro_publishes_every_artifact_with_a_manifest(smoke_project: Path) -> None:
    curated = read_manifest(smoke_project / "data/curated", kind="curated_pairs", schema_version=1)
    embeddings = read_manifest(smoke_project / "data/embeddings/base", kind="embeddings", schema_version=1)
    beir = read_manifest(smoke_project / "data/beir/debian-test", kind="beir", schema_version=1)
    mined = read_manifest(smoke_project / "data/mined", kind="mined_pairs", schema_version=1)
    teacher = read_manifest(smoke_project / "models/teacher", kind="sentence_transformer", schema_version=1)
    student = read_manifest(smoke_project / "models/student", kind="sentence_transformer", schema_version=1)
    assert curated.counts["rows_test"] == beir.counts["queries"] > 0
    assert embeddings.counts["dim"] == 384
    assert 0 < mined.counts["rows"] <= curated.counts["rows_train"]
    assert teacher.counts == {"layers": 6, "dim": 384}
    assert student.counts == {"layers": 3, "dim": 384}
    assert student.inputs["teacher"] == teacher.fingerprint
    dataset = read_beir(smoke_project / "data/beir/debian-test")
    assert set(dataset.qrels) == set(dataset.queries)


def test_smoke_repro_writes_metrics_plots_and_report(smoke_project: Path) -> None:
    curate = json.loads((smoke_project / "metrics/curate.json").read_text())
    assert curate["rows_sampled"] - curate["dropped_total"] == curate["rows_out"]
    evaluate = json.loads((smoke_project / "metrics/evaluate.json").read_text())
    for model in ("base", "teacher", "student"):
        for dim in (384, 64):
            assert 0.0 < evaluate[f"{model}/d{dim}/ndcg@10"] <= 1.0
    assert evaluate["queries"] == curate["rows_test"]
    train = json.loads((smoke_project / "metrics/train.json").read_text())
    assert train["loss_end"] < train["loss_start"]
    assert (smoke_project / "plots/curate_drops.csv").read_text().startswith("reason,count")
    assert (smoke_project / "plots/ndcg_vs_dim.csv").read_text().splitlines()[0] == "dim,base,teacher,student"
    assert (smoke_project / "plots/mine_scores.png").stat().st_size > 0
    assert "| student | 3 | 64 |" in (smoke_project / "reports/evaluation.md").read_text()
    shown = _dvc(smoke_project, "metrics", "show")
    assert "student/d64/ndcg@10" in shown.stdout


def test_smoke_repro_tracks_one_parent_run_with_a_nested_run_per_stage(smoke_project: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("embedforge")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("embedforge.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {run.data.tags["embedforge.stage"]: run for run in runs
                if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == STAGES
    assert children["evaluate"].data.metrics["student/d384/ndcg_at_10"] > 0
    assert children["curate"].data.params["eps"] == "0.05"
    assert parent.data.tags["embedforge.snapshot_sha256"] == children["curate"].data.tags["embedforge.data_fingerprint"]
    assert len(parent.data.tags["embedforge.git_commit"]) == 40
    artifacts = {item.path for item in client.list_artifacts(children["curate"].info.run_id)}
    assert "audit_sample.json" in artifacts


def test_second_repro_reruns_nothing(smoke_project: Path) -> None:
    result = _dvc(smoke_project, "repro")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Running stage" not in result.stdout
    status = _dvc(smoke_project, "status")
    assert "up to date" in status.stdout
