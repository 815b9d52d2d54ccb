"""Artifacts on S3 (a real moto_server): what a reader of an `s3://` prefix may trust, and when."""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from components import storage
from components.artifacts import MANIFEST, ArtifactError, publish, read_manifest
from components.cli import Location, artifact_in, artifact_out, local_path, prepare_stage
from tests.servers import S3Server, StoppingProxy, free_port, moto_server, s3_env  # noqa: F401  (pytest fixtures)

KIND, SCHEMA = "curated_pairs", 1
BUCKET = "embedforge-unit"


def _publish(target: Path, files: dict[str, str], params_digest: str = "abc") -> Path:
    with publish(target, kind=KIND, schema_version=SCHEMA, stage="curate", params_digest=params_digest) as (tmp, meta):
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        meta["counts"] = {"rows": len(files)}
    return target


def _tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def prefix(s3_env: S3Server) -> str:
    """A fresh `s3://` prefix in an existing bucket."""
    s3_env.create_bucket(BUCKET)
    return f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}/curated"


def _keys(server: S3Server, uri: str) -> set[str]:
    location = storage.S3Uri.parse(uri)
    return {key.removeprefix(location.key + "/") for key in server.keys(location.bucket, location.key + "/")}


def test_an_artifact_round_trips_through_s3_byte_for_byte(s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    local = _publish(tmp_path / "curated", {"pairs.txt": "a\nb\n", "sub/audit.txt": "ü" * 3000})
    storage.upload_artifact(local, prefix)
    assert _keys(s3_env, prefix) == {"pairs.txt", "sub/audit.txt", MANIFEST}
    fetched = storage.fetch_artifact(prefix)
    assert _tree(fetched) == _tree(local)
    assert read_manifest(fetched, kind=KIND, schema_version=SCHEMA).counts == {"rows": 2}
    assert fetched.is_relative_to(tmp_path / "s3-cache")


def test_upload_deletes_the_old_manifest_first_and_writes_the_new_one_last(
        s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    local = _publish(tmp_path / "curated", {"a.txt": "1", "b.txt": "2", "c/d.txt": "3"})
    with s3_env.recording() as requests:
        storage.upload_artifact(local, prefix)
    writes = [(request["method"], request["url"].rsplit("/", 1)[-1].split("?")[0]) for request in requests
              if request["method"] in ("PUT", "DELETE", "POST")]
    assert writes[0] == ("DELETE", MANIFEST)
    assert writes[-1] == ("PUT", MANIFEST)
    assert sorted(name for method, name in writes[1:-1] if method == "PUT") == ["a.txt", "b.txt", "d.txt"]


def test_a_prefix_with_files_but_no_manifest_is_not_an_artifact(s3_env: S3Server, prefix: str) -> None:
    location = storage.S3Uri.parse(prefix)
    s3_env.client().put_object(Bucket=location.bucket, Key=location.child("pairs.txt"), Body=b"half an upload")
    with pytest.raises(ArtifactError, match=r"objects but no manifest\.json; this is not an embedforge artifact, "
                                            r"or its upload never completed") as error:
        storage.fetch_artifact(prefix)
    assert prefix in str(error.value) and "Re-run the stage" in str(error.value)


def test_an_empty_prefix_says_nothing_is_there(s3_env: S3Server, prefix: str) -> None:
    with pytest.raises(ArtifactError, match=f"{prefix}: nothing there; check the URI"):
        storage.fetch_artifact(prefix)


def test_a_failing_upload_leaves_no_manifest_so_readers_refuse_the_prefix(
        s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    storage.upload_artifact(_publish(tmp_path / "v1", {"a.txt": "old a", "b.txt": "old b"}), prefix)
    storage.fetch_artifact(prefix)  # v1 is a complete artifact
    v2 = _publish(tmp_path / "v2", {"a.txt": "new a", "b.txt": "new b"})
    (v2 / "b.txt").write_text("changed after publishing")  # the upload fails at b.txt, after a.txt went up
    with pytest.raises(ArtifactError, match=r"b\.txt: missing or changed since the artifact was published"):
        storage.upload_artifact(v2, prefix)
    assert _keys(s3_env, prefix) == {"a.txt", "b.txt"}  # new a.txt, old b.txt: a mix no reader may trust
    with pytest.raises(ArtifactError, match="no manifest.json"):
        storage.fetch_artifact(prefix)


def test_the_server_stopping_mid_upload_gives_bounded_retries_then_a_clear_error_and_no_artifact(
        s3_env: S3Server, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.upload_artifact(_publish(tmp_path / "v1", {"a.txt": "old a", "b.txt": "old b"}), prefix)
    v2 = _publish(tmp_path / "v2", {name: name * 100_000 for name in ("a.txt", "b.txt", "c.txt", "d.txt")})
    proxy = StoppingProxy(urlsplit(s3_env.endpoint).port or 0, stop_after_puts=2)  # dies on the third file
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"{prefix}: .*uploading the artifact") as error:
        storage.upload_artifact(v2, prefix)
    assert proxy.stopped.is_set() and proxy.puts == 3
    assert time.monotonic() - started < 30, "retries must be bounded, not wait on a dead server"
    assert "cannot reach the S3 endpoint" in str(error.value) and "the server is up" in str(error.value)
    assert MANIFEST not in _keys(s3_env, prefix)  # the server behind the proxy: nothing published
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        storage.fetch_artifact(prefix)
    storage.upload_artifact(v2, prefix)  # the server is back: the same local artifact goes up whole
    assert _tree(storage.fetch_artifact(prefix)) == _tree(v2)


def test_a_new_version_replaces_the_old_one_without_leftovers(s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    storage.upload_artifact(_publish(tmp_path / "v1", {"a.txt": "1", "old/only.txt": "gone soon"}), prefix)
    v2 = _publish(tmp_path / "v2", {"a.txt": "2", "new.txt": "3"})
    storage.upload_artifact(v2, prefix)
    assert _keys(s3_env, prefix) == {"a.txt", "new.txt", MANIFEST}
    assert _tree(storage.fetch_artifact(prefix)) == _tree(v2)


def test_an_object_changed_on_s3_is_refused_when_read(s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    storage.upload_artifact(_publish(tmp_path / "curated", {"a.txt": "1", "b.txt": "2"}), prefix)
    location = storage.S3Uri.parse(prefix)
    s3_env.client().put_object(Bucket=location.bucket, Key=location.child("b.txt"), Body=b"tampered")
    with pytest.raises(ArtifactError, match=r"b\.txt: content does not match the artifact's manifest"):
        storage.fetch_artifact(prefix)
    assert not list((tmp_path / "s3-cache").rglob("b.txt"))  # nothing half-verified stays in the cache


def test_a_second_read_of_the_same_version_comes_from_the_cache(
        s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    storage.upload_artifact(_publish(tmp_path / "curated", {"a.txt": "1"}), prefix)
    first = storage.fetch_artifact(prefix)
    with s3_env.recording() as requests:
        second = storage.fetch_artifact(prefix)
    assert second == first
    assert [request["url"].rsplit("/", 1)[-1] for request in requests if request["method"] == "GET"] == [MANIFEST]


def test_the_same_files_under_a_new_manifest_are_not_served_from_the_cache(
        s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    storage.upload_artifact(_publish(tmp_path / "v1", {"a.txt": "1"}, params_digest="old"), prefix)
    storage.fetch_artifact(prefix)
    storage.upload_artifact(_publish(tmp_path / "v2", {"a.txt": "1"}, params_digest="new"), prefix)
    assert read_manifest(storage.fetch_artifact(prefix), kind=KIND, schema_version=SCHEMA).params_digest == "new"


def test_a_single_file_is_fetched_with_its_name(s3_env: S3Server, prefix: str) -> None:
    location = storage.S3Uri.parse(prefix)
    s3_env.client().put_object(Bucket=location.bucket, Key=location.child("pairs.jsonl.gz"), Body=b"\x1f\x8b")
    path = storage.fetch_file(f"{prefix}/pairs.jsonl.gz")
    assert path.name == "pairs.jsonl.gz" and path.read_bytes() == b"\x1f\x8b"
    with pytest.raises(storage.StorageError, match=r"/nope\.jsonl: no such object; check the URI"):
        storage.fetch_file(f"{prefix}/nope.jsonl")


def test_a_missing_bucket_is_named_with_what_to_do(s3_env: S3Server) -> None:
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-here/x: S3 refused .*NoSuchBucket.*create "
                                                   r"the bucket or fix the URI"):
        storage.fetch_artifact("s3://no-such-bucket-here/x")


def test_an_unreachable_endpoint_is_named_with_what_to_do(
        s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint .* check AWS_ENDPOINT_URL"):
        storage.fetch_artifact(f"s3://{BUCKET}/x")


def test_missing_credentials_are_reported_without_guessing_any(
        s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError, match="no AWS credentials .* set AWS_ACCESS_KEY_ID"):
        storage.fetch_artifact(f"s3://{BUCKET}/x")


def test_the_secret_key_never_reaches_the_logs(
        s3_env: S3Server, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with caplog.at_level(logging.DEBUG):
        storage.upload_artifact(_publish(tmp_path / "curated", {"a.txt": "1"}), prefix)
        storage.fetch_artifact(prefix)
    assert f"{prefix}: uploaded 1 files" in caplog.text
    assert secret not in caplog.text


@pytest.mark.parametrize("uri", ["s3://", "s3://bucket-only", "s3://bucket/", "s3://bucket/a/../b"])
def test_a_uri_without_bucket_and_prefix_is_refused(uri: str) -> None:
    with pytest.raises(storage.StorageError, match="expected s3://BUCKET/PREFIX|'..' path segments"):
        storage.S3Uri.parse(uri)
    with pytest.raises(argparse.ArgumentTypeError):
        artifact_out(uri)


def test_metrics_and_plots_must_be_local_paths() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be a local path"):
        local_path("s3://bucket/metrics/curate.json")
    assert local_path("metrics/curate.json") == Path("metrics/curate.json")


def test_a_stage_sees_local_paths_and_its_s3_outputs_are_uploaded_after_its_work(
        s3_env: S3Server, prefix: str, tmp_path: Path) -> None:
    from components.cli import StageOutcome, run_stage

    storage.upload_artifact(_publish(tmp_path / "curated", {"a.txt": "1"}), prefix)
    output = prefix.replace("/curated", "/mined")
    curated = artifact_in(KIND, SCHEMA)
    args = argparse.Namespace(curated=curated(prefix), output=artifact_out(output),
                              local=curated(str(tmp_path / "curated")), no_tracking=True)
    prepare_stage(args)
    assert not any(isinstance(value, Location) for value in vars(args).values())
    assert args.local == tmp_path / "curated"
    assert (args.curated / "a.txt").read_text() == "1"
    assert not args.output.exists()

    def work() -> StageOutcome:
        _publish(args.output, {"b.txt": "2"})
        assert _keys(s3_env, output) == set()  # nothing on S3 until the work is done
        return StageOutcome(metrics={}, data_fingerprint="x")

    run_stage("mine", args, None, work, metrics_path=None)  # type: ignore[arg-type]
    assert _keys(s3_env, output) == {"b.txt", MANIFEST}
    assert not args.output.exists()  # the local staging copy is gone
