"""The stage table: what each stage reads and writes, its params section, its device and its default paths.

Everything that connects stages is read from here: each stage's CLI builds its path flags from its row,
`scripts/dvc_yaml.py` writes `dvc.yaml` from the table (deps, outs, metrics, plots), the Kubeflow pipeline
builds and wires one component per row, the Airflow DAG lays out each run's paths and command lines from it,
and the input-check tests try every input it lists. Adding an input to a stage is one `Port` here plus the
stage's code that reads it.

Artifacts are named once for the whole pipeline (`curated`, `mined`, `teacher`, ...): an input port names the
output port it reads, so the flow between stages is this table's `artifact` column.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.artifact_types import (
    BEIR,
    CURATED,
    EMBEDDINGS,
    EVALUATION,
    INDEXES,
    MINED,
    MODEL,
    QUANTIZED,
    ArtifactType,
)
from components.config import StageConfig

DvcRole = Literal["out", "metrics", "plots", "uncached", "none"]

IMAGE_VERSION = "0.1.0"  # the images built from containers/ carry the package version (pyproject.toml; tested)
IMAGES = {"cpu": f"embedforge-cpu:{IMAGE_VERSION}", "cuda": f"embedforge-cuda:{IMAGE_VERSION}"}


@dataclass(frozen=True)
class Port:
    """One path a stage reads or writes: `--<name>` on its CLI, `artifact` across the pipeline.

    `kind` is the manifest kind of an artifact directory (local or `s3://`); None marks a plain local file or
    folder (raw input, metrics, plots, report, checkpoints). `dvc` says how `dvc.yaml` declares an output:
    a cached `out`, `metrics` or `plots` (uncached), an `uncached` out, or `none` (checkpoints); `dvc_paths`
    lists the files DVC tracks when they are not the port's own path (the files a folder port holds).
    """

    name: str
    artifact: str
    path: str
    help: str
    kind: ArtifactType | None = None
    manifest_optional: bool = False  # input: a plain directory without a manifest is let through to the reader
    dvc: DvcRole = "out"
    dvc_paths: tuple[tuple[DvcRole, str], ...] = ()

    @property
    def flag(self) -> str:
        """`--<name>`, words joined by hyphens (argparse's `dest` stays the name)."""
        return f"--{self.name.replace('_', '-')}"


@dataclass(frozen=True)
class Stage:
    """One row: the stage `components.<name>` with params section `<name>`."""

    name: str
    summary: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    gpu: bool = False  # runs on the CUDA image with a GPU request under Kubeflow and Kubernetes
    knobs: Mapping[str, str] = field(default_factory=dict)  # pipeline parameter -> this stage's param key
    # What the stage's metrics file holds (regular expressions matched at a key's start; empty: every metric):
    # what `dvc exp show`, Kubeflow's run view and Airflow's XCom show. Every metric goes to MLflow, and a grid's
    # rows stay in the stage's artifact.
    headline: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"components.{self.name}"

    @property
    def config_class(self) -> type[StageConfig]:
        """`components.<name>.<Name>Config`: the typed params of the stage, defaults and descriptions included."""
        return getattr(importlib.import_module(self.module), f"{self.name.capitalize()}Config")

    @property
    def ports(self) -> tuple[Port, ...]:
        return self.inputs + self.outputs

    def port(self, name: str) -> Port:
        return next(port for port in self.ports if port.name == name)

    def headline_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The metrics the stage's metrics file holds (`headline`)."""
        return {key: value for key, value in metrics.items()
                if not self.headline or any(re.match(pattern, key) for pattern in self.headline)}


def _metrics(stage: str) -> Port:
    return Port("metrics", f"{stage}_metrics", f"metrics/{stage}.json", "flat metrics JSON (DVC metrics)",
                dvc="metrics")


def _input(artifact: str, kind: ArtifactType, path: str, help: str, *, name: str | None = None,
           manifest_optional: bool = False) -> Port:
    return Port(name or artifact, artifact, path, help, kind=kind, manifest_optional=manifest_optional)


CURATED_IN = _input("curated", CURATED, "data/curated", "curated pairs artifact")
MINED_IN = _input("mined", MINED, "data/mined", "mined pairs artifact")
QUANTIZED_IN = _input("quantized", QUANTIZED, "data/quantized", "quantize artifact")
BEIR_IN = _input("beir", BEIR, "data/beir/debian-test", "BEIR test set whose corpus and queries are used")

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage(
        "curate", "validate, normalise, dedup (exact + SemDeDup), split by source; BEIR export of the test split",
        inputs=(Port("input", "raw_pairs", "data/raw/debian-bookworm/pairs.jsonl.gz",
                     "raw pairs: JSONL (.gz) or Parquet with query, positive[, id, package, source]"),),
        outputs=(Port("output", "curated", "data/curated", "curated pairs artifact", kind=CURATED),
                 Port("embeddings", "embeddings", "data/embeddings/base", "base-model passage embeddings artifact",
                      kind=EMBEDDINGS),
                 Port("beir", "beir", "data/beir/debian-test", "BEIR export of the test split", kind=BEIR),
                 _metrics("curate"),
                 Port("plot", "curate_plot", "plots/curate_drops.csv", "drops per rule (DVC plot)", dvc="plots")),
        knobs={"eps": "eps"},
    ),
    Stage(
        "mine", "hard negatives from the cached base embeddings, positive-aware and duplicate-aware",
        inputs=(CURATED_IN, _input("embeddings", EMBEDDINGS, "data/embeddings/base",
                                   "base-model passage embeddings artifact from curate")),
        outputs=(Port("output", "mined", "data/mined", "mined pairs artifact", kind=MINED),
                 _metrics("mine"),
                 Port("plot", "mine_plot", "plots/mine_scores.png", "score histogram (DVC plot)", dvc="plots")),
        knobs={"num_negatives": "num_negatives"},
    ),
    Stage(
        "train", "contrastive fine-tune of the base model into the teacher",
        inputs=(MINED_IN, CURATED_IN),
        outputs=(Port("output", "teacher", "models/teacher", "teacher model artifact", kind=MODEL),
                 Port("checkpoints", "teacher_checkpoints", "checkpoints/teacher",
                      "checkpoint dir; a re-run with the same params and inputs resumes from it", dvc="none"),
                 _metrics("train")),
        gpu=True,
        knobs={"epochs": "epochs"},
    ),
    Stage(
        "distill", "a smaller Matryoshka student from a subset of the teacher's layers",
        inputs=(_input("teacher", MODEL, "models/teacher", "teacher model artifact"), MINED_IN, CURATED_IN,
                Port("general_text", "general_text", "data/raw/general-text/texts.jsonl.gz",
                     "general-domain texts, JSONL (.gz) with text[, id, title]: mixed in by general_text_share")),
        outputs=(Port("output", "student", "models/student", "student model artifact", kind=MODEL),
                 Port("checkpoints", "student_checkpoints", "checkpoints/student",
                      "checkpoint dir; a re-run with the same params and inputs resumes from it", dvc="none"),
                 _metrics("distill")),
        gpu=True,
        knobs={"student_layers": "layers", "matryoshka_dims": "matryoshka_dims"},
    ),
    Stage(
        "quantize", "the test corpus embedded once per model: float32, calibrated int8 and binary, per dim",
        inputs=(BEIR_IN, _input("curated", CURATED, "data/curated", "curated pairs (int8 calibration sample)"),
                _input("teacher", MODEL, "models/teacher", "teacher model artifact (model `teacher`)"),
                _input("student", MODEL, "models/student", "student model artifact (model `student`)")),
        outputs=(Port("output", "quantized", "data/quantized", "quantized embeddings artifact", kind=QUANTIZED),
                 _metrics("quantize")),
        knobs={"base_model": "models.base"},
    ),
    Stage(
        "index", "faiss float / int8 / binary, Flat and HNSW, per model and dim",
        inputs=(QUANTIZED_IN,),
        outputs=(Port("output", "indexes", "data/index", "index artifact", kind=INDEXES), _metrics("index")),
        headline=("indexes$", "seconds$"),  # each index's bytes and build time: its record, and evaluate's grid
    ),
    Stage(
        "evaluate", "the whole grid, the Pareto front and the operating point; the report",
        inputs=(_input("beir", BEIR, "data/beir/debian-test", "BEIR directory (queries, qrels): curate's "
                       "artifact, or any BEIR directory with --model", manifest_optional=True),
                QUANTIZED_IN, _input("indexes", INDEXES, "data/index", "index artifact", name="index"),
                Port("ood", "ood_sets", "data/raw/ood", "folder of out-of-domain BEIR sets, one directory each "
                     "(local): every model scored on each, exact float search")),
        outputs=(Port("output", "evaluation", "data/evaluation",
                      "evaluation artifact (grid + operating point) for the register stage", kind=EVALUATION),
                 _metrics("evaluate"),
                 Port("report", "report", "reports/evaluation.md",
                      "Markdown report; its PNG plots are written beside it", dvc="uncached",
                      dvc_paths=(("uncached", "reports/evaluation.md"), ("uncached", "reports/ndcg_vs_dim.png"),
                                 ("uncached", "reports/ndcg_vs_bytes.png"))),
                 Port("plots", "plots", "plots", "folder of CSV plot data (DVC plots)", dvc="plots",
                      dvc_paths=(("plots", "plots/ndcg_vs_dim.csv"), ("plots", "plots/ndcg_vs_dim_by_precision.csv"),
                                 ("plots", "plots/ndcg_vs_bytes.csv")))),
        # grid mode: the operating point and each model's exact and out-of-domain nDCG@10 at its full dim;
        # `--model` mode: each model's nDCG@10 at each dim
        headline=("operating_point/", r"[^/]+/(ood_)?ndcg@10$", r"[^/]+/d\d+/ndcg@10$", r"[^/]+/encode_docs_per_s$",
                  "documents$", "queries$", "seconds$"),
    ),
    Stage(
        "register", "the gate: register the student in MLflow; `champion` only when it earns it",
        inputs=(_input("student", MODEL, "models/student", "student model: distill's artifact, or a "
                       "sentence-transformers model directory", manifest_optional=True),
                _input("quantized", QUANTIZED, "data/quantized", "quantize artifact (calibration)"),
                _input("evaluation", EVALUATION, "data/evaluation", "evaluation artifact")),
        outputs=(_metrics("register"),),
    ),
)}

