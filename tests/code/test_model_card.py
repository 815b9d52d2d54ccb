"""Model cards say what a model was made from, how, how well it did, what it is for and where it falls short."""

from __future__ import annotations

import dataclasses

from components.model_card import LIMITATIONS, TrainingFacts, registry_card, training_card

FACTS = TrainingFacts(role="student", started_from="the teacher at models/teacher, layers [0, 4, 5]",
                      data={"raw snapshot": "raw123", "curated pairs": "cur456"},
                      settings={"epochs": 5.0, "learning_rate": 5e-5, "trainer": "bucketed"}, metrics={"student_dev_ndcg@10": 0.91,
                                                                               "steps": 12.0},
                      layers=3, dim=384, max_seq_length=128, matryoshka_dims=[384, 128, 64], commit="abc123")


def test_the_training_card_names_its_data_commit_settings_dev_scores_use_and_limits() -> None:
    card = training_card(FACTS)
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "# embedforge student" in card and "usable prefixes: 384, 128, 64" in card
    for fact in ("| raw snapshot | `raw123` |", "| curated pairs | `cur456` |", "| code (git commit) | `abc123` |",
                 "| trainer | `bucketed` |", "| learning_rate | 5e-05 |", "| student_dev_ndcg@10 | 0.91 |", "## Intended use", LIMITATIONS):
        assert fact in card
    assert "| steps |" not in card  # only the dev scores and throughput of the stage's metrics
    assert "ONNX" not in card


def test_a_student_served_as_its_int8_export_says_so() -> None:
    card = training_card(dataclasses.replace(FACTS, settings={**FACTS.settings, "onnx_int8": True}))
    assert "served as its ONNX export with int8 weights (`onnx/model_qint8.onnx`" in card


def test_the_registry_card_adds_the_test_table_the_operating_point_and_the_gate() -> None:
    grid = [{"model": "student", "dim": 64, "index": "float_flat", "ndcg_at_10": 0.8, "mrr_at_10": 0.7,
             "recall_at_100": 0.95},
            {"model": "student", "dim": 384, "index": "float_flat", "ndcg_at_10": 0.82, "mrr_at_10": 0.75,
             "recall_at_100": 0.97},
            {"model": "student", "dim": 384, "index": "binary_flat", "ndcg_at_10": 0.7, "mrr_at_10": 0.6,
             "recall_at_100": 0.9}]
    point = {"chosen": {"model": "student", "dim": 384, "index": "binary_flat", "rescored": True, "ndcg_at_10": 0.8016,
                        "bytes_per_vector": 48.0, "p99_ms": 0.47},
             "reason": "best within budgets", "rescore": {"with": "int8", "multiplier": 4}}
    card = registry_card(training_card(FACTS), grid, point, {"promote": True, "reasons": ["no champion yet"]}, "7")
    assert card.startswith(training_card(FACTS).rstrip("\n"))
    assert "## Registered as version 7" in card and "Gate: passed (no champion yet)." in card
    table = card[card.index("## Test split"):]
    assert table.index("| student | 384 | 0.8200 |") < table.index("| student | 64 | 0.8000 |")
    assert "| student | 384 | 0.7000 |" not in table  # only exact float search in the table
    assert "nDCG@10 0.8016, 48 bytes per vector, p99 0.47 ms" in card


def test_a_card_without_an_operating_point_says_so() -> None:
    card = registry_card("", [], {"chosen": None, "reason": "none"}, {"promote": False, "reasons": ["none"]}, "1")
    assert "none within the evaluate budgets" in card
