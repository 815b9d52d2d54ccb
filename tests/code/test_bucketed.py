"""The bucketed loop: texts tokenised once as the model would, batches of similar length with no text twice,
the same vectors as sentence-transformers' `encode`, and training that learns and keeps its best weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.bucketed import (Schedule, epoch_batches, fit, length_buckets, linear_schedule, objective, pad,
                                 tokenize, without_duplicates)
from components.config import ConfigError
from components.embed import encode_pipelined, load_model
from components.training import dev_evaluator, fit_bucketed
from tests.conftest import TOPICS

TEXTS = [f"{topic} {kind} for {user}" + " with details" * (index % 7)
         for index, (topic, kind, user) in enumerate(
             (topic, kind, user) for topic in TOPICS for kind in ("tools", "library", "server")
             for user in ("admins", "developers"))]


def test_tokenize_gives_each_text_the_ids_the_model_itself_makes_without_padding(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), max_seq_length=12)
    rows = tokenize(model, TEXTS)
    features = model.tokenize(TEXTS)
    for row, ids, mask in zip(rows, features["input_ids"], features["attention_mask"], strict=True):
        assert row.tolist() == ids[mask.bool()].tolist()
    assert max(len(row) for row in rows) == 12  # cut at max_seq_length


def test_pad_right_pads_to_the_longest_row_and_masks_the_padding() -> None:
    features = pad([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert features["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert features["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_buckets_are_full_distinct_batches_of_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=10_000)
    batches = length_buckets(lengths, 64, np.random.default_rng(1))
    rows = np.concatenate(batches)
    assert all(len(batch) == 64 for batch in batches)
    assert len(rows) == len(set(rows.tolist())) == 10_000 - 10_000 % 64
    bucketed_spread = np.median([np.ptp(lengths[batch]) for batch in batches])
    random_spread = np.median([np.ptp(lengths[rng.permutation(10_000)[:64]]) for _ in range(50)])
    assert bucketed_spread < random_spread / 10  # little of a batch is padding
    assert [batch.tolist() for batch in length_buckets(lengths, 64, np.random.default_rng(1))] == \
        [batch.tolist() for batch in batches]  # seeded


def test_no_batch_holds_a_text_twice_and_repeated_rows_move_to_a_later_batch() -> None:
    text_ids = np.array([[0, 10], [0, 11], [1, 12], [2, 13], [3, 14], [4, 15], [5, 16], [6, 17], [7, 10]])
    batches = without_duplicates([np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7, 8])], text_ids)
    for batch in batches:
        texts = text_ids[batch].ravel()
        assert len(texts) == len(set(texts.tolist()))
    kept = np.concatenate(batches).tolist()
    assert len(kept) == len(set(kept)) == 9  # every row found a batch
    assert kept.index(1) > kept.index(0)


def test_rows_no_batch_can_take_are_left_out() -> None:
    text_ids = np.array([[0], [0], [0], [1]])  # one text three times: at most one per batch
    batches = without_duplicates([np.array([0, 1]), np.array([2, 3])], text_ids)
    assert [sorted(batch.tolist()) for batch in batches] == [[0, 3]]


def test_a_batch_size_no_batch_can_fill_is_refused(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir))
    task = objective(model, torch.nn.Identity(), pd.DataFrame({"text": TEXTS[:10]}))
    with pytest.raises(ConfigError, match="lower batch_size"):
        epoch_batches({"only": task}, 32, seed=0, epoch=0)


def test_the_learning_rate_warms_up_then_decays_linearly_to_zero() -> None:
    factor = linear_schedule(warmup_steps=2, total_steps=6)
    assert [factor(step) for step in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_pipelined_encoding_gives_encodes_vectors_in_the_texts_order(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir))
    expected = model.encode(TEXTS, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    vectors = encode_pipelined(model, TEXTS, batch_size=8)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    assert np.abs(vectors - expected).max() < 1e-5
    assert encode_pipelined(model, [], batch_size=8).shape == (0, expected.shape[1])


def test_the_dev_evaluation_scores_the_same_when_its_texts_are_encoded_pipelined(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import components.dev_evaluation

    calls = []
    monkeypatch.setattr(components.dev_evaluation, "encode_pipelined",
                        lambda *args, **kwargs: calls.append(1) or encode_pipelined(*args, **kwargs))
    model = load_model(str(tiny_model_dir))
    pairs = pd.DataFrame({"id": [f"q{i}" for i in range(len(TEXTS))], "query": [f"which {t}?" for t in TEXTS],
                          "positive": TEXTS, "split": "dev"})
    plain = dev_evaluator(pairs, queries=20, corpus=len(TEXTS), seed=0)
    pipelined = dev_evaluator(pairs, queries=20, corpus=len(TEXTS), seed=0)
    pipelined.pipelined_devices = frozenset({model.device.type})  # as on a GPU
    plain_scores, pipelined_scores = plain(model), pipelined(model)
    assert plain_scores.keys() == pipelined_scores.keys()
    assert all(abs(plain_scores[key] - pipelined_scores[key]) < 1e-6 for key in plain_scores)
    assert len(calls) == 2  # the queries, then the corpus in one chunk


def _contrastive_task(model: object) -> dict[str, object]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    frame = pd.DataFrame({"anchor": [f"query about {text}" for text in TEXTS],
                          "positive": [f"A package that ships {text}." for text in TEXTS]})
    return {"pairs": objective(model, MultipleNegativesRankingLoss(model), frame)}  # type: ignore[arg-type]


def test_the_loop_lowers_the_loss_and_loads_back_the_best_scoring_weights(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), max_seq_length=32)
    torch.manual_seed(0)
    scores = iter([0.1, 0.9] + [0.5] * 20)  # the second evaluation is the best
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate() -> float:
        snapshots.append({key: value.clone() for key, value in model.state_dict().items()})
        return next(scores)

    schedule = Schedule(epochs=4, batch_size=16, learning_rate=1e-3, warmup_ratio=0.0, eval_steps=2, seed=0)
    result = fit(model, _contrastive_task(model), schedule, evaluate)
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert result.steps == 4 * (len(TEXTS) // 16)
    assert result.examples == result.steps * 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert result.best_score == 0.9
    assert all(torch.equal(value, snapshots[1][key]) for key, value in model.state_dict().items())


def test_the_bucketed_trainer_refuses_to_run_under_torchrun(tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from components.train import TrainConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    model = load_model(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="trainer=sentence_transformers"):
        fit_bucketed(model, _contrastive_task(model), TrainConfig(trainer="bucketed"), lambda _: {})  # type: ignore[arg-type]


@pytest.mark.parametrize("bf16", [False, True])
def test_the_loss_runs_under_bf16_autocast_exactly_when_the_schedule_asks(tiny_model_dir: Path, bf16: bool) -> None:
    model = load_model(str(tiny_model_dir), max_seq_length=32)
    task = _contrastive_task(model)["pairs"]
    autocast_seen: list[bool] = []

    class Recording(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, features: list[dict[str, torch.Tensor]], labels: torch.Tensor | None) -> torch.Tensor:
            autocast_seen.append(torch.is_autocast_enabled("cpu"))
            return self.inner(features, labels)

    tasks = {"pairs": type(task)(loss=Recording(task.loss), columns=task.columns, text_ids=task.text_ids)}
    schedule = Schedule(epochs=1, batch_size=16, learning_rate=1e-4, warmup_ratio=0.0, eval_steps=100, seed=0,
                        bf16=bf16)
    fit(model, tasks, schedule)  # type: ignore[arg-type]
    assert autocast_seen and set(autocast_seen) == {bf16}
