"""distill: a smaller Matryoshka student from the teacher.

The student is the teacher with fewer transformer layers (initialised from a chosen subset of the teacher's
layers) and trained on two objectives at once, both under MatryoshkaLoss so every nested prefix of the
embedding is itself a usable embedding:

- embedding distillation: cosine distance between the student's and the teacher's (pre-computed) embeddings
  of train queries and passages (EmbedDistillLoss; cosine, because MatryoshkaLoss re-normalises the student's
  truncated vectors but not the teacher's);
- optionally a contrastive term: MultipleNegativesRankingLoss on the mined (query, positive, negative) tuples,
  which teaches the small prefixes to rank, not only to imitate.

Debian texts alone teach the student Debian only: outside it the student falls below the base model it came
from. `general_text_share` mixes general English (dictionary definitions, `--general-text`) into the texts
whose embeddings the student learns, embedded by the teacher or by the base model (`general_targets`).

Before training, the teacher's embedding space is rotated onto its principal axes (`pca_rotation`): the
student ends in a fixed-size linear layer holding that rotation, and learns the rotated teacher embeddings.
A rotation changes no cosine, so the full-size embedding means what it meant, but the leading dimensions now
carry the most variance, and the nested prefixes the student learns to imitate are already good ones.

Checkpoints are written every `eval_steps`, as in train: a killed run, re-run with the same params and inputs,
resumes from its last checkpoint (the full profile distils for hours on a CPU). As train, it runs under
`torchrun` too: each rank computes the teacher targets and trains on its share of the batches; only global
rank 0 tracks, writes the metrics and publishes the student.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from components.artifact_types import MODEL, Provenance, read_curated, read_mined, write_model
from components.artifacts import file_sha256
from components.config import ConfigError, StageConfig, params_digest
from components.data import GeneralText, read_texts
from components.model_card import TrainingFacts, training_card
from components.tracking import git_code_state
from components.training import (TRAINER_HELP, accelerator_metrics, data_shard_metrics, dev_evaluator, fit_bucketed,
                                  mlflow_curves, publish_from_rank_zero, run_training_stage, start_checkpoints,
                                  training_arguments)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

STAGE = "distill"
Item = TypeVar("Item")


class DistillConfig(StageConfig):
    """The `distill` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    trainer: Literal["sentence_transformers", "bucketed"] = Field("sentence_transformers", description=TRAINER_HELP)
    layers: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2, 4, 5], min_length=1,
        description="Teacher layers the student keeps (ascending; keep the last: bench/student_layers.py). Five: "
                    "four kept the base model's out-of-domain quality to within 0.029, five to 0.004 "
                    "(reports/student-recipes); served as int8 ONNX it still encodes 2.9x as fast as the teacher.")
    matryoshka_dims: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [384, 256, 128, 64, 32], min_length=1,
        description="Nested dims trained by MatryoshkaLoss (descending); first = teacher dim.")
    pca_rotation: bool = Field(
        True,
        description="Learn the teacher's space rotated onto its principal axes: no cosine changes, but the "
                    "leading dims hold the most variance (bench/prefix_rotation.py).")
    contrastive_weight: float = Field(
        1.0, ge=0, description="Weight of the Matryoshka MNRL term on mined triplets; 0 = pure distillation.")
    contrastive_pairs: int | None = Field(
        1000, ge=8, description="Mined triplets sampled for the contrastive term; null = all.")
    distill_texts: int | None = Field(
        9000, ge=8, description="Queries + passages whose teacher embeddings the student learns; null = all.")
    general_text_share: float = Field(
        0.7, ge=0, lt=1,
        description="Share of the distillation texts drawn from the general-text input (unlabelled general "
                    "English), so that the student keeps what the base model knew outside Debian; 0 = Debian "
                    "texts only.")
    general_titles: bool = Field(
        False,
        description="Also learn the embeddings of the sampled general texts' titles (a dictionary entry's "
                    "headword), where the input gives them: short, query-like texts, as the Debian texts hold "
                    "queries beside passages. On top of distill_texts.")
    general_targets: Literal["teacher", "base"] = Field(
        "teacher",
        description="Whose embeddings of the general texts the student learns: the teacher's, or those of the "
                    "base model the teacher was fine-tuned from (untouched by Debian).")
    epochs: float = Field(1.0, gt=0, description="Passes over the distillation data.")
    batch_size: int = Field(64, ge=2, description="Texts per batch.")
    learning_rate: float = Field(
        1e-4, gt=0, lt=1,
        description="Peak learning rate: higher than fine-tuning, as the kept layers are re-wired.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warm-up share of steps.")
    max_seq_length: int = Field(
        128, ge=8, le=512,
        description="Tokens per text for the student (and the teacher targets) while training.")
    serve_max_seq_length: int = Field(
        256, ge=8, le=512,
        description="Tokens per text the published student encodes: 98% of Debian passages fit (86% in 128), "
                    "90-93% of the out-of-domain ones (62-76% in 128).")
    onnx_int8: bool = Field(
        True,
        description="Publish the student with its ONNX export, int8 weights (components/export.py): every later "
                    "stage, search and serve then encode with ONNX Runtime on the CPU, so evaluate measures what "
                    "is served. For CPU serving; a GPU machine keeps it off.")
    eval_steps: int = Field(90, ge=1, description="Dev evaluation and checkpoint every this many steps.")
    dev_queries: int = Field(500, ge=10, description="Dev queries in the in-training evaluation.")
    dev_corpus: int = Field(1000, ge=10, description="Dev passages in that evaluation.")
    teacher_batch_size: int = Field(64, ge=1, description="Texts per batch when computing teacher targets.")
    cpu_bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast on CPU: auto | true | false (as in train).")
    seed: int = Field(42, description="Data order and sampling seed.")

    @field_validator("matryoshka_dims")
    @classmethod
    def _dims_descending(cls, dims: list[int]) -> list[int]:
        if any(dim <= 0 for dim in dims) or dims != sorted(set(dims), reverse=True):
            raise ValueError(f"matryoshka_dims must be positive, distinct and descending, e.g. [384, 256, 128]; got {dims}")
        return dims

    @field_validator("layers")
    @classmethod
    def _layers_ascending(cls, layers: list[int]) -> list[int]:
        if any(layer < 0 for layer in layers) or layers != sorted(set(layers)):
            raise ValueError(f"layers must be distinct, ascending teacher layer indices, e.g. [0, 4, 5]; got {layers}")
        return layers


