"""Bad input, tried systematically (issue #7 item 2): every case of `bad_input_cases.CASES` runs the real stage
CLI and must stop with exit code 2 and one clear message naming the input (file and line, or the params key)
and what was expected, with no traceback and no output artifact written or changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.code.bad_input_cases import CASES, BadInput, CaseResult, Stage, fingerprints, run_case, snapshot, valid_run


def _explain(result: CaseResult) -> str:
    return (f"exit {result.outcome.exit_code}; message {result.message!r}; must name {result.where!r} then match "
            f"{result.case.expected!r}\n{result.outcome.crash or result.outcome.console[-2000:]}")


@pytest.fixture(scope="module")
def previous_outputs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[Stage, Path]:
    """Each stage run once on valid inputs through the same harness: the outputs a bad run must not touch."""
    outputs: dict[Stage, Path] = {}
    for stage in ("curate", "evaluate"):
        outcome, out = valid_run(tmp_path_factory.mktemp(f"valid-{stage}"), tiny_model_dir, stage)
        assert outcome.exit_code == 0 and outcome.crash is None, outcome.crash or outcome.console[-3000:]
        outputs[stage] = out
    return outputs


def test_the_harness_runs_valid_inputs_to_published_verified_outputs(previous_outputs: dict[Stage, Path]) -> None:
    assert set(fingerprints(previous_outputs["curate"])) == {"curated", "embeddings", "beir"}
    assert {"curate.json", "drops.csv"} <= set(snapshot(previous_outputs["curate"]))
    assert set(snapshot(previous_outputs["evaluate"])) == {"evaluate.json"}


def test_the_table_covers_every_kind_of_input_and_has_unique_ids() -> None:
    assert len({case.id for case in CASES}) == len(CASES)
    counts = {kind: sum(case.input_kind == kind for case in CASES) for kind in ("raw_pairs", "beir", "params")}
    assert min(counts.values()) >= 10, counts


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_2_naming_the_input_and_writes_no_output(
    case: BadInput, tmp_path: Path, tiny_model_dir: Path
) -> None:
    result = run_case(case, tmp_path / "run", tiny_model_dir)
    assert not result.crashed, _explain(result)
    assert result.outcome.exit_code == 2, _explain(result)
    assert result.names_the_input, _explain(result)
    assert result.says_what_was_expected, _explain(result)
    assert result.outputs_changed == [] and not (tmp_path / "run" / "out").exists(), result.outputs_changed
    assert result.stray_files == [] and result.leftovers == []
    assert result.rejected_cleanly


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_leaves_previously_published_outputs_byte_identical(
    case: BadInput, tmp_path: Path, tiny_model_dir: Path, previous_outputs: dict[Stage, Path]
) -> None:
    baseline = previous_outputs[case.stage]
    result = run_case(case, tmp_path / "run", tiny_model_dir, baseline=baseline)
    assert result.outcome.exit_code == 2 and not result.crashed, _explain(result)
    assert result.outputs_changed == [], result.outputs_changed
    assert fingerprints(tmp_path / "run" / "out") == fingerprints(baseline)
    assert result.leftovers == [] and result.stray_files == []
    assert result.rejected_cleanly
