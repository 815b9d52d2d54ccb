"""Training plumbing that train and distill share: device and precision, the dev evaluator, the trainer's
arguments and its curves in MLflow, checkpoints that resume a killed run, peak accelerator memory, and what
`torchrun` needs: which process is global rank 0 (the only one that tracks and publishes) and which rows each
rank trains on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import pandas as pd

from components.config import ConfigError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from pydantic import BaseModel
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    from components.bucketed import FitResult, Objective
    from components.cli import StageOutcome

log = logging.getLogger(__name__)

DEV_METRIC = "eval_dev_cosine_ndcg@10"
SHOWN_ROWS = 5  # first row indices of each rank's shard in its log line


def is_global_rank_zero() -> bool:
    """Whether this process is rank 0 of all processes of the run: the one that tracks, writes and publishes.

    `RANK` as torchrun sets it (global over all nodes; `LOCAL_RANK` is 0 once per node), else the initialised
    process group's rank, else a single process: rank 0.
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) of the initialised process group of more than one process; None otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def wait_for_all_ranks() -> None:
    """A barrier over the ranks of a `torchrun` run (nothing for a single process)."""
    if _process_group() is not None:
        import torch.distributed as dist

        dist.barrier()


def publish_from_rank_zero(checkpoints: Path, publish: Callable[[], object]) -> None:
    """Once every rank has loaded the best checkpoint, `publish` (write the model) on global rank 0 alone, and
    remove the checkpoints there: the model is out."""
    wait_for_all_ranks()
    if is_global_rank_zero():
        publish()
        shutil.rmtree(checkpoints, ignore_errors=True)


def run_training_stage(
    stage: str, args: argparse.Namespace, config: BaseModel, work: Callable[[], StageOutcome]
) -> None:
    """`run_stage` (tracking, upload, metrics file) on global rank 0; the other `torchrun` ranks only do the
    work, which trains with them and publishes nothing (train and distill write on global rank 0 only)."""
    from components.cli import run_stage

    if is_global_rank_zero():
        run_stage(stage, args, config, work, args.metrics)
        return
    try:
        work()
    finally:
        args.staging.cleanup()  # the local stand-ins `prepare_stage` made for s3:// outputs, unused here


def device_settings(cpu_bf16: bool | Literal["auto"]) -> dict[str, object]:
    """bf16 on CUDA where supported. On CPU, bf16 autocast roughly halves step time where bf16 is native
    (AVX512-BF16/AMX, as measured) and is many times slower where it is emulated: `auto` decides by the CPU."""
    import torch

    from components.embed import cpu_has_native_bf16

    if torch.cuda.is_available():
        # Tokenising in the main process would leave a fast GPU waiting on the CPU between steps.
        return {"bf16": torch.cuda.is_bf16_supported(), "use_cpu": False,
                "dataloader_num_workers": min(4, os.cpu_count() or 1)}
    # Under `torchrun` (it sets LOCAL_RANK) without GPUs: gloo, torch.distributed's CPU backend, named so that
    # no MPI build is picked instead; a single process sets up no process group, so names no backend.
    launched = {"ddp_backend": "gloo"} if "LOCAL_RANK" in os.environ else {}
    return {"bf16": cpu_has_native_bf16() if cpu_bf16 == "auto" else cpu_bf16, "use_cpu": True, **launched}


def accelerator_metrics() -> dict[str, float]:
    """Peak GPU memory of this process, for sizing batches and machines; nothing on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def dev_evaluator(pairs: pd.DataFrame, *, queries: int, corpus: int, seed: int) -> object:
    """IR evaluator on a sample of dev queries against their positives plus random dev distractors.

    A sample, because encoding the full dev corpus at every evaluation would dominate CPU training time.
    """
    from components.dev_evaluation import DevEvaluator

    dev = pairs[pairs["split"] == "dev"]
    if dev.empty:
        raise ConfigError("the curated data has no dev split; raise curate.split_fractions.dev")
    rng = np.random.default_rng(seed)
    sampled = dev.iloc[rng.permutation(len(dev))[:queries]]
    distractors = dev[~dev["id"].isin(sampled["id"])]
    distractors = distractors.iloc[rng.permutation(len(distractors))[: max(corpus - len(sampled), 0)]]
    documents = pd.concat([sampled, distractors])
    return DevEvaluator(
        queries=dict(zip(sampled["id"], sampled["query"], strict=True)),
        corpus=dict(zip(documents["id"], documents["positive"], strict=True)),
        relevant_docs={row_id: {row_id} for row_id in sampled["id"]},
        name="dev",
        write_csv=False,
        batch_size=64,
    )


TRAINERS = ("sentence_transformers", "bucketed")
TRAINER_HELP = ("sentence_transformers: its trainer (checkpoints resume a killed run; torchrun) | bucketed: "
                "embedforge's loop on pre-tokenised, length-bucketed batches (GPU speed; one process, no "
                "checkpoints: components/bucketed.py)")


class Schedule(Protocol):
    """The optimisation settings train and distill share."""

    trainer: Literal["sentence_transformers", "bucketed"]
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


# The trainers' log keys drawn as MLflow metric histories, under the names the run page shows (MLflow refuses
# '@' in a metric name); `dev_score` is the bucketed loop's name for the dev evaluator's nDCG@10.
CURVES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
          DEV_METRIC: "dev/ndcg_at_10", "dev_score": "dev/ndcg_at_10", "eval_loss": "dev/loss"}


def log_curves(step: int, logs: dict[str, object]) -> None:
    """Log a training log line's curve values (`CURVES`) to the stage's MLflow run at `step`; global rank 0
    only, and nothing without an active run (`--no-tracking`)."""
    mlflow = sys.modules.get("mlflow")  # a stage run imported it; without one there is nothing to log to
    if mlflow is None or mlflow.active_run() is None or not is_global_rank_zero():
        return
    values = {}
    for key, name in CURVES.items():
        try:
            values[name] = float(logs[key])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            continue
    if values:
        mlflow.log_metrics(values, step=step)


def mlflow_curves() -> object:
    """A trainer callback that logs every trainer log line's loss, learning rate, gradient norm and dev nDCG@10 to
    the stage's MLflow run at its global step, so the run page draws training curves (`log_curves`)."""
    from transformers import TrainerCallback

    class MlflowCurves(TrainerCallback):
        def on_log(self, args: object, state: object, control: object, logs: dict[str, object] | None = None,
                   **kwargs: object) -> None:
            if logs:
                log_curves(int(state.global_step), logs)  # type: ignore[attr-defined]

    return MlflowCurves()