KNOBS: dict[str, tuple[str, str]] = {knob: (stage.name, key) for stage in STAGES.values()
                                     for knob, key in stage.knobs.items()}


def image(stage: Stage) -> str:
    """The image a stage runs on in a cluster: the CUDA image for GPU stages, the CPU image otherwise."""
    return IMAGES["cuda" if stage.gpu else "cpu"]


def produced_by(artifact: str) -> Stage | None:
    """The stage whose output is `artifact` (None for pipeline inputs such as the raw pairs)."""
    return next((stage for stage in STAGES.values() for port in stage.outputs if port.artifact == artifact), None)


# What a pipeline run reads from outside the pipeline (no stage produces it): the raw pairs.
PIPELINE_INPUTS: dict[str, Port] = {port.artifact: port for stage in STAGES.values() for port in stage.inputs
                                    if produced_by(port.artifact) is None}


def knob_value(value: Any) -> str | None:
    """A pipeline parameter as a `--set` value (YAML): None and "" keep the profile's value."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value)


def command_line(stage: str, locations: Mapping[str, str], *, params: str, profile: str | None,
                 knobs: Mapping[str, Any]) -> list[str]:
    """`<stage> --<port> PATH ... --params .. [--profile ..] [--set key=value ...]`: the argv every orchestrator
    adapter runs (`embedforge <argv>`), so a knob and a path mean the same under Kubeflow and Airflow.

    `locations` maps artifact names to paths or URIs (ports without one keep their CLI default); `knobs` maps
    pipeline parameters to values, of which this stage takes its own.
    """
    row = STAGES[stage]
    argv = [stage]
    for port in row.ports:
        if port.artifact in locations:
            argv += [port.flag, str(locations[port.artifact])]
    return argv + _common_flags(stage, params=params, profile=profile, knobs=knobs)


def _common_flags(stage: str, *, params: str, profile: str | None, knobs: Mapping[str, Any]) -> list[str]:
    """`--params .. [--profile ..] [--set key=value ...]`: the stage's own knobs among `knobs`."""
    argv = ["--params", params, *(["--profile", profile] if profile else [])]
    for override in knob_overrides(stage, knobs):
        argv += ["--set", override]
    return argv


