"""Artifacts and input files on S3: `s3://bucket/prefix` URIs wherever a stage takes a local path.

Stages only ever work on local paths; this module moves artifacts between S3 and the local disk around them:

- an input artifact at `s3://bucket/prefix` is read through its `manifest.json` first: every file the manifest
  lists is downloaded and checked against its sha256 into a local cache entry keyed by the manifest's own
  hash (immutable, so concurrent readers and repeated reads are safe); a prefix without a manifest is not an
  artifact and is refused;
- an output artifact is published locally with `artifacts.publish` (atomic, as for local outputs) and then
  uploaded: the old manifest is deleted first, then every file is uploaded, objects of an older version are
  removed, and `manifest.json` goes last. A reader therefore never trusts a half-written prefix: until the
  upload completes there is no manifest.

Credentials, region and endpoint come from boto3's own chain only (`AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `~/.aws/config`; `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for an
S3-compatible server): nothing here reads, stores or logs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from components.artifacts import MANIFEST, ArtifactError, file_sha256

S3Client = Any  # boto3's client class is generated at run time

log = logging.getLogger(__name__)

SCHEME = "s3://"
CACHE_ENV = "EMBEDFORGE_CACHE_DIR"
# Retries and timeouts for every S3 call: `standard` retries throttling, 5xx and connection errors with
# exponential backoff; a dead endpoint fails within about a minute instead of hanging a pipeline. The standard
# AWS_RETRY_MODE / AWS_MAX_ATTEMPTS environment variables override the retry defaults.
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


class StorageError(RuntimeError):
    """An S3 location is malformed, refused (credentials, access), missing, or holds no (complete) artifact."""


class StorageUnavailable(StorageError):
    """S3 did not answer, timed out, or was overloaded (5xx, throttling) after boto's retries: a later retry may
    succeed, unlike the other `StorageError`s."""


# S3 error codes that mean "busy or failing, try later" (as botocore's standard retry mode counts them).
TRANSIENT_ERROR_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
                                   "RequestLimitExceeded", "BandwidthLimitExceeded", "TooManyRequestsException",
                                   "RequestTimeout", "RequestTimeoutException", "InternalError",
                                   "ServiceUnavailable", "PriorRequestNotComplete"})


def is_s3(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/key`; the key of an artifact is a prefix (no trailing slash), of a file an object key."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not is_s3(uri):
            raise StorageError(f"{uri!r} is not an s3:// URI")
        bucket, _, key = uri.removeprefix(SCHEME).partition("/")
        key = key.strip("/")
        if not bucket or not key:
            raise StorageError(f"{uri!r}: expected s3://BUCKET/PREFIX (an artifact needs its own prefix, "
                               f"never a whole bucket)")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise StorageError(f"{uri!r}: empty, '.' or '..' path segments are not allowed in an S3 prefix")
        return cls(bucket, key)

    def child(self, name: str) -> str:
        return f"{self.key}/{name}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def s3_client() -> S3Client:
    """A boto3 S3 client with retries and timeouts set; endpoint and credentials from the environment/profile.

    Made per call, not cached: the environment (endpoint, profile) is read when the client is created.
    """
    import boto3
    from botocore.config import Config

    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
               "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", MAX_ATTEMPTS))}
    config = Config(retries=retries, connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    user_agent_extra="embedforge")
    return boto3.session.Session().client("s3", config=config)


def transient(exc: BaseException) -> bool:
    """A boto error that a later retry may get past: the endpoint unreachable, a connection dropped or timed
    out, throttling or a server-side (5xx) error. Never true for refused, missing or malformed requests, nor for
    TLS certificate failures."""
    if "botocore" not in sys.modules:  # no boto error can exist before botocore is imported
        return False
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError, SSLError

    if isinstance(exc, ClientError):
        status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return _error_code(exc) in TRANSIENT_ERROR_CODES or status >= 500
    return isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError)) and not isinstance(exc, SSLError)


def _explain(exc: Exception, uri: str, doing: str) -> StorageError:
    """Turn a boto error into one actionable line; boto's messages carry no secrets, and neither does this.

    What a retry may get past (see `transient`) becomes a `StorageUnavailable`, anything else a `StorageError`.
    """
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    cause = exc.__context__ if isinstance(exc.__context__, ClientError) else exc  # boto3's S3UploadFailedError
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials while {doing}; set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, EndpointConnectionError):
        return StorageUnavailable(f"{uri}: cannot reach the S3 endpoint while {doing} ({exc}); check "
                                  f"AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and that the server is up")
    if transient(cause):
        return StorageUnavailable(f"{uri}: S3 was unavailable while {doing}, still after boto's retries "
                                  f"({_error_code(cause) or type(cause).__name__}: {cause})")
    if isinstance(exc, ClientError):
        code = _error_code(exc) or "?"
        advice = {"NoSuchBucket": "create the bucket or fix the URI",
                  "AccessDenied": "the credentials in use may not access it",
                  "InvalidAccessKeyId": "the access key is not known to this endpoint",
                  "SignatureDoesNotMatch": "the secret key does not match the access key"}.get(code, "")
        return StorageError(f"{uri}: S3 refused {doing} ({code}){'; ' + advice if advice else ''}")
    return StorageError(f"{uri}: {doing} failed: {exc}")


def _error_code(exc: Exception) -> str:
    """The S3 error code of a botocore `ClientError` ("404", "NoSuchKey", ...), else ""."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _boto_errors() -> tuple[type[Exception], ...]:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, S3UploadFailedError)