def fit_bucketed(model: SentenceTransformer, objectives: dict[str, Objective], schedule: Schedule,
                 evaluator: Callable[[SentenceTransformer], dict[str, float]]) -> FitResult:
    """Train with the bucketed loop (`components.bucketed`), the dev evaluator's nDCG@10 choosing the weights
    kept, its curves in MLflow. One process: under `torchrun`, use the sentence-transformers trainer."""
    from components.bucketed import Schedule as LoopSchedule
    from components.bucketed import fit

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("trainer=bucketed trains in one process; under torchrun set trainer=sentence_transformers")
    loop_schedule = LoopSchedule(epochs=schedule.epochs, batch_size=schedule.batch_size,
                                 learning_rate=schedule.learning_rate, warmup_ratio=schedule.warmup_ratio,
                                 eval_steps=schedule.eval_steps, seed=schedule.seed,
                                 bf16=bool(device_settings(schedule.cpu_bf16)["bf16"]))
    return fit(model, objectives, loop_schedule, evaluate=lambda: evaluator(model)[DEV_METRIC.removeprefix("eval_")],
               on_log=log_curves)


def start_checkpoints(checkpoints: Path, run_digest: str) -> str | None:
    """Claim the checkpoint dir for a run; returns the last checkpoint of a killed run with the same digest.

    `run_digest` names the params and inputs: checkpoints of any other run are discarded, never resumed. Under
    `torchrun` (call it once the trainer's arguments have set up the process group) global rank 0 alone claims
    the dir, and every rank then resumes from the same checkpoint.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if is_global_rank_zero():
        marker = checkpoints / "run.json"
        if checkpoints.is_dir() and not (marker.is_file()
                                         and json.loads(marker.read_text()).get("digest") == run_digest):
            log.info("discarding checkpoints in %s: they belong to other params or inputs", checkpoints)
            shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"digest": run_digest}))
    wait_for_all_ranks()
    resume_from = get_last_checkpoint(str(checkpoints))
    if resume_from:
        log.info("resuming from %s", resume_from)
    return resume_from


def data_shard_metrics(trainer: SentenceTransformerTrainer) -> dict[str, float]:
    """Under `torchrun`: which training rows each rank gets in an epoch, logged by every rank, and what they add
    up to (rows that more than one rank trains on: none; distinct rows: all that an epoch trains on); nothing
    for a single process.

    Read from the batch sampler of the trainer's own (sharded) train dataloader; reading it draws no random
    numbers the training uses (the sampler re-seeds from the seed and the epoch on every pass).
    """
    group = _process_group()
    if group is None:
        return {}
    import torch.distributed as dist

    rank, world_size = group
    batches = list(trainer.get_train_dataloader().batch_sampler)
    rows = [row for batch in batches for row in batch]
    log.info("data shard of rank %d of %d: %d rows in %d batches per epoch, first rows %s", rank, world_size,
             len(rows), len(batches), rows[:SHOWN_ROWS])
    shards: list[list[int]] = [[] for _ in range(world_size)]
    dist.all_gather_object(shards, rows)
    sizes = [len(shard) for shard in shards]
    ranks_of_row = Counter(row for shard in shards for row in set(shard))
    overlap = sum(ranks > 1 for ranks in ranks_of_row.values())
    metrics = {"ranks": world_size, "shard_rows_min": min(sizes), "shard_rows_max": max(sizes),
               "shard_rows_overlap": overlap, "shard_rows_union": len(ranks_of_row)}
    if rank == 0:
        log.info("data shards: %d ranks, %d to %d rows each, %d rows on more than one rank, %d distinct rows",
                 world_size, min(sizes), max(sizes), overlap, len(ranks_of_row))
    return metrics
