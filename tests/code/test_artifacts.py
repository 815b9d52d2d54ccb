"""Artifact directories: atomic publish, and reads that refuse anything not exactly what was published."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components.artifacts import MANIFEST, ArtifactError, member, publish, read_manifest, remove_stale

KIND, SCHEMA = "curated_pairs", 1


def _publish(target: Path, payload: str = "v1", **overrides: object) -> None:
    args = {"kind": KIND, "schema_version": SCHEMA, "stage": "curate", "params_digest": "abc123",
            "inputs": {"raw_pairs": "f00d"}} | overrides
    with publish(target, **args) as (tmp, meta):
        (tmp / "pairs.txt").write_text(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "audit.txt").write_text(payload * 2)
        meta["counts"] = {"rows": 3}
        meta["extra"] = {"note": payload}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    target = tmp_path / "out" / "curated"
    _publish(target)
    return target


def test_published_artifact_has_a_manifest_describing_its_files(artifact: Path) -> None:
    manifest = read_manifest(artifact, kind=KIND, schema_version=SCHEMA)
    assert set(manifest.files) == {"pairs.txt", "sub/audit.txt"}
    assert (manifest.stage, manifest.params_digest, manifest.inputs) == ("curate", "abc123", {"raw_pairs": "f00d"})
    assert manifest.counts == {"rows": 3} and manifest.extra == {"note": "v1"}
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.fingerprint)


def test_fingerprint_depends_only_on_content(tmp_path: Path) -> None:
    _publish(tmp_path / "a")
    _publish(tmp_path / "b", params_digest="other")
    _publish(tmp_path / "c", payload="v2")
    prints = [read_manifest(tmp_path / name, kind=KIND, schema_version=SCHEMA).fingerprint for name in "abc"]
    assert prints[0] == prints[1] != prints[2]


def test_republishing_replaces_the_artifact_and_leaves_no_temporary_dirs(artifact: Path) -> None:
    _publish(artifact, payload="v2")
    assert (artifact / "pairs.txt").read_text() == "v2"
    assert read_manifest(artifact, kind=KIND, schema_version=SCHEMA).extra == {"note": "v2"}
    assert [path.name for path in artifact.parent.iterdir()] == ["curated"]


def test_failure_inside_publish_leaves_the_previous_artifact_byte_identical(artifact: Path) -> None:
    before = _snapshot(artifact)
    with pytest.raises(RuntimeError, match="boom"):
        with publish(artifact, kind=KIND, schema_version=SCHEMA, stage="curate", params_digest="x") as (tmp, _):
            (tmp / "pairs.txt").write_text("half written")
            raise RuntimeError("boom")
    assert _snapshot(artifact) == before
    assert [path.name for path in artifact.parent.iterdir()] == ["curated"]
    read_manifest(artifact, kind=KIND, schema_version=SCHEMA)


def test_failure_inside_a_first_publish_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with publish(tmp_path / "new", kind=KIND, schema_version=SCHEMA, stage="curate", params_digest="x") as (tmp, _):
            (tmp / "pairs.txt").write_text("half written")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _modify(artifact: Path) -> None:
    (artifact / "sub" / "audit.txt").write_text("tampered")


def _add(artifact: Path) -> None:
    (artifact / "stray.csv").write_text("a,b\n")


def _remove(artifact: Path) -> None:
    (artifact / "pairs.txt").unlink()


def _drop_manifest(artifact: Path) -> None:
    (artifact / MANIFEST).unlink()


def _corrupt_manifest(artifact: Path) -> None:
    (artifact / MANIFEST).write_text("{not json")


def _stale_manifest(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    del manifest["fingerprint"]
    (artifact / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "kind", "schema", "expected"),
    [
        pytest.param(None, "beir", SCHEMA, r"expected an artifact of kind 'beir', found 'curated_pairs'.*re-run",
                     id="wrong-kind"),
        pytest.param(None, KIND, 2, r"schema version 1 is not the supported 2; re-run stage 'curate'", id="wrong-schema"),
        pytest.param(_modify, KIND, SCHEMA, r"content does not match its manifest.*sub/audit\.txt.*re-run stage 'curate'",
                     id="modified-file"),
        pytest.param(_add, KIND, SCHEMA, r"content does not match its manifest.*stray\.csv.*re-run stage 'curate'",
                     id="extra-file"),
        pytest.param(_remove, KIND, SCHEMA, r"content does not match its manifest.*pairs\.txt.*re-run stage 'curate'",
                     id="missing-file"),
        pytest.param(_drop_manifest, KIND, SCHEMA, r"no manifest\.json.*Re-run the stage", id="missing-manifest"),
        pytest.param(_corrupt_manifest, KIND, SCHEMA, r"unreadable manifest.*re-run the producing stage",
                     id="corrupt-manifest"),
        pytest.param(_stale_manifest, KIND, SCHEMA, r"unreadable manifest.*re-run the producing stage",
                     id="manifest-missing-a-field"),
    ],
)
def test_read_manifest_refuses_a_bad_artifact_naming_the_path_and_the_remedy(
    artifact: Path, damage, kind: str, schema: int, expected: str
) -> None:
    if damage is not None:
        damage(artifact)
    with pytest.raises(ArtifactError) as raised:
        read_manifest(artifact, kind=kind, schema_version=schema)
    assert str(artifact) in str(raised.value)
    assert re.search(expected, str(raised.value), flags=re.IGNORECASE), str(raised.value)


def test_read_manifest_without_verify_skips_the_content_check(artifact: Path) -> None:
    _modify(artifact)
    assert read_manifest(artifact, kind=KIND, schema_version=SCHEMA, verify=False).kind == KIND


def test_read_manifest_of_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=re.escape(f"{tmp_path / 'absent'}: no manifest.json")):
        read_manifest(tmp_path / "absent", kind=KIND, schema_version=SCHEMA)


def test_extra_nested_file_named_like_the_manifest_is_detected(artifact: Path) -> None:
    (artifact / "sub" / MANIFEST).write_text("{}")
    with pytest.raises(ArtifactError, match=r"sub/manifest\.json"):
        read_manifest(artifact, kind=KIND, schema_version=SCHEMA)


@pytest.mark.parametrize(
    "name",
    ["../outside.txt", "sub/../../outside.txt", "/etc/passwd", "", "sub//audit.txt", "./pairs.txt", "sub/.",
     "..\\outside.txt", "manifest.json"],
    ids=["parent", "nested-parent", "absolute", "empty", "empty-part", "dot", "trailing-dot", "backslash", "manifest"],
)
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_a_manifest_listing_a_path_outside_the_artifact_is_refused(artifact: Path, name: str, verify: bool) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"][name] = "0" * 64
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(f"{artifact / MANIFEST}: file name {name!r} is not a plain "
                                                      "relative path inside the artifact") + r".*re-run stage 'curate'"):
        read_manifest(artifact, kind=KIND, schema_version=SCHEMA, verify=verify)


def test_a_manifest_whose_files_is_not_a_mapping_is_refused(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = ["pairs.txt"]
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"`files` is not a mapping"):
        read_manifest(artifact, kind=KIND, schema_version=SCHEMA, verify=False)


def test_member_gives_listed_files_and_refuses_any_other_name(artifact: Path) -> None:
    manifest = read_manifest(artifact, kind=KIND, schema_version=SCHEMA)
    assert member(artifact, manifest, "sub/audit.txt") == artifact / "sub" / "audit.txt"
    for name in ("../out/curated/pairs.txt", "sub/missing.txt", MANIFEST):
        with pytest.raises(ArtifactError, match=re.escape(f"{artifact}: no file {name!r} in its manifest")):
            member(artifact, manifest, name)


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_killed_publish_leaves_a_temporary_dir_that_the_next_publish_removes(artifact: Path) -> None:
    stale = artifact.parent / f".curated.tmp-{_dead_pid()}-0123abcd"
    (stale / "sub").mkdir(parents=True)
    (stale / "pairs.txt").write_text("half written")
    _publish(artifact, payload="v2")
    assert [path.name for path in artifact.parent.iterdir()] == ["curated"]
    assert read_manifest(artifact, kind=KIND, schema_version=SCHEMA).extra == {"note": "v2"}


def test_temporary_dirs_of_a_live_process_or_of_another_artifact_are_left_alone(artifact: Path) -> None:
    import os

    live = artifact.parent / f".curated.tmp-{os.getpid()}-0123abcd"
    other = artifact.parent / f".curated-2.tmp-{_dead_pid()}-0123abcd"
    for path in (live, other):
        path.mkdir()
    _publish(artifact, payload="v2")
    assert sorted(path.name for path in artifact.parent.iterdir()) == sorted(["curated", live.name, other.name])


def test_a_previous_version_moved_aside_by_a_killed_publish_is_put_back(artifact: Path) -> None:
    before = _snapshot(artifact)
    retired = artifact.parent / f".curated.old-{_dead_pid()}-0123abcd"
    artifact.rename(retired)  # killed between moving the old version aside and moving the new one in
    assert remove_stale(artifact) == [retired]
    assert _snapshot(artifact) == before and not retired.exists()
    read_manifest(artifact, kind=KIND, schema_version=SCHEMA)