def cache_root() -> Path:
    """Where downloaded artifacts live: `EMBEDFORGE_CACHE_DIR`, else `$XDG_CACHE_HOME/embedforge`.

    Entries are keyed by content, never modified once written, and may be deleted at any time.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedforge"


def _safe_relative(name: str, uri: str) -> PurePosixPath:
    """A manifest's file name as a relative path that cannot leave the artifact directory."""
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in path.parts) or name == MANIFEST:
        raise StorageError(f"{uri}/{MANIFEST}: file name {name!r} is not a plain relative path; "
                           f"the manifest is not one embedforge wrote")
    return path


def _read_remote_manifest(client: S3Client, uri: S3Uri) -> tuple[bytes, dict[str, Any]]:
    try:
        body = client.get_object(Bucket=uri.bucket, Key=uri.child(MANIFEST))["Body"].read()
    except client.exceptions.NoSuchKey:
        listed = client.list_objects_v2(Bucket=uri.bucket, Prefix=uri.key + "/", MaxKeys=1)
        if listed.get("KeyCount", 0):
            raise ArtifactError(
                f"{uri}: objects but no {MANIFEST}; this is not an embedforge artifact, or its upload never "
                f"completed (the manifest is uploaded last). Re-run the stage that writes it."
            ) from None
        raise ArtifactError(f"{uri}: nothing there; check the URI, or run the stage that writes it") from None
    try:
        manifest = json.loads(body)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{uri}/{MANIFEST}: unreadable manifest ({exc}); re-run the producing stage") from exc
    if not isinstance(files, dict):
        raise ArtifactError(f"{uri}/{MANIFEST}: unreadable manifest (`files` is not a mapping); re-run its stage")
    return body, manifest


