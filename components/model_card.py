"""Model cards: the README.md each published model carries, and the fuller one its registry version gets.

train and distill write what they know when they publish (what the model started from, the data snapshot
and commit, the settings, the dev scores, the intended use and the limits); register adds what is known
only after evaluate (the test table at every dim and precision, the operating point and the gate's decision)
and logs the whole card beside the registered model. The card replaces the generic one sentence-transformers
writes on save, which shows training examples and nothing of where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

CARD_FILE = "README.md"

INTENDED_USE = (
    "Dense retrieval in English over short technical texts of the kind it was trained on: find the software "
    "package whose description answers a short query (a search box over package or tool descriptions). "
    "Embeddings are unit length; compare them by inner product (cosine).")

LIMITATIONS = (
    "Trained on Debian package descriptions alone. Outside that domain a student can rank worse than the model "
    "it started from: on 283 Python package summaries (bench/ood_metadata.py) the project's students of "
    "earlier runs scored 0.07 to 0.09 nDCG@10 below their base model, while the teachers stayed above it "
    "(reports/gpu-profile/ood_metadata.md, issue #23). The runs behind this card score the Debian test split "
    "only: check the model on your own texts before it replaces a general-purpose model. Texts longer than its "
    "maximum sequence length are cut.")


@dataclass(frozen=True)
class TrainingFacts:
    """What a training stage knows of the model it publishes."""

    role: str  # teacher | student
    started_from: str  # the base model reference, or the teacher's fingerprint
    data: dict[str, str]  # name -> fingerprint of the data the stage read (curated, mined, raw snapshot)
    settings: dict[str, Any]  # the stage's params
    metrics: dict[str, float]  # what the stage measured (dev scores, throughput)
    layers: int
    dim: int
    max_seq_length: int
    matryoshka_dims: list[int] | None
    commit: str


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"`{value}`"


def training_card(facts: TrainingFacts) -> str:
    """The card a train or distill stage publishes with its model."""
    dims = ", ".join(map(str, facts.matryoshka_dims)) if facts.matryoshka_dims else str(facts.dim)
    front = "\n".join(["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
                       "language: [en]", f"tags: [embedforge, {facts.role}, sentence-transformers]", "---"])
    sections = [
        front,
        f"# embedforge {facts.role}",
        f"A {facts.layers}-layer sentence-transformers encoder ({facts.dim} dims; usable prefixes: {dims}; "
        f"up to {facts.max_seq_length} tokens per text) made by embedforge's `"
        f"{'train' if facts.role == 'teacher' else 'distill'}` stage from `{facts.started_from}`."
        + (" It is served as its ONNX export with int8 weights (`onnx/model_qint8.onnx`, ONNX Runtime on the "
           "CPU): the pipeline's evaluation, search and serve all encode with it; the torch weights beside it "
           "are the float model it was exported from. sentence-transformers' ONNX backend loads it too "
           "(`backend=\"onnx\"`, `model_kwargs={\"file_name\": \"onnx/model_qint8.onnx\"}`; it needs "
           "optimum-onnx, which installs beside sentence-transformers 5)."
           if facts.settings.get("onnx_int8") else ""),
        "## Made from",
        _table(["what", "fingerprint"], [[name, f"`{value}`"] for name, value in facts.data.items()]
               + [["code (git commit)", f"`{facts.commit}`"],
                  ["published", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]]),
        "The data is the Debian bookworm package descriptions snapshot (`data/raw/debian-bookworm/`, its "
        "provenance.json names the archive files and their sha256), curated and mined by the pipeline. "
        "Man pages and the Python documentation were never used: they are held out for independent evaluation.",
        "## Settings",
        _table(["param", "value"], [[name, _value(value)] for name, value in sorted(facts.settings.items())]),
        "## Measured while training (dev split)",
        _table(["metric", "value"], [[name, _value(value)] for name, value in sorted(facts.metrics.items())
                                     if "dev" in name or name.endswith("per_s")]),
        "## Intended use",
        INTENDED_USE,
        "## Limitations",
        LIMITATIONS,
    ]
    return "\n\n".join(sections) + "\n"


def registry_card(training: str, grid: list[dict[str, Any]], operating_point: dict[str, Any],
                  decision: dict[str, Any], version: str) -> str:
    """The published card with the test split's evaluation, the operating point and the gate's decision."""
    flat = sorted((row for row in grid if row["index"] == "float_flat"), key=lambda row: (row["model"], -row["dim"]))
    chosen = operating_point.get("chosen")
    point = ("none within the evaluate budgets" if not chosen else
             f"`{chosen['model']}` at {chosen['dim']} dims, index `{chosen['index']}`"
             f"{' with ' + operating_point['rescore']['with'] + ' rescoring' if chosen['rescored'] else ''}: "
             f"nDCG@10 {chosen['ndcg_at_10']:.4f}, {chosen['bytes_per_vector']:.0f} bytes per vector, "
             f"p99 {chosen['p99_ms']:.2f} ms per query ({operating_point['reason']})")
    evaluation = [
        f"## Registered as version {version}",
        f"Gate: {'passed' if decision['promote'] else 'refused'} ({'; '.join(decision['reasons'])}).",
        "## Test split (Debian, exact float search)",
        _table(["model", "dims", "nDCG@10", "MRR@10", "Recall@100"],
               [[row["model"], str(row["dim"]), f"{row['ndcg_at_10']:.4f}", f"{row['mrr_at_10']:.4f}",
                 f"{row['recall_at_100']:.4f}"] for row in flat]),
        "## Operating point (how to serve it)",
        point + ". `embedforge search` and `embedforge serve` apply it as measured.",
    ]
    return training.rstrip("\n") + "\n\n" + "\n\n".join(evaluation) + "\n"
