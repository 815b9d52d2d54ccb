"""Directional: each training step must move retrieval the way it was meant to.

The teacher was fine-tuned from the base model on in-domain Debian pairs, so on the held-out test queries
it must rank their positives at least as well as the base model. The student was distilled from the
teacher into half its layers, so it may lose a little of the teacher's quality, but only a little.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.model.retrieval import Encoded, RetrievalSet, ndcg_at_k

pytestmark = pytest.mark.slow

# Least share of the teacher's full-dimension nDCG@10 the student keeps. Measured on smoke: 0.911 / 0.927 =
# 0.983 (distill's own dev metric: 0.981; the gpu profile: 0.970). 0.90 tolerates a short distillation but
# fails a student that lost what the teacher learned (the one-layer, untrained student of tests/e2e: 0.47).
MIN_STUDENT_SHARE = 0.90


def ndcg(name: str, encoded: Callable[[str], Encoded], retrieval_set: RetrievalSet) -> float:
    vectors = encoded(name)
    return float(ndcg_at_k(vectors.queries @ vectors.passages.T, retrieval_set.relevant).mean())


def test_fine_tuning_does_not_make_the_teacher_worse_than_its_base_model_in_domain(
        retrieval_set: RetrievalSet, encoded: Callable[[str], Encoded]) -> None:
    # No tolerance: the teacher is the checkpoint with the best dev nDCG@10 (smoke: 0.982, against 0.935
    # before training), so doing worse than the base on the test split would mean fine-tuning hurt. Measured
    # on smoke: teacher 0.927 vs base 0.899 (+0.027, about 6 of the 81 queries moving up a rank).
    teacher, base = ndcg("teacher", encoded, retrieval_set), ndcg("base", encoded, retrieval_set)
    assert teacher >= base, f"teacher nDCG@10 {teacher:.3f} < base model {base:.3f}"


def test_the_student_keeps_most_of_the_teachers_quality(
        retrieval_set: RetrievalSet, encoded: Callable[[str], Encoded]) -> None:
    teacher, student = ndcg("teacher", encoded, retrieval_set), ndcg("student", encoded, retrieval_set)
    assert student >= MIN_STUDENT_SHARE * teacher, f"student nDCG@10 {student:.3f} vs teacher {teacher:.3f}"
