"""The reliability report of issue #7 (`bench/reliability.py`) runs in CI and its figures hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_python


@pytest.mark.slow
def test_the_reliability_report_finds_every_bad_input_rejected_cleanly_and_nothing_corrupted(tmp_path: Path) -> None:
    report = tmp_path / "reliability.json"
    result = run_python(["bench/reliability.py", "--json", str(report)], env={"HF_HUB_OFFLINE": "1"},
                        timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(result.stdout)  # the report itself, in the CI log
    figures = json.loads(report.read_text())["figures"]
    assert figures["bad_input_runs"] == 2 * figures["bad_input_cases"] > 0
    assert figures["rejected_cleanly"] == figures["bad_input_runs"]
    assert figures["crashed"] == figures["accepted_silently"] == figures["rejected_without_a_clear_message"] == 0
    assert figures["artifacts_corrupted_or_half_written"] == 0
    assert figures["fault_injections_survived"] == figures["fault_injections"] == 3
    assert "## Figures" in result.stdout
