"""Training plumbing that train and distill share: device and precision, the dev evaluator, the trainer's
arguments, checkpoints that resume a killed run, and peak accelerator memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import pandas as pd

from components.config import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformerTrainingArguments

log = logging.getLogger(__name__)

DEV_METRIC = "eval_dev_cosine_ndcg@10"


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
