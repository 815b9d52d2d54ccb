"""Every stage CLI checks every input artifact before any work: a wrong kind, a tampered file or a directory
that is no artifact at all is refused with exit 2 and a message naming the artifact and the fix, and the
stage writes nothing."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from components.artifacts import publish
from components.cli import main as embedforge
from components.stages import STAGES, Port
from tests.helpers import REPO_ROOT

SCHEMA = 1
# every input artifact of every stage in the table; a plain input file (curate's raw pairs) has no manifest
CASES_BY_STAGE = {name: [port for port in stage.inputs if port.kind is not None] for name, stage in STAGES.items()}


def _artifact(path: Path, kind: str) -> Path:
    """An intact artifact of `kind`: its manifest and one data file (the stage never gets to read it)."""
    with publish(path, kind=kind, schema_version=SCHEMA, stage="test", params_digest="t") as (tmp, _):
        (tmp / "data.bin").write_bytes(b"\x00" * 64)
    return path


def _run(stage: str, inputs: dict[str, Path], out: Path) -> int:
    """The stage CLI on these inputs, every output (artifact, metrics, plots...) pointed into `out`."""
    argv = [stage, "--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke", "--no-tracking"]
    for flag, path in inputs.items():
        argv += [flag, str(path)]
    for port in STAGES[stage].outputs:
        argv += [port.flag, str(out / port.name)]
    return embedforge(argv)


def _wrong_kind(path: Path, kind: str) -> str:
    other = "evaluation" if kind != "evaluation" else "beir"
    _artifact(path, other)
    return rf"expected an artifact of kind '{kind}', found '{other}'.*re-run the stage that produces"


def _tampered(path: Path, kind: str) -> str:
    _artifact(path, kind)
    (path / "data.bin").write_bytes(b"\x01" * 64)
    return r"content does not match its manifest \(changed, missing or extra: data\.bin\).*re-run stage 'test'"


def _not_an_artifact(path: Path, kind: str) -> str:
    path.mkdir(parents=True)
    (path / "data.bin").write_bytes(b"\x00" * 64)
    return r"no manifest\.json; this is not an embedforge artifact or it was never completed"


CASES = [(stage, port, fault) for stage, ports in CASES_BY_STAGE.items() for port in ports
         for fault in (_wrong_kind, _tampered, _not_an_artifact)
         if not (fault is _not_an_artifact and port.manifest_optional)]


@pytest.mark.parametrize(("stage", "port", "fault"), CASES,
                         ids=[f"{stage}{port.flag}-{fault.__name__[1:]}" for stage, port, fault in CASES])
def test_a_bad_input_artifact_is_refused_before_any_work_naming_it(
        stage: str, port: Port, fault: Callable[[Path, str], str], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    inputs = {other.flag: _artifact(tmp_path / "inputs" / other.name, other.kind.kind)
              for other in CASES_BY_STAGE[stage] if other != port}
    bad = tmp_path / "bad" / port.name
    expected = fault(bad, port.kind.kind)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="embedforge"):
        code = _run(stage, {**inputs, port.flag: bad}, out)
    assert code == 2
    message = caplog.records[-1].getMessage()
    assert message.startswith(str(bad)), message
    assert re.search(expected, message), message
    assert not out.exists(), sorted(path.name for path in out.rglob("*"))
