"""Pre-tokenised, length-bucketed batches, and the plain training loop that feeds them to a GPU.

A 22M-parameter encoder does so little arithmetic per text that sentence-transformers' trainer and `encode`
leave a GPU waiting on the host: each batch is tokenised in Python when it is needed, padded to its longest
text, and the step's bookkeeping runs between kernels. Here every text is tokenised once, up front, in the
tokenizer's own parallel batches; rows of similar length are batched together, so little of a batch is
padding; batches are padded and pinned on a background thread while the GPU works; and the step is plain
AdamW, under bf16 autocast on a GPU (and on a CPU with native bf16). The losses are sentence-transformers' own
(any loss that takes features and labels), so a model trained here optimises exactly what the trainer would.
On a CPU the batching saves less: the default's mined triplets pad to 1.51x their tokens against 1.84x in
random batches, and train took 11.8 min against the trainer's 13.2 on an AVX2-only 2-core EPYC.

What the trainer does and this loop does not: checkpoints (a killed run starts again: on a GPU the stages take
minutes) and `torchrun` (one process, one device). Its dev evaluations keep the best weights in memory, as the
trainer's `load_best_model_at_end` does.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pandas as pd

from components.config import ConfigError

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

TOKENIZE_CHUNK = 4096  # texts per tokenizer call: the tokenizer parallelises inside a call
BUCKET_BATCHES = 64  # batches' worth of shuffled rows sorted by length together: similar lengths, random order
PREFETCH = 4  # batches padded and pinned ahead of the GPU

Item = TypeVar("Item")
Made = TypeVar("Made")


def tokenize(model: SentenceTransformer, texts: list[str]) -> list[np.ndarray]:
    """Each text's token ids (special tokens included, cut at the model's `max_seq_length`), as the model's own
    `tokenize` makes them, without padding. The tokenizer is called directly: sentence-transformers' `tokenize`
    costs 4.5 times as much per text in Python around the same call (measured on 8,192 Debian passages)."""
    transformer = model[0]
    if getattr(transformer, "do_lower_case", False):
        texts = [text.lower() for text in texts]
    rows: list[np.ndarray] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        encoded = model.tokenizer(texts[start:start + TOKENIZE_CHUNK], truncation=True, max_length=model.max_seq_length,
                                  padding=False, return_attention_mask=False, return_token_type_ids=False)
        rows.extend(np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"])
    return rows


def pad(rows: list[np.ndarray], pad_id: int, *, pin: bool = False) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` for rows padded to the longest of them (right padding)."""
    import torch

    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for position, row in enumerate(rows):
        ids[position, :len(row)] = row
        mask[position, :len(row)] = 1
    features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    return {key: value.pin_memory() for key, value in features.items()} if pin else features


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices in batches of `batch_size` rows of similar length, in random order; the remainder is left
    out (as the trainer's `dataloader_drop_last`).

    Rows are shuffled, then sorted by length within windows of `BUCKET_BATCHES` batches: batches differ from
    epoch to epoch and little of each is padding.
    """
    order = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        rows = order[start:start + window]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(rows[offset:offset + batch_size] for offset in range(0, len(rows) - batch_size + 1, batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def without_duplicates(batches: list[np.ndarray], text_ids: np.ndarray) -> list[np.ndarray]:
    """The same rows in batches where no text appears twice (a repeated text would be its own in-batch false
    negative, as the trainer's no-duplicates sampler prevents): batches are cut afresh from the rows in order,
    and a row that repeats a text of the batch being filled moves to the front of the next. Rows left over at
    the end, too few for a batch, are left out.

    `text_ids` is (rows, columns): equal ids for equal texts.
    """
    if not batches:
        return []
    batch_size = len(batches[0])
    pending = deque(row for batch in batches for row in batch.tolist())
    kept: list[np.ndarray] = []
    while pending:
        chosen: list[int] = []
        deferred: list[int] = []
        seen: set[int] = set()
        while pending and len(chosen) < batch_size:
            row = pending.popleft()
            texts = set(text_ids[row].tolist())
            if seen.isdisjoint(texts):
                chosen.append(row)
                seen |= texts
            else:
                deferred.append(row)
        if len(chosen) < batch_size:
            break
        kept.append(np.asarray(chosen))
        pending.extendleft(reversed(deferred))
    return kept


@dataclass(frozen=True)
class Objective:
    """One loss over one table of texts: its columns as token rows, optional labels per row (a teacher's
    embeddings), and equal ids for equal texts (for batches without duplicates)."""

    loss: torch.nn.Module
    columns: list[list[np.ndarray]]
    text_ids: np.ndarray
    labels: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.columns[0])

    def lengths(self) -> np.ndarray:
        return np.sum([[len(ids) for ids in column] for column in self.columns], axis=0)


def objective(model: SentenceTransformer, loss: torch.nn.Module, frame: pd.DataFrame,
              labels: np.ndarray | None = None) -> Objective:
    """An `Objective` from a table whose columns are texts, in the order the loss expects them."""
    if frame.empty:
        raise ConfigError("a training objective has no rows; give the stage more data")
    texts = pd.unique(frame.to_numpy().ravel())
    ids = {text: number for number, text in enumerate(texts)}
    token_rows = tokenize(model, texts.tolist())
    columns = [[token_rows[ids[text]] for text in frame[column]] for column in frame.columns]
    text_ids = np.stack([frame[column].map(ids).to_numpy() for column in frame.columns], axis=1)
    return Objective(loss=loss, columns=columns, text_ids=text_ids, labels=labels)


@dataclass(frozen=True)
class Schedule:
    """What the loop needs of a stage's optimisation settings."""

    epochs: float
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    eval_steps: int
    seed: int
    weight_decay: float = 0.0  # the trainer's default
    max_grad_norm: float = 1.0  # the trainer's default
    bf16: bool = False  # bf16 autocast (`training.device_settings` decides: CUDA where supported, native-bf16 CPUs)


@dataclass
class FitResult:
    steps: int
    examples: int
    seconds: float
    training_loss: float
    best_score: float | None
    log_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def epoch_batches(objectives: dict[str, Objective], batch_size: int, seed: int, epoch: int
                  ) -> list[tuple[str, np.ndarray]]:
    """One epoch: each objective's bucketed, duplicate-free batches, interleaved at random (each objective is
    drawn in proportion to its size, as the trainer's proportional multi-dataset sampler does)."""
    rng = np.random.default_rng([seed, epoch])
    tagged = [(name, batch)
              for name, task in objectives.items()
              for batch in without_duplicates(length_buckets(task.lengths(), batch_size, rng), task.text_ids)]
    if not tagged:
        raise ConfigError(f"no full batch of {batch_size} rows without repeated texts; lower batch_size")
    return [tagged[index] for index in rng.permutation(len(tagged))]


def _batch(objectives: dict[str, Objective], name: str, rows: np.ndarray, pad_id: int, pin: bool
           ) -> tuple[str, list[dict[str, torch.Tensor]], torch.Tensor | None]:
    import torch

    task = objectives[name]
    features = [pad([column[row] for row in rows], pad_id, pin=pin) for column in task.columns]
    labels = None if task.labels is None else torch.from_numpy(task.labels[rows])
    return name, features, labels


def prefetched(items: list[Item], make: Callable[[Item], Made]) -> Iterator[Made]:
    """`make(item)` for each item, computed on a background thread `PREFETCH` items ahead of the consumer: the
    host pads and pins the next batches while the device works on this one."""
    ready: queue.Queue[object] = queue.Queue(maxsize=PREFETCH)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put(make(item))
        except BaseException as error:  # handed to the consumer, which raises it
            ready.put(error)
        ready.put(done)

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while (made := ready.get()) is not done:
            if isinstance(made, BaseException):
                raise made
            yield made  # type: ignore[misc]
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The trainer's default learning-rate shape: linear warm-up, then linear decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def fit(model: SentenceTransformer, objectives: dict[str, Objective], schedule: Schedule,
        evaluate: Callable[[], float] | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Train `model` on the objectives; with `evaluate` (higher is better) every `eval_steps` and at the end,
    the best-scoring weights are loaded back at the end. bf16 autocast where `schedule.bf16` says."""
    import torch

    device = model.device
    on_cuda = device.type == "cuda"
    pad_id = model.tokenizer.pad_token_id or 0
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    own = {id(parameter) for parameter in parameters}
    extra = list({id(parameter): parameter for task in objectives.values() for parameter in task.loss.parameters()
                  if parameter.requires_grad and id(parameter) not in own}.values())
    optimizer = torch.optim.AdamW(parameters + extra, lr=schedule.learning_rate, weight_decay=schedule.weight_decay,
                                  fused=on_cuda)
    first_epoch = epoch_batches(objectives, schedule.batch_size, schedule.seed, 0)
    total_steps = max(1, math.ceil(len(first_epoch) * schedule.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(math.ceil(schedule.warmup_ratio * total_steps), total_steps))
    log_every = max(1, schedule.eval_steps // 5)
    best_score, best_state = None, None
    history: list[dict[str, float]] = []
    loss_sum = torch.zeros((), device=device)
    logged_sum, logged_steps, examples, step = 0.0, 0, 0, 0
    started = time.perf_counter()

    def evaluate_now() -> None:
        nonlocal best_score, best_state
        model.eval()
        with torch.no_grad():
            score = evaluate()  # type: ignore[misc]
        model.train()
        record(step, {"dev_score": score})
        if best_score is None or score > best_score:
            best_score = score
            best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}

    def record(at: int, values: dict[str, float]) -> None:
        history.append({"step": at, **values})
        if on_log is not None:
            on_log(at, values)

    model.train()
    epoch = 0
    while step < total_steps:
        batches = (first_epoch if epoch == 0 else
                   epoch_batches(objectives, schedule.batch_size, schedule.seed, epoch))[: total_steps - step]
        make = partial(_batch, objectives, pad_id=pad_id, pin=on_cuda)
        for name, features, labels in prefetched(batches, lambda tagged: make(*tagged)):
            features = [{key: value.to(device, non_blocking=True) for key, value in column.items()}
                        for column in features]
            labels = None if labels is None else labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=schedule.bf16):
                loss = objectives[name].loss(features, labels)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters + extra, schedule.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            step += 1
            examples += len(features[0]["input_ids"])
            if step % log_every == 0 or step == total_steps:  # reading the loss waits for the GPU: only here
                mean_loss = float(loss_sum) / (step - logged_steps)
                logged_sum += float(loss_sum)
                loss_sum.zero_()
                logged_steps = step
                record(step, {"loss": mean_loss, "learning_rate": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm)})
            if evaluate is not None and step % schedule.eval_steps == 0:
                evaluate_now()
        epoch += 1
    seconds = time.perf_counter() - started
    if evaluate is not None and step % schedule.eval_steps != 0:
        evaluate_now()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(steps=step, examples=examples, seconds=seconds, training_loss=logged_sum / max(1, step),
                     best_score=best_score, log_history=history)