def fetch_artifact(uri: str) -> Path:
    """Materialise the artifact at `uri` in the local cache and return its directory (verified content)."""
    location = S3Uri.parse(uri)
    client = s3_client()
    try:
        body, manifest = _read_remote_manifest(client, location)
        entry = cache_root() / "s3" / location.bucket / location.key / hashlib.sha256(body).hexdigest()[:32]
        if (entry / MANIFEST).is_file():
            log.info("%s: using the cached copy %s", location, entry)
            return entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for name, sha256 in sorted(manifest["files"].items()):
                relative = _safe_relative(name, str(location))
                target = tmp.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(location.bucket, location.child(name), str(target))
                if file_sha256(target) != sha256:
                    raise ArtifactError(
                        f"{location}/{name}: content does not match the artifact's manifest; the prefix was "
                        f"modified or is being rewritten - retry, or re-run stage {manifest.get('stage')!r}"
                    )
            (tmp / MANIFEST).write_bytes(body)
            try:
                os.rename(tmp, entry)
            except OSError:  # another process published the same entry first: same content, keep theirs
                if not (entry / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except _boto_errors() as exc:
        if _error_code(exc) in ("404", "NoSuchKey"):
            raise ArtifactError(f"{location}: a file its manifest lists is missing on S3 ({exc}); the prefix "
                                f"was modified - re-run the stage that writes it") from None
        raise _explain(exc, str(location), "reading the artifact") from None
    log.info("%s: downloaded %d files to %s", location, len(manifest["files"]), entry)
    return entry


def fetch_file(uri: str) -> Path:
    """Materialise one object (an input pairs file, say) in the local cache, keeping its file name."""
    from botocore.exceptions import ClientError

    location = S3Uri.parse(uri)
    client = s3_client()
    try:
        try:
            head = client.head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey"):
                raise StorageError(f"{location}: no such object; check the URI (a file, not a prefix)") from None
            raise
        version = head["ETag"].strip('"').replace("-", "_") or "unversioned"
        name = PurePosixPath(location.key).name
        entry = cache_root() / "s3" / location.bucket / location.key / version
        if (entry / name).is_file():
            return entry / name
        entry.mkdir(parents=True, exist_ok=True)
        tmp = entry / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            client.download_file(location.bucket, location.key, str(tmp))
            os.replace(tmp, entry / name)
        finally:
            tmp.unlink(missing_ok=True)
    except _boto_errors() as exc:
        raise _explain(exc, str(location), "reading the file") from None
    log.info("%s: downloaded to %s", location, entry / name)
    return entry / name


def upload_artifact(local: Path, uri: str) -> None:
    """Upload a published local artifact to `uri`, `manifest.json` last; on any failure no manifest is there.

    Each file is checked against the manifest's sha256 as it is uploaded, so what lands on S3 is exactly what
    the manifest describes. Objects under the prefix that belong to an older version are deleted.
    """
    location = S3Uri.parse(uri)
    manifest_path = Path(local) / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{local}: no {MANIFEST}; only a published artifact can be uploaded to {location}")
    body = manifest_path.read_bytes()
    files: dict[str, str] = json.loads(body)["files"]
    client = s3_client()
    try:
        client.delete_object(Bucket=location.bucket, Key=location.child(MANIFEST))  # from now on: not an artifact
        for name, sha256 in sorted(files.items()):
            path = Path(local).joinpath(*_safe_relative(name, str(location)).parts)
            if not path.is_file() or file_sha256(path) != sha256:
                raise ArtifactError(f"{path}: missing or changed since the artifact was published; not uploading "
                                    f"to {location} (its prefix now has no {MANIFEST}) - re-run the stage")
            client.upload_file(str(path), location.bucket, location.child(name))
        keep = {location.child(name) for name in files}
        stale = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                     Bucket=location.bucket, Prefix=location.key + "/")
                 for item in page.get("Contents", []) if item["Key"] not in keep]
        for start in range(0, len(stale), 1000):
            client.delete_objects(Bucket=location.bucket,
                                  Delete={"Objects": [{"Key": key} for key in stale[start:start + 1000]]})
        client.put_object(Bucket=location.bucket, Key=location.child(MANIFEST), Body=body,
                          ContentType="application/json")
    except _boto_errors() as exc:
        raise _explain(exc, str(location), "uploading the artifact") from None
    log.info("%s: uploaded %d files (manifest last)%s", location, len(files),
             f", removed {len(stale)} stale objects" if stale else "")


def local_dir(reference: str | Path) -> Path:
    """A directory reference as a local path: an `s3://` artifact is fetched first, anything else is as given."""
    return fetch_artifact(str(reference)) if is_s3(reference) else Path(reference)


@dataclass
class Staging:
    """Outputs a stage writes locally and publishes to S3 after its work succeeds."""

    uploads: list[tuple[Path, str]] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)

    def output_path(self, uri: str) -> Path:
        """A fresh local path (not yet existing) to publish the artifact for `uri` into."""
        import tempfile

        location = S3Uri.parse(uri)
        parent = Path(tempfile.mkdtemp(prefix="embedforge-out-"))
        self.temp_dirs.append(parent)
        local = parent / PurePosixPath(location.key).name
        self.uploads.append((local, str(location)))
        return local

    def upload(self) -> None:
        for local, uri in self.uploads:
            upload_artifact(local, uri)

    def cleanup(self) -> None:
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self.temp_dirs.clear()