@dataclass(frozen=True)
class DistillPaths:
    teacher: Path
    mined: Path
    curated: Path
    output: Path
    checkpoints: Path
    general_text: Path | None = None


def distillation_texts(debian: list[str], general: list[GeneralText], config: DistillConfig
                       ) -> tuple[list[str], list[str]]:
    """The Debian and the general texts whose targets the student learns: `distill_texts` in all (null: every
    Debian text, plus the general share on top), `general_text_share` of them general, each a seeded sample;
    with `general_titles`, the sampled general texts' titles follow them."""
    share = config.general_text_share
    total = config.distill_texts if config.distill_texts is not None else round(len(debian) / (1 - share))
    general_count = min(round(total * share), len(general))
    debian_count = min(total - general_count, len(debian))

    def sample(items: list[Item], count: int) -> list[Item]:
        return items if count >= len(items) else pd.Series(items).sample(n=count, random_state=config.seed).tolist()

    chosen = sample(general, general_count)
    titles = [entry.title for entry in chosen if entry.title is not None] if config.general_titles else []
    return sample(debian, debian_count), [entry.text for entry in chosen] + titles


def check_against_teacher(config: DistillConfig, teacher_layers: int, teacher_dim: int) -> None:
    """Refuse a student the teacher cannot seed, before any work starts."""
    if len(config.layers) >= teacher_layers or config.layers[-1] >= teacher_layers:
        raise ConfigError(
            f"distill.layers={config.layers}: the student must have fewer layers than the teacher "
            f"({teacher_layers}) and pick indices 0..{teacher_layers - 1}"
        )
    if config.matryoshka_dims[0] != teacher_dim:
        raise ConfigError(
            f"distill.matryoshka_dims must start at the teacher's dimension {teacher_dim}; got {config.matryoshka_dims}"
        )


def principal_axes(vectors: np.ndarray) -> np.ndarray:
    """Orthogonal (dim, dim) matrix whose columns are the principal axes of `vectors`, by falling variance.

    `vectors @ axes` keeps every cosine but moves the variance into the leading dimensions. Each axis is
    signed so its largest component is positive. Computed with torch's LAPACK, as the training that follows is:
    numpy's OpenBLAS picks its kernels by `OPENBLAS_CORETYPE` or else the CPU, so a host that sets it and a
    container that does not got rotations differing in the last bits, and students differing after training.
    """
    import torch

    variances, axes = torch.linalg.eigh(torch.cov(torch.from_numpy(vectors).double().T))
    variances, axes = variances.numpy(), axes.numpy()
    axes = axes[:, np.argsort(-variances, kind="stable")]
    largest = axes[np.argmax(np.abs(axes), axis=0), np.arange(axes.shape[1])]
    return (axes * np.sign(largest)).astype(np.float32)


