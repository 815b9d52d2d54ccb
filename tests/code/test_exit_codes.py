"""Exit codes that tell a permanent failure from a transient one (issue #21).

Exit 2 (`EXIT_USAGE`): the input, params, an artifact or the data's validation is wrong; no retry can help, so
an orchestrator fails the run for good. Exit 75 (`EXIT_TEMPFAIL`, sysexits' EX_TEMPFAIL): S3, the network, the
MLflow server or the disk failed; a retry may get past it. Anything else is a bug: its traceback, exit 1.

One table of failure kinds, each raised the way the stages meet it (the real reader, manifest check, S3 client
or tracking preflight where that is cheap), run through `guarded`; then the cheap ones through a real stage CLI
and through the Kubeflow component body.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from components import storage, tracking
from components.artifacts import MANIFEST, read_manifest
from components.cli import EXIT_TEMPFAIL, EXIT_USAGE, RETRY_ADVICE, guarded
from components.config import parse_overrides
from components.data import read_pairs
from components.stages import STAGES
from components.validation import ValidationFailed
from tests.helpers import REPO_ROOT, run_python
from tests.servers import S3Server, free_port

BUG = 1  # what the interpreter exits with on an uncaught exception: `guarded` lets it through


@dataclass(frozen=True)
class Place:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


def _dead_s3(place: Place) -> None:
    """Point boto3 at a port nothing listens on, with test credentials and no retries."""
    for name, value in S3Server(f"http://127.0.0.1:{free_port()}", place.tmp / "s3.log").env.items():
        place.monkeypatch.setenv(name, value)
    place.monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


def _s3_answers(place: Place, code: str, status: int) -> None:
    """`fetch_file` against an S3 whose HeadObject answers with the error `code` (HTTP `status`)."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")  # noqa: S106 - a stub's, never sent
    stub = Stubber(client)
    stub.add_client_error("head_object", service_error_code=code, http_status_code=status)
    place.monkeypatch.setattr(storage, "s3_client", lambda: client)
    with stub:
        storage.fetch_file("s3://embedforge-unit/runs/pairs.jsonl")


def _corrupt_manifest(place: Place) -> None:
    (place.tmp / "curated").mkdir()
    (place.tmp / "curated" / MANIFEST).write_text('{"kind": "curated_pairs", ')
    read_manifest(place.tmp / "curated", kind="curated_pairs", schema_version=1)


def _mlflow_lost_mid_run(place: Place) -> None:
    from mlflow.tracking import MlflowClient

    place.monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    MlflowClient(f"http://127.0.0.1:{free_port()}").get_experiment_by_name("embedforge")


