"""mine: hard negatives never include the positive or a duplicate of it, and likely false negatives are dropped."""

from __future__ import annotations

import numpy as np
import pytest

from components.config import ConfigError, build_config
from components.mine import MineConfig, select_negatives
from tests.helpers import unit_rows

# Passages: 0 = the positive, 1 = same text as 0, 2 = near-duplicate of 0, 3 = scores almost as high as the
# positive (a likely false negative), 4 and 5 = genuine hard negatives.
PASSAGES = unit_rows([[1, 0, 0], [1, 0, 0], [1, 0.05, 0], [0.6, 0.8, 0], [0.3, 0.3, 0.9], [0.1, 0.2, 0.97]])
KEYS = ["a", "a", "b", "c", "d", "e"]


def _select(config: MineConfig, scores: list[float], order: list[int]) -> tuple[list[int], object]:
    selection = select_negatives(
        scores=np.array([scores], dtype=np.float32),
        neighbours=np.array([order]),
        positive_positions=np.array([0]),
        positive_scores=np.array([0.8], dtype=np.float32),
        passage_vectors=PASSAGES,
        passage_keys=KEYS,
        config=config,
    )
    return [position for position, _ in selection.negatives[0]], selection


def test_never_returns_the_positive_its_text_twin_or_a_near_duplicate() -> None:
    negatives, selection = _select(MineConfig(num_negatives=2, range_max=6), [0.8, 0.8, 0.79, 0.5, 0.4, 0.3],
                                   [0, 1, 2, 3, 4, 5])
    assert negatives == [3, 4]
    assert (selection.positives_skipped, selection.duplicates_removed) == (1, 2)


def test_candidates_scoring_above_95_percent_of_the_positive_are_removed_as_false_negatives() -> None:
    # candidate 3 scores 0.78 > 0.95 * 0.8 = 0.76: a likely unlabelled positive
    negatives, selection = _select(MineConfig(num_negatives=2, range_max=6), [0.8, 0.8, 0.79, 0.78, 0.4, 0.3],
                                   [0, 1, 2, 3, 4, 5])
    assert negatives == [4, 5]
    assert selection.false_negatives_removed == 1
    assert selection.removed_scores == [pytest.approx(0.78)]


def test_a_looser_ratio_keeps_the_candidate() -> None:
    negatives, _ = _select(MineConfig(num_negatives=1, range_max=6, max_score_ratio=1.0),
                           [0.8, 0.8, 0.79, 0.78, 0.4, 0.3], [0, 1, 2, 3, 4, 5])
    assert negatives == [3]


def test_range_min_skips_the_top_ranks() -> None:
    negatives, _ = _select(MineConfig(num_negatives=1, range_min=5, range_max=6), [0.8, 0.8, 0.79, 0.5, 0.4, 0.3],
                           [0, 1, 2, 3, 4, 5])
    assert negatives == [5]


def test_too_few_survivors_gives_a_short_list_not_padding() -> None:
    negatives, _ = _select(MineConfig(num_negatives=3, range_max=5), [0.8, 0.8, 0.79, 0.5, 0.4, 0.3],
                           [0, 1, 2, 3, 4, 5])
    assert negatives == [3, 4]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"num_negatives": 0}, "num_negatives"),
        ({"num_negatives": 5, "range_min": 10, "range_max": 12}, "range_max - range_min"),
        ({"max_score_ratio": 1.5}, "max_score_ratio"),
        ({"negatives": 3}, "negatives"),
    ],
)
def test_bad_mine_params_are_rejected_naming_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(MineConfig, section, where="params.yaml:mine")