def rotate(vectors: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """`vectors @ rotation` by torch, as the student's rotation layer computes it (not numpy's OpenBLAS: see
    `principal_axes`)."""
    import torch

    return (torch.from_numpy(vectors) @ torch.from_numpy(rotation)).numpy()


def make_student(
    teacher: SentenceTransformer, layers: list[int], rotation: np.ndarray | None = None
) -> SentenceTransformer:
    """A deep copy of the teacher keeping only `layers` of its transformer encoder.

    With a `rotation`, a bias-free linear layer after pooling maps each embedding `e` to `e @ rotation`.
    """
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling

    student = copy.deepcopy(teacher)
    encoder_model = student[0].auto_model
    kept = torch.nn.ModuleList([encoder_model.encoder.layer[index] for index in layers])
    encoder_model.encoder.layer = kept
    encoder_model.config.num_hidden_layers = len(layers)
    if rotation is None:
        return student
    after_pooling = next(position for position, module in enumerate(student) if isinstance(module, Pooling)) + 1
    dim = rotation.shape[0]
    linear = Dense(dim, dim, bias=False, activation_function=torch.nn.Identity(),
                   init_weight=torch.from_numpy(np.ascontiguousarray(rotation.T)).to(student.dtype))
    student.insert(after_pooling, linear.to(student.device))
    return student


def distill(config: DistillConfig, paths: DistillPaths) -> dict[str, float]:
    """Build, train and publish the student; returns flat metrics."""
    from sentence_transformers.sentence_transformer import losses

    from components.embed import encode, load_model

    started = time.perf_counter()
    teacher_manifest = MODEL.read_manifest(paths.teacher)
    mined_artifact, curated = read_mined(paths.mined), read_curated(paths.curated)
    mined_manifest, curated_manifest, mined = mined_artifact.manifest, curated.manifest, mined_artifact.pairs
    check_against_teacher(config, teacher_manifest.counts["layers"], teacher_manifest.counts["dim"])
    teacher = load_model(str(paths.teacher), max_seq_length=config.max_seq_length)
    evaluator = dev_evaluator(curated.pairs, queries=config.dev_queries, corpus=config.dev_corpus, seed=config.seed)

    if config.general_text_share > 0 and paths.general_text is None:
        raise ConfigError(f"general_text_share is {config.general_text_share}, but no general-text input was "
                          "given; pass --general-text FILE or set general_text_share=0")
    general_pool = read_texts(paths.general_text) if config.general_text_share > 0 else []
    debian_texts, general_texts = distillation_texts(
        pd.unique(pd.concat([mined["query"], mined["positive"]])).tolist(), general_pool, config)
    texts = debian_texts + general_texts
    targets = encode(teacher, texts if config.general_targets == "teacher" else debian_texts,
                     batch_size=config.teacher_batch_size, label="teacher targets")
    vectors = targets.vectors
    if general_texts and config.general_targets == "base":
        if "base_model" not in teacher_manifest.extra:
            raise ConfigError(f"general_targets is 'base', but {paths.teacher}'s manifest names no base model (a "
                              "teacher from the train stage does); set general_targets: teacher")
        base = load_model(teacher_manifest.extra["base_model"], max_seq_length=config.max_seq_length)
        vectors = np.concatenate([vectors, encode(base, general_texts, batch_size=config.teacher_batch_size,
                                                  label="base targets").vectors])
        del base
    teacher_dev = evaluator(teacher)["dev_cosine_ndcg@10"]

    rotation = principal_axes(vectors) if config.pca_rotation else None
    target_vectors = vectors if rotation is None else rotate(vectors, rotation)
    student = make_student(teacher, config.layers, rotation)
    tables = {"distill": pd.DataFrame({"text": texts})}
    objectives = {"distill": losses.MatryoshkaLoss(
        student, losses.EmbedDistillLoss(student, distance_metric="cosine"), config.matryoshka_dims)}
    if config.contrastive_weight > 0:
        triplets = mined
        if config.contrastive_pairs is not None and len(mined) > config.contrastive_pairs:
            triplets = mined.sample(n=config.contrastive_pairs, random_state=config.seed)
        tables["contrastive"] = pd.DataFrame({"anchor": triplets["query"].tolist(),
                                              "positive": triplets["positive"].tolist(),
                                              "negative": triplets["negative_1"].tolist()})
        objectives["contrastive"] = losses.MatryoshkaLoss(
            student, losses.MultipleNegativesRankingLoss(student), config.matryoshka_dims,
            matryoshka_weights=[config.contrastive_weight] * len(config.matryoshka_dims))
    if config.trainer == "bucketed":
        from components.bucketed import objective

        fitted = fit_bucketed(student, {name: objective(student, loss, tables[name],
                                                        labels=target_vectors if name == "distill" else None)
                                        for name, loss in objectives.items()}, config, evaluator)
        steps, training_loss, examples_per_s, resumed, shards = (fitted.steps, fitted.training_loss,
                                                                 fitted.examples_per_s, None, {})
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer

        datasets = {name: Dataset.from_pandas(table, preserve_index=False) for name, table in tables.items()}
        datasets["distill"] = datasets["distill"].add_column("label", target_vectors.tolist())
        inputs = [teacher_manifest.fingerprint, mined_manifest.fingerprint, curated_manifest.fingerprint]
        arguments = training_arguments(config, paths.checkpoints)  # sets up the process group under torchrun
        resumed = start_checkpoints(paths.checkpoints, ":".join([params_digest(config), *inputs]))
        trainer = SentenceTransformerTrainer(model=student, args=arguments, train_dataset=datasets, loss=objectives,
                                             evaluator=evaluator, callbacks=[mlflow_curves()])
        shards = data_shard_metrics(trainer)
        output = trainer.train(resume_from_checkpoint=resumed)
        steps, training_loss = trainer.state.global_step, output.training_loss
        examples_per_s = output.metrics.get("train_samples_per_second", 0.0)
    student.max_seq_length = config.serve_max_seq_length
    student_dev = evaluator(student)["dev_cosine_ndcg@10"]
    metrics = {
        "student_layers": len(config.layers),
        "distill_texts": len(texts),
        "general_texts": len(general_texts),
        "steps": steps,
        "train_loss": training_loss,
        "teacher_dev_ndcg@10": teacher_dev,
        "student_dev_ndcg@10": student_dev,
        "student_to_teacher_dev": student_dev / teacher_dev if teacher_dev else 0.0,
        "teacher_encode_per_s": targets.per_second,
        "examples_per_s": examples_per_s,
        "resumed": float(resumed is not None),
        **prefix_variance_shares(target_vectors, config.matryoshka_dims),
        **shards,
        **accelerator_metrics(),
        "seconds": time.perf_counter() - started,
    }
    inputs = {"teacher": teacher_manifest.fingerprint, "mined": mined_manifest.fingerprint}
    if general_texts:
        inputs["general_text"] = file_sha256(paths.general_text)
    provenance = Provenance(STAGE, params_digest(config), inputs)
    card = training_card(TrainingFacts(
        role="student", started_from=f"the teacher at {paths.teacher}, layers {config.layers}",
        data={"raw snapshot": curated_manifest.inputs.get("raw_pairs", "unknown"),
              "curated pairs": curated_manifest.fingerprint, "mined pairs": mined_manifest.fingerprint,
              "teacher": teacher_manifest.fingerprint,
              **({"general text": inputs["general_text"]} if general_texts else {})},
        settings=config.model_dump(mode="json"), metrics=metrics, layers=len(config.layers),
        dim=student.get_embedding_dimension(), max_seq_length=config.serve_max_seq_length,
        matryoshka_dims=config.matryoshka_dims, commit=git_code_state()))
    publish_from_rank_zero(paths.checkpoints, partial(
        write_model, student, paths.output, provenance, metrics=metrics,
        extra={"layers_from_teacher": config.layers, "matryoshka_dims": config.matryoshka_dims,
               "pca_rotation": config.pca_rotation},
        matryoshka_dims=config.matryoshka_dims, card=card, onnx_int8=config.onnx_int8))
    log.info("distill: %d-layer student, dev nDCG@10 %.4f (teacher %.4f) in %.0fs", len(config.layers), student_dev,
             teacher_dev, metrics["seconds"])
    return metrics


def prefix_variance_shares(vectors: np.ndarray, dims: list[int]) -> dict[str, float]:
    """Share of the targets' variance in each nested prefix: what the rotation bought the small dims."""
    variances = vectors.var(axis=0)
    return {f"target_variance_share_d{dim}": float(variances[:dim].sum() / variances.sum()) for dim in dims}


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.distill` / `embedforge distill` (or under `torchrun`)."""
    from components.cli import StageOutcome, parse_stage_args, stage_parser

    parser = stage_parser(STAGE, DistillConfig)
    args, config = parse_stage_args(parser, argv, DistillConfig, STAGE)
    paths = DistillPaths(teacher=args.teacher, mined=args.mined, curated=args.curated, output=args.output,
                         checkpoints=args.checkpoints, general_text=args.general_text)

    def work() -> StageOutcome:
        metrics = distill(config, paths)
        fingerprint = MODEL.read_manifest(paths.teacher, verify=False).fingerprint
        return StageOutcome(metrics=metrics, data_fingerprint=fingerprint)

    run_training_stage(STAGE, args, config, work)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
