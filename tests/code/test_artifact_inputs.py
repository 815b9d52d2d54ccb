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

REPO = Path(__file__).resolve().parents[2]
SCHEMA = 1
# stage -> its input artifact flags and the kind each must be, in the order the CLI declares them
INPUTS = {
    "mine": {"--curated": "curated_pairs", "--embeddings": "embeddings"},
    "train": {"--mined": "mined_pairs", "--curated": "curated_pairs"},
    "distill": {"--teacher": "sentence_transformer", "--mined": "mined_pairs", "--curated": "curated_pairs"},
    "quantize": {"--beir": "beir", "--curated": "curated_pairs"},
    "index": {"--quantized": "quantized_embeddings"},
    "evaluate": {"--beir": "beir", "--quantized": "quantized_embeddings", "--index": "faiss_indexes"},
    "register": {"--student": "sentence_transformer", "--quantized": "quantized_embeddings",
                 "--evaluation": "evaluation"},
}
OUTPUTS = {  # stage -> output flags (artifact, metrics and the like) pointed into the test's directory
    "mine": ["--output", "--metrics", "--plot"],
    "train": ["--output", "--checkpoints", "--metrics"],
    "distill": ["--output", "--checkpoints", "--metrics"],
    "quantize": ["--output", "--metrics"],
    "index": ["--output", "--metrics"],
    "evaluate": ["--output", "--metrics", "--report", "--plots"],
    "register": ["--metrics"],
}
# inputs that may also be a plain directory (any BEIR set; any sentence-transformers model): without a manifest
# the stage's own reader checks them, so only a manifest that is wrong or does not match is refused up front
MANIFEST_OPTIONAL = {("evaluate", "--beir"), ("register", "--student")}


def _artifact(path: Path, kind: str) -> Path:
    """An intact artifact of `kind`: its manifest and one data file (the stage never gets to read it)."""
    with publish(path, kind=kind, schema_version=SCHEMA, stage="test", params_digest="t") as (tmp, _):
        (tmp / "data.bin").write_bytes(b"\x00" * 64)
    return path


def _run(stage: str, inputs: dict[str, Path], out: Path) -> int:
    argv = [stage, "--params", str(REPO / "params.yaml"), "--profile", "smoke", "--no-tracking"]
    for flag, path in inputs.items():
        argv += [flag, str(path)]
    for flag in OUTPUTS[stage]:
        argv += [flag, str(out / flag.removeprefix("--"))]
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


CASES = [(stage, flag, fault) for stage, flags in INPUTS.items() for flag in flags
         for fault in (_wrong_kind, _tampered, _not_an_artifact)
         if not (fault is _not_an_artifact and (stage, flag) in MANIFEST_OPTIONAL)]


@pytest.mark.parametrize(("stage", "flag", "fault"), CASES,
                         ids=[f"{stage}{flag}-{fault.__name__[1:]}" for stage, flag, fault in CASES])
def test_a_bad_input_artifact_is_refused_before_any_work_naming_it(
        stage: str, flag: str, fault: Callable[[Path, str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inputs = {name: _artifact(tmp_path / "inputs" / name.removeprefix("--"), kind)
              for name, kind in INPUTS[stage].items() if name != flag}
    bad = tmp_path / "bad" / flag.removeprefix("--")
    expected = fault(bad, INPUTS[stage][flag])
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="embedforge"):
        code = _run(stage, {**inputs, flag: bad}, out)
    assert code == 2
    message = caplog.records[-1].getMessage()
    assert message.startswith(str(bad)), message
    assert re.search(expected, message), message
    assert not out.exists(), sorted(path.name for path in out.rglob("*"))