def _upload_failed_on_slow_down(place: Place) -> None:
    """What boto3's upload_file raises (unwrapped, as from MLflow's S3 artifact store) when S3 throttles."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    try:
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                           "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    except ClientError as exc:
        raise S3UploadFailedError(f"Failed to upload model.bin to bucket/model.bin: {exc}")  # noqa: B904


def _os_error(code: int) -> Callable[[Place], None]:
    def fail(place: Place) -> None:
        raise OSError(code, os.strerror(code), str(place.tmp / "out" / ".curated.tmp-1-abcd1234" / "pairs.parquet"))
    return fail


def _raise(exc: BaseException) -> Callable[[Place], None]:
    def fail(place: Place) -> None:
        raise exc
    return fail


@dataclass(frozen=True)
class Kind:
    name: str
    fail: Callable[[Place], None]
    code: int
    word: str  # in the error line


KINDS = [
    # permanent: the input, params, artifact or data is wrong
    Kind("bad params", lambda place: parse_overrides(["eps"]), EXIT_USAGE, "expected KEY=VALUE"),
    Kind("missing input file", lambda place: read_pairs(place.tmp / "pairs.jsonl"), EXIT_USAGE,
         "input file not found"),
    Kind("missing file, unwrapped", lambda place: (place.tmp / "x.txt").read_text(), EXIT_USAGE, "x.txt"),
    Kind("corrupt artifact manifest", _corrupt_manifest, EXIT_USAGE, "unreadable manifest"),
    Kind("validation failure", _raise(ValidationFailed("pairs.jsonl: 3 of 40 rows have an empty query")),
         EXIT_USAGE, "empty query"),
    Kind("S3 object missing", lambda place: _s3_answers(place, "404", 404), EXIT_USAGE, "no such object"),
    Kind("S3 access denied", lambda place: _s3_answers(place, "AccessDenied", 403), EXIT_USAGE, "AccessDenied"),
    Kind("S3 URI malformed", lambda place: storage.S3Uri.parse("s3://bucket-only"), EXIT_USAGE,
         "s3://BUCKET/PREFIX"),
    # transient: the infrastructure failed
    Kind("S3 endpoint unreachable", lambda place: (_dead_s3(place), storage.fetch_file("s3://b/pairs.jsonl")),
         EXIT_TEMPFAIL, "cannot reach the S3 endpoint"),
    Kind("S3 throttling", lambda place: _s3_answers(place, "SlowDown", 503), EXIT_TEMPFAIL, "SlowDown"),
    Kind("S3 server error", lambda place: _s3_answers(place, "InternalError", 500), EXIT_TEMPFAIL,
         "InternalError"),
    Kind("S3 upload throttled, unwrapped", _upload_failed_on_slow_down, EXIT_TEMPFAIL, "SlowDown"),
    Kind("MLflow tracking server unreachable",
         lambda place: tracking.check_server(f"http://127.0.0.1:{free_port()}", timeout_s=1.0), EXIT_TEMPFAIL,
         "did not answer"),
    Kind("MLflow server lost mid-run", _mlflow_lost_mid_run, EXIT_TEMPFAIL, "API request to"),
    Kind("disk full", _os_error(errno.ENOSPC), EXIT_TEMPFAIL, "No space left on device; nothing was published"),
    Kind("disk quota exceeded", _os_error(errno.EDQUOT), EXIT_TEMPFAIL, "quota exceeded"),
    Kind("read-only file system", _os_error(errno.EROFS), EXIT_TEMPFAIL, "Read-only file system"),
    Kind("connection reset", _raise(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")),
         EXIT_TEMPFAIL, "Connection reset"),
    Kind("timeout", _raise(TimeoutError("timed out")), EXIT_TEMPFAIL, "timed out"),
    # a bug: traceback, exit 1
    Kind("unexpected bug", lambda place: 1 / 0, BUG, "division by zero"),
    Kind("other OS error", _raise(PermissionError(errno.EACCES, "Permission denied", "/models")), BUG,
         "Permission denied"),
]


@pytest.mark.parametrize("kind", KINDS, ids=[kind.name for kind in KINDS])
def test_each_failure_kind_exits_with_its_code_and_says_whether_a_retry_can_help(
        kind: Kind, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    stage = guarded(lambda argv: kind.fail(Place(tmp_path, monkeypatch)))
    if kind.code == BUG:
        with pytest.raises(Exception, match=kind.word):  # noqa: PT011 - any bug: it keeps its own type
            stage([])
        return
    with caplog.at_level(logging.ERROR, logger="embedforge"):
        code = stage([])
    assert code == kind.code
    [line] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert kind.word in line, line
    assert RETRY_ADVICE[code] in line, line


def _curate(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    out = tmp_path / "out"
    done = run_python(["-m", "components.cli", "curate", "--params", str(REPO_ROOT / "params.yaml"),
                       "--output", str(out / "curated"), "--embeddings", str(out / "embeddings"),
                       "--beir", str(out / "beir"), "--metrics", str(out / "curate.json"),
                       "--plot", str(out / "drops.csv"), *args], cwd=tmp_path, env=env, timeout=120)
    assert not out.exists(), "a failed stage wrote outputs"
    return done.returncode, done.stderr


CLI_CASES = {
    "missing input file": (["--input", "/nonexistent/pairs.jsonl", "--no-tracking"], {}, EXIT_USAGE,
                           "input file not found"),
    "bad params": (["--input", "pairs.jsonl", "--no-tracking", "--set", "eps=lots"], {}, EXIT_USAGE, "eps"),
    "S3 endpoint unreachable": (["--input", "s3://embedforge-unit/pairs.jsonl", "--no-tracking"], "dead-s3",
                                EXIT_TEMPFAIL, "cannot reach the S3 endpoint"),
    "MLflow tracking server unreachable": (["--input", "pairs.jsonl"], "dead-mlflow", EXIT_TEMPFAIL,
                                           "did not answer"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_stage_cli_exits_with_the_code_of_its_failure(case: str, tmp_path: Path) -> None:
    args, env, expected, word = CLI_CASES[case]
    if env == "dead-s3":
        env = {**S3Server(f"http://127.0.0.1:{free_port()}", tmp_path / "s3.log").env, "AWS_MAX_ATTEMPTS": "1",
               "AWS_PROFILE": None, "AWS_ENDPOINT_URL_S3": None}
    elif env == "dead-mlflow":
        env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    code, stderr = _curate(tmp_path, *args, env=env)
    assert code == expected, stderr[-3000:]
    assert word in stderr and RETRY_ADVICE[expected] in stderr and "Traceback" not in stderr, stderr[-3000:]


def test_a_bug_keeps_its_traceback_and_exit_1() -> None:
    done = run_python(["-c", "import sys; from components.cli import guarded; "
                             "sys.exit(guarded(lambda argv: 1 / 0)([]))"])
    assert done.returncode == BUG
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def _component_values(tmp_path: Path, **knobs: str) -> dict[str, object]:
    """What a Kubeflow component body passes to `stage_runner.run` for curate (its `locals()`)."""
    from pipelines.stage_runner import parameter_name

    row = STAGES["curate"]
    values: dict[str, object] = {"params": str(REPO_ROOT / "params.yaml"), "profile": "", "pipeline_run": "",
                                 **{knob: knobs.get(knob, "") for knob in row.knobs}}
    for port in row.inputs:
        values[parameter_name(port)] = str(tmp_path / "pairs.jsonl")
    for port in row.outputs:
        if port.kind is not None:
            values[parameter_name(port)] = SimpleNamespace(path=str(tmp_path / "out" / port.artifact))
    values["metrics"] = SimpleNamespace(log_metric=lambda key, value: None)
    return values


@pytest.mark.parametrize(("knobs", "tracking_up", "expected"), [
    ({"eps": "lots"}, True, EXIT_USAGE),
    ({}, False, EXIT_TEMPFAIL),
], ids=["bad params", "tracking server down"])
def test_the_kubeflow_task_process_exits_with_the_stage_code(
        knobs: dict[str, str], tracking_up: bool, expected: int, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`SystemExit(code)` from the component body: KFP's executor (`python -m kfp.dsl.executor_main`) does not
    catch it, so the container exits with the stage's code."""
    from pipelines.stage_runner import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}" if tracking_up
                       else f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit) as exited:
        run("curate", _component_values(tmp_path, **knobs))
    assert exited.value.code == expected
    assert not (tmp_path / "out").exists()


def test_kfps_executor_lets_the_exit_code_through(tmp_path: Path) -> None:
    component = tmp_path / "component.py"
    component.write_text("def stage():\n    raise SystemExit(75)\n")
    done = run_python(["-m", "kfp.dsl.executor_main", "--component_module_path", str(component),
                       "--function_to_execute", "stage", "--executor_input",
                       json.dumps({"inputs": {}, "outputs": {"outputFile": str(tmp_path / "output.json")}})])
    assert done.returncode == EXIT_TEMPFAIL, done.stderr[-3000:]