def knob_overrides(stage: str, knobs: Mapping[str, Any]) -> list[str]:
    """`key=value` for each of the stage's knobs given a value (None and "" keep the profile's)."""
    return [f"{key}={value}" for knob, key in STAGES[stage].knobs.items()
            if (value := knob_value(knobs.get(knob))) is not None]


# curate fans out: its shard steps (components/curate.py), in order, with what each reads ("raw" is the raw
# pairs; a list input takes every shard's output of that step) and whether it runs once per shard.
CURATE_STEPS: dict[str, tuple[str, bool]] = {
    "prepare": ("raw", True), "plan": ("prepare", False), "embed": ("plan", True),
    "cluster": ("embed", False), "dedup": ("cluster", True),
}
STEP_INPUT_FLAG = {"raw": "--input", "prepare": "--prepared", "plan": "--plan", "embed": "--embedded",
                   "cluster": "--clustered"}
STEP_OUTPUT = {"prepare": "prepared", "plan": "plan", "embed": "embedded", "cluster": "clustered",
               "dedup": "near_duplicates"}  # each step's output artifact, named as the merge flags name them


def step_command_line(step: str, shard: int | None, inputs: list[str], output: str, *, params: str,
                      profile: str | None, knobs: Mapping[str, Any]) -> list[str]:
    """`curate step <step> [--shard N] --<input> PATH... --out PATH --params .. [--profile ..] [--set ..]`: one
    curate shard step as every orchestrator's task runs it; `inputs` are every path of the step's input (one,
    or each shard's output of a fanned-out step). Each step takes curate's knobs, so all see one config."""
    source, _ = CURATE_STEPS[step]
    return ["curate", "step", step, *(["--shard", str(shard)] if shard is not None else []),
            STEP_INPUT_FLAG[source], *inputs, "--out", output,
            *_common_flags("curate", params=params, profile=profile, knobs=knobs)]


def merge_flags(plan: str, clustered: str, near_duplicates: list[str]) -> list[str]:
    """The flags that make `embedforge curate` merge shard steps run elsewhere instead of running them."""
    return ["--plan", plan, "--clustered", clustered, "--near-duplicates", *near_duplicates]


def curate_shards(params: Path, profile: str | None, knobs: Mapping[str, Any]) -> list[int]:
    """0 .. curate.shards-1 for a run's params file, profile and knobs: the width curate's steps fan out to."""
    from components.config import load_stage_config, parse_overrides

    curate = STAGES["curate"]
    config = load_stage_config(curate.config_class, "curate", params, profile or None,
                               parse_overrides(knob_overrides("curate", knobs)))
    return list(range(config.shards))
