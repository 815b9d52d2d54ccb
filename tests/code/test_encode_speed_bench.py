"""`bench/encode_speed.py`, the benchmark the README's student/teacher throughput ratios come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.data import BeirDataset, write_beir
from tests.helpers import run_python


@pytest.mark.slow
def test_encode_speed_reports_each_models_median_and_its_ratio_to_the_first(tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    texts = [f"package {i} installs the tool number {i} and its manual pages" for i in range(12)]
    write_beir(tmp_path / "beir", BeirDataset(corpus={f"d{i}": text for i, text in enumerate(texts)},
                                              queries={"q0": texts[0]}, qrels={"q0": {"d0": 1}}))
    report = tmp_path / "speed.json"
    result = run_python(
        ["bench/encode_speed.py", "--model", f"reference={tiny_model_dir}",
         "--model", f"other={tiny_model_dir}", "--beir", str(tmp_path / "beir"), "--passages", "10",
         "--repeats", "3", "--batch-size", "4", "--json", str(report)], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(report.read_text())
    assert list(rows) == ["reference", "other"]
    assert rows["reference"]["x_reference"] == 1.0
    for row in rows.values():
        assert row["layers"] == 2
        assert 0 < row["min_per_s"] <= row["median_per_s"] <= row["max_per_s"]
        assert row["x_reference"] == pytest.approx(row["median_per_s"] / rows["reference"]["median_per_s"])
    assert "| reference | 2 |" in result.stdout and "| other | 2 |" in result.stdout
