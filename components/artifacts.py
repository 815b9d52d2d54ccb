"""Typed artifact directories: data files plus a `manifest.json`, written atomically and verified on read.

A stage writes into a temporary sibling directory and publishes it with a rename, so a killed or failing stage
never leaves a half artifact that the next stage would trust. Readers check kind, schema version and the
content fingerprint before using anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, of the wrong kind or schema, or its content does not match its manifest."""


@dataclass(frozen=True)
class Manifest:
    kind: str
    schema_version: int
    stage: str
    params_digest: str
    inputs: dict[str, str]
    counts: dict[str, int]
    files: dict[str, str]
    fingerprint: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): file_sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST
    }


def _fingerprint(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def publish(
    target: Path,
    *,
    kind: str,
    schema_version: int,
    stage: str,
    params_digest: str,
    inputs: dict[str, str] | None = None,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield `(tmp_dir, meta)` to write into; on success write the manifest and swap `tmp_dir` into `target`.

    `meta` may receive `counts` (dict[str, int]) and `extra` (dict) for the manifest. On any exception the
    temporary directory is removed and `target` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    meta: dict[str, Any] = {"counts": {}, "extra": {}}
    try:
        yield tmp, meta
        files = _content_hashes(tmp)
        manifest = Manifest(
            kind=kind,
            schema_version=schema_version,
            stage=stage,
            params_digest=params_digest,
            inputs=dict(inputs or {}),
            counts={key: int(value) for key, value in meta["counts"].items()},
            files=files,
            fingerprint=_fingerprint(files),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=meta["extra"],
        )
        (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Clean up after publishes of `target` that were killed (SIGKILL, OOM, power): their temporary directories
    are removed, and a previous version moved aside but never replaced is put back. Only directories whose
    process (the pid in their name) is gone on this machine are touched; returns what was cleaned."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    cleaned = []
    for path in sorted(target.parent.glob(f".{target.name}.*")) if target.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not (target.exists() or target.is_symlink()):
            os.replace(path, target)  # killed between moving the old version aside and moving the new one in
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        cleaned.append(path)
    return cleaned


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file systems without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(second))


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp`. Where the system can, both are exchanged in one atomic step, so `target` is at
    every instant either the old or the new version; elsewhere the old version is moved aside first and only
    deleted once the new one is in (a kill in between is repaired by `remove_stale`)."""
    if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the old version
        return
    if target.exists() or target.is_symlink():
        retired = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, retired)
        os.replace(tmp, target)
        if retired.is_dir() and not retired.is_symlink():
            shutil.rmtree(retired)
        else:
            retired.unlink()
    else:
        os.replace(tmp, target)


def _check_file_names(manifest_path: Path, manifest: Manifest) -> None:
    """Every file a manifest lists is a plain relative path inside the artifact: no absolute path, no `..`."""
    if not isinstance(manifest.files, dict):
        raise ArtifactError(f"{manifest_path}: unreadable manifest (`files` is not a mapping); re-run the "
                            f"producing stage")
    for name in manifest.files:
        path = PurePosixPath(name) if isinstance(name, str) else None
        if (path is None or path.is_absolute() or "\\" in name or name == MANIFEST
                or any(part in ("", ".", "..") for part in name.split("/"))):
            raise ArtifactError(
                f"{manifest_path}: file name {name!r} is not a plain relative path inside the artifact (absolute, "
                f"'..' or empty parts are refused); the manifest was not written by embedforge or was tampered "
                f"with - re-run stage {manifest.stage!r}"
            )


def member(root: Path, manifest: Manifest, name: str) -> Path:
    """The path of file `name` of an artifact read with `read_manifest`; a name its manifest does not list is
    refused, so names taken from records or `extra` can never reach outside the artifact directory."""
    if name not in manifest.files:
        raise ArtifactError(
            f"{root}: no file {name!r} in its manifest; the artifact is incomplete or its records point outside "
            f"it - re-run stage {manifest.stage!r}"
        )
    return Path(root) / name


def read_manifest(path: Path, *, kind: str, schema_version: int, verify: bool = True) -> Manifest:
    """Load and check an artifact's manifest; refuse a wrong kind, schema or a content mismatch."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{path}: no {MANIFEST}; this is not an embedforge artifact or it was never completed. "
            f"Re-run the stage that produces it (`dvc repro`)."
        )
    try:
        manifest = Manifest(**json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc}); re-run the producing stage") from exc
    _check_file_names(manifest_path, manifest)
    if manifest.kind != kind:
        raise ArtifactError(
            f"{path}: expected an artifact of kind {kind!r}, found {manifest.kind!r} (made by stage "
            f"{manifest.stage!r}); check the path, or re-run the stage that produces the {kind} artifact"
        )
    if manifest.schema_version != schema_version:
        raise ArtifactError(
            f"{path}: {kind} schema version {manifest.schema_version} is not the supported {schema_version}; "
            f"re-run stage {manifest.stage!r} with this version of embedforge"
        )
    if verify:
        files = _content_hashes(path)
        if files != manifest.files:
            changed = sorted(set(files.items()) ^ set(manifest.files.items()))
            names = sorted({name for name, _ in changed})
            raise ArtifactError(
                f"{path}: content does not match its manifest (changed, missing or extra: {', '.join(names)}); "
                f"the artifact was modified or corrupted - re-run stage {manifest.stage!r}"
            )
    return manifest
