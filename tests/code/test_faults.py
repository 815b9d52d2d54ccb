"""Faults (issue #7 item 3, the light ones): a stage killed or out of disk while it publishes never leaves a
half artifact, keeps the previous one byte-identical, and the next run completes and cleans up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from components.cli import EXIT_TEMPFAIL
from tests.code.faults import disk_full_while_publishing, kill_while_publishing


@pytest.mark.slow
def test_sigkill_while_publishing_keeps_the_previous_artifacts_and_the_rerun_cleans_up(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    result = kill_while_publishing(tmp_path, tiny_model_dir)
    assert result.hit_mid_publish, f"the kill did not land while publishing: {result.message}"
    assert result.exit_code == -9
    assert result.previous_intact and result.all_verified
    assert len(result.leftovers) == 1 and result.leftovers[0].startswith(".embeddings.tmp-")  # until the next publish
    assert result.rerun_exit_code == 0 and result.rerun_leftovers == ()
    assert result.survived


@pytest.mark.parametrize("point", ["data-file", "manifest"])
def test_disk_full_while_publishing_exits_75_naming_the_file_and_publishes_nothing_partial(
    tmp_path: Path, tiny_model_dir: Path, point: str
) -> None:
    result = disk_full_while_publishing(tmp_path, tiny_model_dir, point)  # type: ignore[arg-type]
    assert result.hit_mid_publish
    assert result.exit_code == EXIT_TEMPFAIL, result.message  # transient: retried
    name = "embeddings.npy" if point == "data-file" else "manifest.json"
    assert re.search(rf"\.tmp-\d+-[0-9a-f]{{8}}/{re.escape(name)}: No space left on device; nothing was published",
                     result.message), result.message
    assert result.previous_intact and result.all_verified
    assert result.leftovers == []
    assert result.rerun_exit_code == 0 and result.rerun_leftovers == ()
    assert result.survived
