"""The smoke pipeline on shared infrastructure: raw inputs read from `s3://`, every artifact written to `s3://`,
and everything tracked on a real `mlflow server` whose artifact store is S3 too (moto_server on 127.0.0.1).

The stage CLIs run in `dvc.yaml`'s order with `s3://` URIs where `dvc.yaml` has local paths; metrics, plots and
the report stay local files (DVC's), and the report also goes to MLflow (so to S3).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.stages import STAGES as STAGES_TABLE
from components.stages import command_line
from tests.e2e.project import tracked_copy
from tests.helpers import REPO_ROOT, pipeline_runs, run_python
from tests.servers import TEST_SECRET_KEY, MlflowServer, S3Server, mlflow_server, moto_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

BUCKET = "embedforge-e2e"
RAW = STAGES_TABLE["curate"].port("input").path
# The input files the pipeline reads from S3; the out-of-domain sets folder is a local input (or the image's)
S3_INPUTS = (RAW, STAGES_TABLE["distill"].port("general_text").path)
LOCAL_INPUTS = (STAGES_TABLE["evaluate"].port("ood").path,)
ARTIFACTS = {port.path: port.kind.kind  # S3 prefix under the run root -> manifest kind, every artifact of the table
             for stage in STAGES_TABLE.values() for port in stage.outputs if port.kind is not None}
STAGES = tuple(STAGES_TABLE)


def stage_argv(root: str) -> dict[str, list[str]]:
    """Each stage's command line as in `dvc.yaml`, with every artifact and the raw input under `root` on S3
    (metrics, plots, reports and checkpoints stay local paths)."""
    locations = {port.artifact: f"{root}/{port.path}"
                 if (port.kind is not None or port in stage.inputs) and port.path not in LOCAL_INPUTS else port.path
                 for stage in STAGES_TABLE.values() for port in stage.ports}
    return {name: command_line(name, locations, params="params.yaml", profile="smoke", knobs={})
            for name in STAGES_TABLE}


@dataclass(frozen=True)
class S3Run:
    project: Path
    root: str  # s3://bucket/prefix of this run
    pipeline_run: str
    seconds: dict[str, float]
    logs: str  # every stage's stdout and stderr


@pytest.fixture(scope="module")
def s3_run(moto_server: S3Server, mlflow_server: MlflowServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Run]:
    """The smoke profile, stage by stage, on S3 and tracked to the MLflow server; the local raw file removed."""
    project = tracked_copy(tmp_path_factory.mktemp("s3-smoke"))
    run_id = uuid.uuid4().hex[:8]
    root = f"s3://{moto_server.create_bucket(BUCKET)}/runs/{run_id}"
    for path in S3_INPUTS:  # the pipeline can only read them from S3
        moto_server.client().upload_file(str(REPO_ROOT / path), BUCKET, f"runs/{run_id}/{path}")
        (project / path).unlink()
    env = {**moto_server.env, "MLFLOW_TRACKING_URI": mlflow_server.uri, "HF_HUB_OFFLINE": "1",
           "EMBEDFORGE_PIPELINE_RUN": f"s3-smoke-{run_id}",
           "EMBEDFORGE_CACHE_DIR": str(tmp_path_factory.mktemp("s3-cache")), "AWS_PROFILE": None}
    seconds, logs = {}, []
    for stage, argv in stage_argv(root).items():
        started = time.perf_counter()
        result = run_python(["-m", "components.cli", *argv], cwd=project, env=env, timeout=900)
        seconds[stage] = time.perf_counter() - started
        logs += [result.stdout, result.stderr]
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    print(f"smoke pipeline on S3 + MLflow server: {sum(seconds.values()):.0f}s "
          f"({', '.join(f'{stage} {s:.0f}s' for stage, s in seconds.items())})")
    yield S3Run(project, root, f"s3-smoke-{run_id}", seconds, "\n".join(logs))


def _manifest(server: S3Server, run: S3Run, artifact: str) -> dict[str, Any]:
    key = f"{run.root.removeprefix(f's3://{BUCKET}/')}/{artifact}/manifest.json"
    return json.loads(server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_every_artifact_is_on_s3_with_its_manifest_and_none_is_left_locally(
        s3_run: S3Run, moto_server: S3Server) -> None:
    prefix = s3_run.root.removeprefix(f"s3://{BUCKET}/")
    keys = set(moto_server.keys(BUCKET, prefix + "/"))
    for artifact, kind in ARTIFACTS.items():
        manifest = _manifest(moto_server, s3_run, artifact)
        assert manifest["kind"] == kind
        assert {f"{prefix}/{artifact}/{name}" for name in manifest["files"]} <= keys, artifact
        assert not (s3_run.project / artifact).exists(), f"{artifact} was written locally"
    assert not any((s3_run.project / path).exists() for path in S3_INPUTS)


def test_the_artifacts_on_s3_are_one_consistent_lineage(s3_run: S3Run, moto_server: S3Server) -> None:
    manifests = {artifact: _manifest(moto_server, s3_run, artifact) for artifact in ARTIFACTS}
    assert manifests["models/student"]["inputs"]["teacher"] == manifests["models/teacher"]["fingerprint"]
    quantized = manifests["data/quantized"]
    assert quantized["inputs"]["model:student"] == manifests["models/student"]["fingerprint"]
    assert quantized["extra"]["models"]["student"]["reference"] == f"{s3_run.root}/models/student"
    assert manifests["data/evaluation"]["inputs"]["beir"] == manifests["data/beir/debian-test"]["fingerprint"]
    assert manifests["data/curated"]["counts"]["rows_test"] == manifests["data/beir/debian-test"]["counts"]["queries"]


def test_metrics_and_the_report_stay_local_files(s3_run: S3Run) -> None:
    evaluate = json.loads((s3_run.project / "metrics/evaluate.json").read_text())
    assert 0.0 < evaluate["student/ndcg@10"] <= 1.0
    assert "## Pareto front" in (s3_run.project / "reports/evaluation.md").read_text()
    assert json.loads((s3_run.project / "metrics/register.json").read_text())["gate/promoted"] == 1.0


@pytest.fixture(scope="module")
def client(mlflow_server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_server.uri)


def test_the_server_holds_one_parent_run_with_a_finished_nested_run_per_stage(s3_run: S3Run, client: Any) -> None:
    parent, children = pipeline_runs(client, s3_run.pipeline_run)
    assert set(children) == set(STAGES)
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children.values())
    assert parent.data.tags["embedforge.snapshot_sha256"] == children["curate"].data.tags["embedforge.data_fingerprint"]
    assert children["train"].data.params["max_train_pairs"] == "128"  # the smoke profile's value


def test_the_server_has_the_evaluation_metrics_and_the_report_on_s3(
        s3_run: S3Run, client: Any, mlflow_server: MlflowServer, moto_server: S3Server, tmp_path: Path) -> None:
    _, children = pipeline_runs(client, s3_run.pipeline_run)
    evaluate = children["evaluate"]
    local = json.loads((s3_run.project / "metrics/evaluate.json").read_text())
    assert evaluate.data.metrics["student/d384/float_flat/ndcg_at_10"] == pytest.approx(
        local["student/ndcg@10"])
    assert evaluate.data.metrics["operating_point/ndcg_at_10"] > 0
    assert "evaluation.md" in {item.path for item in client.list_artifacts(evaluate.info.run_id)}
    report = Path(client.download_artifacts(evaluate.info.run_id, "evaluation.md", str(tmp_path)))
    assert report.read_text() == (s3_run.project / "reports/evaluation.md").read_text()
    bucket, _, prefix = mlflow_server.artifacts.removeprefix("s3://").partition("/")
    stored = moto_server.keys(bucket, prefix + "/")
    assert any(key.endswith(f"{evaluate.info.run_id}/artifacts/evaluation.md") for key in stored)


def test_the_server_registers_the_student_as_champion_with_its_weights_on_s3(
        s3_run: S3Run, client: Any, mlflow_server: MlflowServer, moto_server: S3Server) -> None:
    _, children = pipeline_runs(client, s3_run.pipeline_run)
    champion = client.get_model_version_by_alias("embedforge-student", "champion")
    assert champion.run_id == children["register"].info.run_id
    assert champion.tags["embedforge.gate"] == "passed"
    assert children["register"].data.metrics["gate/promoted"] == 1.0
    bucket, _, prefix = mlflow_server.artifacts.removeprefix("s3://").partition("/")
    assert any(key.endswith("model.safetensors") for key in moto_server.keys(bucket, prefix + "/"))


def test_the_s3_secret_key_appears_in_no_log_tracked_value_or_written_file(
        s3_run: S3Run, client: Any, mlflow_server: MlflowServer, moto_server: S3Server) -> None:
    assert TEST_SECRET_KEY in str(moto_server.env.values())  # the key the stages and servers really used
    assert "uploaded" in s3_run.logs and TEST_SECRET_KEY not in s3_run.logs
    for log in (mlflow_server.log, moto_server.log):
        assert TEST_SECRET_KEY not in log.read_text(errors="replace"), log
    parent, children = pipeline_runs(client, s3_run.pipeline_run)
    for run in [parent, *children.values()]:
        tracked = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert TEST_SECRET_KEY not in tracked, run.data.tags.get("embedforge.stage", "parent")
    written = [path for path in s3_run.project.rglob("*") if path.is_file() and ".git" not in path.parts]
    assert written and not [path for path in written if TEST_SECRET_KEY.encode() in path.read_bytes()]
    prefix = s3_run.root.removeprefix(f"s3://{BUCKET}/")
    manifests = [key for key in moto_server.keys(BUCKET, prefix + "/") if key.endswith("/manifest.json")]
    assert len(manifests) == len(ARTIFACTS)
    for key in manifests:
        assert TEST_SECRET_KEY.encode() not in moto_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
