"""evaluate: retrieval quality, latency and bytes of every model x dim x precision x index, and the operating point.

The pipeline stage searches the index artifact with queries encoded by each model (the corpus was embedded
once, by quantize) and scores every index: nDCG@10 (the headline), MRR@10 and Recall@100 from trec_eval
through pytrec_eval; single-query latency p50/p99; bytes per vector; build time. Binary indexes are scored
alone and rescored (top k x multiplier by Hamming distance, re-ranked by the float query against the int8 or
float document vectors). It then draws the quality-per-byte Pareto front and picks the operating point: the
best nDCG@10 of the served model within the bytes-per-vector and p99 budgets.

For a quick look at any model on any BEIR directory (exact float search only):

    embedforge evaluate --model path/to/model --beir path/to/beir-dir
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from components.artifact_types import (
    BEIR,
    INDEXES,
    CodedCorpus,
    IndexRecord,
    IndexSet,
    InMemoryCorpus,
    Provenance,
    QuantizedCorpus,
    binary_codes,
    build_index,
    dequantize_int8,
    read_index,
    read_indexes,
    read_quantized,
    write_evaluation,
)
from components.artifacts import ArtifactError
from components.config import StageConfig, params_digest
from components.data import BeirDataset, DataError, read_beir
from components.embed import truncate
from components.faiss_device import exact_search_device, inner_product_search

log = logging.getLogger(__name__)

STAGE = "evaluate"
QUICK_DIMS = [384, 256, 128, 64, 32]
_TREC_MEASURES = {"ndcg_cut.10": "ndcg@10", "recall.100": "recall@100"}


class EvaluateConfig(StageConfig):
    """The `evaluate` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    batch_size: int = Field(64, ge=1, description="Queries per encode batch.")
    passage_batch_size: int = Field(
        16, ge=1, description="Out-of-domain passages per encode batch (as quantize's batch_size: 16 encode long "
                              "passages 1.2x as fast as 64 on 2 CPU cores; short queries prefer 64).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="float32 | bfloat16 query encoding.")
    top_k: int = Field(100, ge=10, description="Documents retrieved per query (Recall@100 needs 100).")
    hnsw_ef_search: int = Field(
        128, ge=1,
        description="HNSW query-time candidate list (at least top_k x rescore_multiplier is used).")
    ivf_nprobe: int = Field(32, ge=1, description="Inverted lists an IVF index searches per query.")
    rescore_multiplier: int = Field(
        4, ge=1, description="Binary search fetches top_k x this by Hamming distance, then rescores.")
    rescore_with: Literal["int8", "float32"] = Field(
        "int8",
        description="int8 | float32: document vectors the float query rescores binary candidates against.")
    latency_queries: int = Field(
        200, ge=10, description="Single-query searches timed per index for p50/p99.")
    serve_model: str = Field(
        "student",
        description="The model whose operating point is chosen and registered (the register gate's "
                    "candidate).")
    max_bytes_per_vector: float | None = Field(
        64.0, gt=0, description="Operating-point budget: index bytes per document; null = no limit.")
    max_p99_ms: float | None = Field(
        10.0, gt=0, description="Operating-point budget: single-query p99 latency in ms; null = no limit.")
    ood_queries: int | None = Field(
        None, ge=10,
        description="Out-of-domain queries scored per set (the first ones; the corpus keeps their passages and "
                    "as many others); null = every query of the set.")

    @property
    def rescore_candidates(self) -> int:
        """Candidates a binary search fetches by Hamming distance before rescoring them."""
        return self.top_k * self.rescore_multiplier


def configuration_name(index: str, rescored: bool) -> str:
    """An index as evaluate scored it: `binary_flat_rescore` is binary search re-ranked by float vectors."""
    return f"{index}_rescore" if rescored else index


@dataclass(frozen=True)
class GridRow:
    """One model x dim x index (x rescoring) measurement."""

    model: str
    dim: int
    index: str
    precision: str
    rescored: bool
    ndcg_at_10: float
    mrr_at_10: float
    recall_at_100: float
    p50_ms: float
    p99_ms: float
    bytes_per_vector: float
    build_s: float

    @property
    def config(self) -> str:
        return configuration_name(self.index, self.rescored)

    @property
    def key(self) -> str:
        return f"{self.model}/d{self.dim}/{self.config}"


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    table: str
    data_fingerprint: str
    grid: list[GridRow]
    pareto: list[GridRow]
    chosen: GridRow | None
    choice_reason: str
    out_of_domain: dict[str, dict[str, float]]  # model -> set (and "mean") -> nDCG@10 at the model's full dim
    out_of_domain_at_point: dict[str, float]  # set (and "mean") -> nDCG@10 of the chosen operating point


def out_of_domain_sets(folder: Path, max_queries: int | None) -> dict[str, BeirDataset]:
    """Each BEIR set in `folder` (one directory per set; no training stage reads them), cut to its first
    `max_queries` queries, their relevant passages and as many others."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of out-of-domain sets; give a folder holding one BEIR directory "
                        "per set (scripts/build_text_snapshots.py builds data/raw/ood)")
    sets = {directory.name: read_beir(directory) for directory in sorted(folder.iterdir()) if directory.is_dir()}
    if not sets:
        raise DataError(f"{folder}: no BEIR set inside; each set is a directory with corpus.jsonl, queries.jsonl "
                        "and qrels/test.tsv")
    return {name: dataset if max_queries is None else first_queries(dataset, max_queries)
            for name, dataset in sets.items()}


def first_queries(dataset: BeirDataset, count: int) -> BeirDataset:
    query_ids = list(dataset.qrels)[:count]
    relevant = {doc_id for query_id in query_ids for doc_id in dataset.qrels[query_id]}
    others = [doc_id for doc_id in dataset.corpus if doc_id not in relevant][:len(relevant)]
    kept = relevant | set(others)
    return BeirDataset(corpus={doc_id: text for doc_id, text in dataset.corpus.items() if doc_id in kept},
                       queries={query_id: dataset.queries[query_id] for query_id in query_ids},
                       qrels={query_id: dataset.qrels[query_id] for query_id in query_ids})


@dataclass(frozen=True)
class EncodedSet:
    """A BEIR set encoded by one model: unit vectors at its full dim, in corpus and qrels order."""

    doc_ids: list[str]
    query_ids: list[str]
    docs: np.ndarray
    queries: np.ndarray
    docs_per_s: float


def encode_set(model: Any, dataset: BeirDataset, config: EvaluateConfig, label: str) -> EncodedSet:
    from components.embed import encode

    doc_ids, query_ids = list(dataset.corpus), list(dataset.qrels)
    docs = encode(model, [dataset.corpus[i] for i in doc_ids], batch_size=config.passage_batch_size,
                  label=f"{label} docs")
    queries = encode(model, [dataset.queries[i] for i in query_ids], batch_size=config.batch_size,
                     label=f"{label} queries")
    return EncodedSet(doc_ids, query_ids, docs.vectors, queries.vectors, docs.per_second)


def exact_scores(encoded: EncodedSet, qrels: dict[str, dict[str, int]], dims: list[int],
                 top_k: int) -> dict[str, float]:
    """Exact float search of the set's queries over its corpus at each dim: `d<dim>/<measure>`."""
    full_dim = encoded.docs.shape[1]
    metrics = {}
    for dim in [d for d in dims if d <= full_dim] or [full_dim]:
        run = exact_search(truncate(encoded.docs, dim), truncate(encoded.queries, dim), encoded.doc_ids,
                           encoded.query_ids, top_k)
        metrics |= {f"d{dim}/{key}": value for key, value in retrieval_metrics(qrels, run).items()}
    return metrics


def score_out_of_domain(model: Any, name: str, sets: dict[str, BeirDataset], dims: list[int],
                        config: EvaluateConfig) -> tuple[dict[str, float], dict[str, EncodedSet]]:
    """`ood/<set>/<model>/d<dim>/<measure>` for each set, and `ood/mean/<model>/d<dim>/ndcg@10` over the sets;
    with each set as the model encoded it."""
    metrics, encoded = {}, {}
    for set_name, dataset in sets.items():
        encoded[set_name] = encode_set(model, dataset, config, f"{name} {set_name}")
        scores = exact_scores(encoded[set_name], dataset.qrels, dims, config.top_k)
        metrics |= {f"ood/{set_name}/{name}/{key}": value for key, value in scores.items()}
    for dim in dims:
        metrics[f"ood/mean/{name}/d{dim}/ndcg@10"] = float(np.mean(
            [metrics[f"ood/{set_name}/{name}/d{dim}/ndcg@10"] for set_name in sets]))
    return metrics, encoded


def ood_at_operating_point(chosen: GridRow, encoded: dict[str, EncodedSet], sets: dict[str, BeirDataset],
                           quantized: QuantizedCorpus, indexes: IndexSet, config: EvaluateConfig) -> dict[str, float]:
    """The served configuration on each out-of-domain set: its dims, index type (with the HNSW settings the index
    artifact was built with) and rescoring, the set's passages coded with the quantize artifact's int8
    calibration, as a served index would add new passages. nDCG@10 per set, and their "mean"."""
    hnsw = indexes.manifest.extra["hnsw"]
    scores = {}
    for set_name, coded in encoded.items():
        corpus = InMemoryCorpus(coded.docs, {chosen.dim: quantized.ranges(chosen.model, chosen.dim)})
        index = build_index(chosen.index, corpus, chosen.model, chosen.dim, hnsw_m=hnsw["m"],
                            hnsw_ef_construction=hnsw["ef_construction"])
        store = rescore_store(corpus, chosen.model, chosen.dim, config.rescore_with) if chosen.rescored else None
        floats = truncate(coded.queries, chosen.dim)
        searcher = make_searcher(index, chosen.index, for_query_sets(store, config), config)
        found_scores, positions = search_all(searcher, floats, binary_codes(floats),
                                             min(config.top_k, len(coded.doc_ids)))
        run = to_run(found_scores, positions, coded.doc_ids, coded.query_ids)
        scores[set_name] = retrieval_metrics(sets[set_name].qrels, run)["ndcg@10"]
    return scores | {"mean": float(np.mean(list(scores.values())))}


def out_of_domain_table(metrics: dict[str, float], models: dict[str, int], sets: list[str]) -> dict[str, dict[str, float]]:
    """model -> {set: nDCG@10, "mean": ...} at each model's full dim (`models`: name -> full dim)."""
    return {name: {set_name: metrics[f"ood/{set_name}/{name}/d{dim}/ndcg@10"] for set_name in [*sets, "mean"]}
            for name, dim in models.items()}


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@100 over every judged query (a query missing from `run` scores 0).

    trec_eval's reciprocal rank has no cut-off, so MRR@10 is computed on the run truncated to its top 10.
    """
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(_TREC_MEASURES))
    top10 = {query: dict(sorted(docs.items(), key=itemgetter(1), reverse=True)[:10]) for query, docs in run.items()}
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


def to_run(scores: np.ndarray, positions: np.ndarray, doc_ids: list[str], query_ids: list[str]) -> dict[str, dict[str, float]]:
    """faiss (scores, positions) -> trec run {query id: {doc id: score}}; position -1 means 'no result'."""
    return {  # rows as Python lists first: 10x faster than iterating numpy scalars, the same float values
        query_id: {doc_ids[position]: score for score, position in zip(row_scores, row_positions) if position >= 0}
        for query_id, row_scores, row_positions in zip(query_ids, scores.tolist(), positions.tolist(), strict=True)
    }


def exact_search(
    doc_vectors: np.ndarray, query_vectors: np.ndarray, doc_ids: list[str], query_ids: list[str], top_k: int
) -> dict[str, dict[str, float]]:
    """Exact inner-product search with faiss (on the GPU where there is one); returns a trec-style run
    {query id: {doc id: score}}."""
    scores, positions = inner_product_search(doc_vectors, query_vectors, min(top_k, len(doc_ids)))
    return to_run(scores, positions, doc_ids, query_ids)


class Int8Rows:
    """int8 document codes decoded only for the candidates rescoring gathers: a quarter of float32's bytes in
    RAM, none when the codes are memory-mapped. Decoding is elementwise, so scores equal those of decoding all."""

    def __init__(self, codes: np.ndarray, ranges: np.ndarray) -> None:
        self.codes, self.ranges = codes, ranges

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        flat = dequantize_int8(np.asarray(self.codes[positions.ravel()]), self.ranges)
        return flat.reshape(*positions.shape, flat.shape[-1])

    def decoded(self) -> np.ndarray:
        """Every row decoded at once (float32, the same values as decoding them one by one)."""
        return dequantize_int8(np.asarray(self.codes), self.ranges)


RescoreStore = np.ndarray | Int8Rows
SEARCH_CHUNK = 256  # queries a batch search rescores at once (`search_all`)


def rescore_store(quantized: CodedCorpus, model: str, dim: int, rescore_with: str) -> RescoreStore:
    """The document vectors a float query rescores binary candidates against."""
    if rescore_with == "int8":
        return Int8Rows(quantized.int8(model, dim), quantized.ranges(model, dim))
    return quantized.float32(model, dim)


def for_query_sets(store: RescoreStore | None, config: EvaluateConfig) -> RescoreStore | None:
    """The store a whole query set's search rescores against: int8 rows decoded once, when the corpus has no more
    rows than one chunk of queries gathers as candidates anyway (so no more memory), rather than once per
    candidate; the same values, as decoding is elementwise. Latency keeps `store`: a served query decodes its own."""
    if isinstance(store, Int8Rows) and len(store.codes) <= SEARCH_CHUNK * config.rescore_candidates:
        return store.decoded()
    return store


def rescore(queries: np.ndarray, candidates: np.ndarray, documents: RescoreStore,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate positions (-1 = none) by float query . document vector; returns the top-k (scores, ids)."""
    safe = np.where(candidates < 0, 0, candidates)
    scores = np.einsum("qd,qcd->qc", queries, documents[safe])
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)


Searcher = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def make_searcher(index: Any, index_type: str, store: RescoreStore | None, config: EvaluateConfig) -> Searcher:
    """A function (float queries, packed-bit queries, k) -> (scores, positions), higher scores better, over a
    faiss index of `index_type` (`float_hnsw`, `binary_ivf`, ...: binary indexes take the packed bits).

    Rescoring always re-ranks top_k x rescore_multiplier candidates, whatever k is asked: the top 10 a search
    service returns, the latency measured and the nDCG@10 scored all come from the same candidates.
    """
    if index_type.endswith("hnsw"):
        index.hnsw.efSearch = max(config.hnsw_ef_search, config.rescore_candidates)
    if index_type.endswith("ivf"):
        index.nprobe = config.ivf_nprobe
    if not index_type.startswith("binary"):
        return lambda floats, bits, k: index.search(floats, k)
    if store is None:
        def hamming(floats: np.ndarray, bits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            distances, positions = index.search(bits, k)
            return -distances.astype(np.float32), positions
        return hamming
    def rescored(floats: np.ndarray, bits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, found = index.search(bits, max(config.rescore_candidates, k))
        return rescore(floats, found, store, k)
    return rescored


def search_all(searcher: Searcher, floats: np.ndarray, bits: np.ndarray, k: int,
               chunk: int = SEARCH_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Batch search in chunks of queries (bounds the memory of rescoring's gathered candidate vectors)."""
    parts = [searcher(floats[start:start + chunk], bits[start:start + chunk], k) for start in range(0, len(floats), chunk)]
    return np.vstack([scores for scores, _ in parts]), np.vstack([ids for _, ids in parts])


def latency_ms(searcher: Searcher, floats: np.ndarray, bits: np.ndarray, count: int) -> tuple[float, float]:
    """p50 and p99 of single-query search latency (top 10) in milliseconds, on one thread, after a warm-up query.

    One thread per query is how a search service runs; faiss's OpenMP threads on a single query mostly measure
    thread wake-up and, on a busy machine, spin-waiting (tens of ms for a 60-vector binary index here).
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        searcher(floats[:1], bits[:1], 10)
        timings = []
        for row in range(min(count, len(floats))):
            started = time.perf_counter()
            searcher(floats[row:row + 1], bits[row:row + 1], 10)
            timings.append((time.perf_counter() - started) * 1000)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 99))


def pareto_front(rows: list[GridRow]) -> list[GridRow]:
    """Rows no other row beats on both bytes per vector (fewer) and nDCG@10 (higher), cheapest first."""
    front: list[GridRow] = []
    for row in sorted(rows, key=lambda r: (r.bytes_per_vector, -r.ndcg_at_10)):
        if not front or row.ndcg_at_10 > front[-1].ndcg_at_10:
            front.append(row)
    return front


def choose_operating_point(rows: list[GridRow], config: EvaluateConfig) -> tuple[GridRow | None, str]:
    """Best nDCG@10 of the served model within the budgets (ties: fewer bytes, then lower p99)."""
    served = [row for row in rows if row.model == config.serve_model]
    within = [row for row in served
              if (config.max_bytes_per_vector is None or row.bytes_per_vector <= config.max_bytes_per_vector)
              and (config.max_p99_ms is None or row.p99_ms <= config.max_p99_ms)]
    budget = f"bytes/vector <= {config.max_bytes_per_vector}, p99 <= {config.max_p99_ms} ms"
    if not within:
        return None, (f"no configuration of {config.serve_model!r} meets the budget ({budget}) among "
                      f"{len(served)} measured")
    best = max(within, key=lambda row: (row.ndcg_at_10, -row.bytes_per_vector, -row.p99_ms))
    return best, f"best nDCG@10 of {config.serve_model!r} among {len(within)} of {len(served)} within {budget}"


def check_same_corpus(quantized: QuantizedCorpus, indexes: IndexSet, beir_fingerprint: str, beir_dir: Path) -> None:
    """The index must come from this quantize artifact, and that from this BEIR directory."""
    if indexes.manifest.inputs.get("quantized") != quantized.manifest.fingerprint:
        raise ArtifactError(f"{indexes.path}: built from another quantize artifact than {quantized.path}; "
                                      f"re-run the index stage")
    if quantized.manifest.inputs.get("beir") != beir_fingerprint:
        raise ArtifactError(f"{quantized.path}: embeds another corpus than {beir_dir}; re-run quantize "
                                      f"on it (`dvc repro quantize`)")


def evaluate_grid(config: EvaluateConfig, beir_dir: Path, quantized_dir: Path, index_dir: Path,
                  ood_dir: Path | None = None) -> EvaluateResult:
    """Score every index of the index artifact on the BEIR queries, and each model on the out-of-domain sets
    in `ood_dir` (exact float search at every dim it was indexed at)."""
    from components.embed import encode, load_model

    started = time.perf_counter()
    beir_fingerprint = BEIR.read_manifest(beir_dir).fingerprint
    quantized = read_quantized(quantized_dir)
    indexes = read_indexes(index_dir)
    check_same_corpus(quantized, indexes, beir_fingerprint, beir_dir)
    dataset = read_beir(beir_dir)
    query_ids = list(dataset.qrels)
    texts = [dataset.queries[i] for i in query_ids]
    ood_sets = out_of_domain_sets(ood_dir, config.ood_queries) if ood_dir is not None else {}
    metrics: dict[str, float] = {}
    grid: list[GridRow] = []
    full_dims: dict[str, int] = {}
    served_ood: dict[str, EncodedSet] = {}
    at_point: dict[str, float] = {}
    for model_name in dict.fromkeys(record.model for record in indexes.records):
        info = quantized.models[model_name]
        model = load_model(str(info["reference"]), max_seq_length=int(info["max_seq_length"]), dtype=config.dtype)
        queries = encode(model, texts, batch_size=config.batch_size, label=f"{model_name} queries")
        metrics[f"{model_name}/encode_docs_per_s"] = float(info["encode_docs_per_s"])
        metrics[f"{model_name}/encode_queries_per_s"] = queries.per_second
        metrics[f"{model_name}/layers"] = float(model[0].auto_model.config.num_hidden_layers)
        for record in (r for r in indexes.records if r.model == model_name):
            grid.extend(score_index(record, indexes, quantized, queries.vectors, query_ids, dataset, config))
        dims = sorted({record.dim for record in indexes.records if record.model == model_name}, reverse=True)
        full_dims[model_name] = dims[0]
        if ood_sets:
            scores, encoded = score_out_of_domain(model, model_name, ood_sets, dims, config)
            metrics |= scores
            if model_name == config.serve_model:
                served_ood = encoded
    for row in grid:
        for name in ("ndcg_at_10", "mrr_at_10", "recall_at_100", "p50_ms", "p99_ms", "bytes_per_vector"):
            metrics[f"{row.key}/{name.replace('_at_', '@')}"] = getattr(row, name)
    pareto = pareto_front(grid)
    chosen, reason = choose_operating_point(grid, config)
    if chosen is not None:
        metrics |= {"operating_point/ndcg@10": chosen.ndcg_at_10, "operating_point/dim": chosen.dim,
                    "operating_point/bytes_per_vector": chosen.bytes_per_vector,
                    "operating_point/p99_ms": chosen.p99_ms}
        if served_ood:
            at_point = ood_at_operating_point(chosen, served_ood, ood_sets, quantized, indexes, config)
            metrics |= {f"ood/{name}/operating_point/ndcg@10": score for name, score in at_point.items()
                        if name != "mean"}
            metrics["operating_point/ood_ndcg@10"] = at_point["mean"]
    metrics |= {"queries": len(query_ids), "documents": len(quantized.doc_ids),
                "seconds": time.perf_counter() - started}
    out_of_domain = out_of_domain_table(metrics, full_dims, list(ood_sets)) if ood_sets else {}
    metrics |= headline_scores(metrics, full_dims, out_of_domain)
    return EvaluateResult(metrics=metrics, table=summary_table(grid, chosen), data_fingerprint=beir_fingerprint,
                          grid=grid, pareto=pareto, chosen=chosen, choice_reason=reason, out_of_domain=out_of_domain,
                          out_of_domain_at_point=at_point)


def headline_scores(metrics: dict[str, float], full_dims: dict[str, int],
                    out_of_domain: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each model's exact float nDCG@10 at its full dim, `<model>/ndcg@10`, and its out-of-domain mean there
    (`out_of_domain_table`), `<model>/ood_ndcg@10`: the few numbers that tell experiments apart (`dvc exp show`)."""
    scores = {}
    for name, dim in full_dims.items():
        if f"{name}/d{dim}/float_flat/ndcg@10" in metrics:
            scores[f"{name}/ndcg@10"] = metrics[f"{name}/d{dim}/float_flat/ndcg@10"]
        if name in out_of_domain:
            scores[f"{name}/ood_ndcg@10"] = out_of_domain[name]["mean"]
    return scores


def score_index(record: IndexRecord, indexes: IndexSet, quantized: QuantizedCorpus, query_vectors: np.ndarray,
                query_ids: list[str], dataset: BeirDataset, config: EvaluateConfig) -> list[GridRow]:
    """Quality and latency of one index (and of its rescored variant when binary)."""
    floats = truncate(query_vectors, record.dim)
    bits = binary_codes(floats)
    index = read_index(indexes, record)
    variants: list[RescoreStore | None] = [None]
    if record.precision == "binary":
        variants.append(rescore_store(quantized, record.model, record.dim, config.rescore_with))
    rows = []
    for store in variants:
        scores, positions = search_all(make_searcher(index, record.type, for_query_sets(store, config), config), floats,
                                       bits, min(config.top_k, record.vectors))
        quality = retrieval_metrics(dataset.qrels, to_run(scores, positions, quantized.doc_ids, query_ids))
        p50, p99 = latency_ms(make_searcher(index, record.type, store, config), floats, bits, config.latency_queries)
        rows.append(GridRow(model=record.model, dim=record.dim, index=record.type, precision=record.precision,
                            rescored=store is not None, ndcg_at_10=quality["ndcg@10"], mrr_at_10=quality["mrr@10"],
                            recall_at_100=quality["recall@100"], p50_ms=p50, p99_ms=p99,
                            bytes_per_vector=record.bytes_per_vector, build_s=record.build_seconds))
    return rows


def grid_table(rows: list[GridRow]) -> str:
    header = ("| model | dim | index | nDCG@10 | MRR@10 | Recall@100 | p50 ms | p99 ms | bytes/vector | build s |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r.model} | {r.dim} | {r.config} | {r.ndcg_at_10:.4f} | {r.mrr_at_10:.4f} | {r.recall_at_100:.4f} "
             f"| {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.bytes_per_vector:.1f} | {r.build_s:.2f} |" for r in rows]
    return "\n".join([header, *lines])


def summary_table(rows: list[GridRow], chosen: GridRow | None) -> str:
    """What `dvc repro` prints: exact float quality per model and dim, then the chosen operating point."""
    exact = [row for row in rows if row.index == "float_flat"]
    chosen_line = (f"operating point: {chosen.key}  nDCG@10 {chosen.ndcg_at_10:.4f}, {chosen.bytes_per_vector:.1f} "
                   f"bytes/vector, p99 {chosen.p99_ms:.3f} ms" if chosen else "operating point: none within budget")
    return grid_table(exact) + "\n\n" + chosen_line


def ndcg_by_dim_csv(rows: list[GridRow], column: Callable[[GridRow], str]) -> str:
    """Wide CSV, one row per dim and one column per `column(row)`: what `dvc plots` draws as one line each."""
    columns = list(dict.fromkeys(column(row) for row in rows))
    cells = {(row.dim, column(row)): row.ndcg_at_10 for row in rows}
    lines = ["dim," + ",".join(columns)]
    for dim in sorted({row.dim for row in rows}):
        lines.append(f"{dim}," + ",".join(f"{cells[(dim, c)]:.4f}" if (dim, c) in cells else "" for c in columns))
    return "\n".join(lines) + "\n"


def ndcg_by_bytes_csv(rows: list[GridRow]) -> str:
    lines = ["config,model,bytes_per_vector,ndcg@10"]
    lines += [f"{row.key},{row.model},{row.bytes_per_vector:.2f},{row.ndcg_at_10:.4f}" for row in rows]
    return "\n".join(lines) + "\n"


def flat_by_precision(rows: list[GridRow], model: str) -> list[GridRow]:
    """The served model's flat indexes: how each precision trades quality for bytes at every dim."""
    return [row for row in rows if row.model == model and row.index.endswith("flat")]


def draw_plots(result: EvaluateResult, config: EvaluateConfig, folder: Path) -> list[Path]:
    """nDCG@10 against dims per precision, and against bytes per vector with the Pareto front (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    served = flat_by_precision(result.grid, config.serve_model)
    figure, axis = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(row.config for row in served):
        points = sorted((row.dim, row.ndcg_at_10) for row in served if row.config == label)
        axis.plot(*zip(*points, strict=True), marker="o", label=label)
    axis.set(xscale="log", xlabel="dims", ylabel="nDCG@10", title=f"{config.serve_model}: nDCG@10 by dims")
    axis.legend(fontsize=8)
    figure.tight_layout()
    by_dim = folder / "ndcg_vs_dim.png"
    figure.savefig(by_dim, dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(row.model for row in result.grid):
        rows = [row for row in result.grid if row.model == model]
        axis.scatter([r.bytes_per_vector for r in rows], [r.ndcg_at_10 for r in rows], s=12, label=model)
    axis.plot([r.bytes_per_vector for r in result.pareto], [r.ndcg_at_10 for r in result.pareto], color="black",
              linewidth=1, label="Pareto front")
    if result.chosen is not None:
        axis.scatter([result.chosen.bytes_per_vector], [result.chosen.ndcg_at_10], marker="*", s=160,
                     color="red", label="operating point")
    axis.set(xscale="log", xlabel="bytes per vector (index)", ylabel="nDCG@10", title="quality per byte")
    axis.legend(fontsize=8)
    figure.tight_layout()
    by_bytes = folder / "ndcg_vs_bytes.png"
    figure.savefig(by_bytes, dpi=100)
    plt.close(figure)
    return [by_dim, by_bytes]


def report_markdown(result: EvaluateResult, config: EvaluateConfig, beir_dir: Path, plots: list[Path]) -> str:
    per_model = "\n".join(f"| {name} | {result.metrics[f'{name}/layers']:.0f} | "
                          f"{result.metrics[f'{name}/encode_docs_per_s']:.0f} | "
                          f"{result.metrics[f'{name}/encode_queries_per_s']:.0f} |"
                          for name in dict.fromkeys(row.model for row in result.grid))
    chosen = (f"**{result.chosen.key}**: nDCG@10 {result.chosen.ndcg_at_10:.4f}, "
              f"{result.chosen.bytes_per_vector:.1f} bytes/vector, p50 {result.chosen.p50_ms:.3f} ms, "
              f"p99 {result.chosen.p99_ms:.3f} ms" if result.chosen else "**none**")
    return "\n".join([
        f"# Evaluation on `{beir_dir}`",
        "",
        f"{result.metrics['queries']:.0f} queries, {result.metrics['documents']:.0f} documents. Bytes per vector are "
        f"the index file's bytes per document (graph included; rescoring vectors stay on disk). Latency is one query "
        f"at a time, top 10, single process. Binary rescoring: top {config.top_k} x {config.rescore_multiplier} by "
        f"Hamming distance, re-ranked against {config.rescore_with} document vectors.",
        "",
        f"## Operating point\n\n{chosen} ({result.choice_reason}).",
        "",
        *out_of_domain_section(result),
        "## Models\n\n| model | layers | docs/s | queries/s |\n|---|---:|---:|---:|\n" + per_model,
        "",
        "## Pareto front (quality per byte)\n\n" + grid_table(result.pareto),
        "",
        "## Plots\n\n" + "\n".join(f"![{path.stem}]({path.name})" for path in plots),
        "",
        "## Whole grid\n\n" + grid_table(result.grid),
        "",
    ])


def out_of_domain_section(result: EvaluateResult) -> list[str]:
    """In-domain and out-of-domain nDCG@10 side by side, at each model's full dim (exact float search)."""
    if not result.out_of_domain:
        return []
    sets = [name for name in next(iter(result.out_of_domain.values())) if name != "mean"]
    in_domain = {row.model: row.ndcg_at_10 for row in result.grid if row.index == "float_flat"
                 and row.dim == max(r.dim for r in result.grid if r.model == row.model)}
    base = result.out_of_domain.get("base", {}).get("mean")
    lines = ["## Out of domain", "",
             f"nDCG@10, exact float search at each model's full dim; the last row, if any, is the served "
             f"configuration. Out-of-domain sets: {', '.join(sets)} (held out from every training stage).", "",
             "| model | Debian test | " + " | ".join(sets) + " | out-of-domain mean | vs base |",
             "|---|---:|" + "---:|" * len(sets) + "---:|---:|"]
    rows = dict(result.out_of_domain)
    in_domain = {name: f"{score:.4f}" for name, score in in_domain.items()}
    if result.chosen is not None and result.out_of_domain_at_point:
        served = f"{result.chosen.model} at the operating point ({result.chosen.key})"
        rows[served], in_domain[served] = result.out_of_domain_at_point, f"{result.chosen.ndcg_at_10:.4f}"
    for name, scores in rows.items():
        versus = f"{scores['mean'] - base:+.4f}" if base is not None else ""
        lines.append(f"| {name} | {in_domain.get(name, '')} | "
                     + " | ".join(f"{scores[set_name]:.4f}" for set_name in sets) + f" | {scores['mean']:.4f} | {versus} |")
    return [*lines, ""]


def publish_evaluation(result: EvaluateResult, config: EvaluateConfig, output: Path, inputs: dict[str, str]) -> None:
    """The gate's input: the grid and the chosen operating point, as a verified artifact."""
    write_evaluation(output, [asdict(row) for row in result.grid], {
        "chosen": asdict(result.chosen) if result.chosen else None, "reason": result.choice_reason,
        "serve_model": config.serve_model, "budgets": {"max_bytes_per_vector": config.max_bytes_per_vector,
                                                       "max_p99_ms": config.max_p99_ms},
        "rescore": {"multiplier": config.rescore_multiplier, "with": config.rescore_with},
        "top_k": config.top_k, "hnsw_ef_search": config.hnsw_ef_search, "ivf_nprobe": config.ivf_nprobe,
        "out_of_domain": {"measure": "ndcg@10 at each model's full dim, exact float search",
                          "scores": result.out_of_domain,
                          "operating_point": result.out_of_domain_at_point or None} if result.out_of_domain else None},
        Provenance(STAGE, params_digest(config), inputs))


# --- quick mode: any model, any BEIR directory, exact float search ---

def evaluate_models(models: dict[str, str], beir_dir: Path, config: EvaluateConfig,
                    dims: list[int] | None = None) -> dict[str, float]:
    """Encode corpus and queries with each model and score exact float search at each dim (`<name>/d<dim>/...`)."""
    from components.embed import load_model

    dataset = read_beir(beir_dir)
    log.info("evaluate: exact search on %s", exact_search_device())
    metrics: dict[str, float] = {}
    for name, reference in models.items():
        encoded = encode_set(load_model(reference, dtype=config.dtype), dataset, config, name)
        scores = exact_scores(encoded, dataset.qrels, dims or QUICK_DIMS, config.top_k)
        metrics |= {f"{name}/{key}": value for key, value in scores.items()}
        metrics[f"{name}/encode_docs_per_s"] = encoded.docs_per_s
    return metrics


def models_from_argv(items: list[str] | None) -> dict[str, str]:
    """`--model NAME=PATH` (or a bare PATH, named after its directory), as the CLI and the benchmarks take them."""
    return dict(item.split("=", 1) if "=" in item else (Path(item).name or item, item) for item in items or [])


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.evaluate` / `embedforge evaluate`."""
    from components.cli import (
        StageOutcome,
        configure_logging,
        local_path,
        parse_stage_args,
        prepare_stage,
        run_stage,
        stage_parser,
        write_text_atomic,
    )

    parser = stage_parser(STAGE, EvaluateConfig)
    parser.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                        help="quick mode: exact float search with this model on --beir (repeatable); no artifacts")
    pipeline_metrics = parser.get_default("metrics")
    parser.set_defaults(metrics=None)  # quick mode prints its scores: it writes a metrics file only when given one
    args = parser.parse_args(argv)
    if args.model:  # quick mode reads --beir and the models only: the pipeline's artifacts are no inputs then
        args.quantized = args.index = args.output = None
    elif args.metrics is None:
        args.metrics = local_path(pipeline_metrics)
    if args.model and not args.params.is_file():  # quick mode also works outside a project, on defaults
        configure_logging(args.verbose)
        config = EvaluateConfig()
        prepare_stage(args)
    else:
        args, config = parse_stage_args(parser, argv, EvaluateConfig, STAGE, args)

    def quick() -> StageOutcome:
        metrics = evaluate_models(models_from_argv(args.model), args.beir, config)
        print(json.dumps(metrics, indent=1), flush=True)
        return StageOutcome(metrics=metrics, data_fingerprint="unmanaged:" + str(args.beir.resolve()))

    def work() -> StageOutcome:
        result = evaluate_grid(config, args.beir, args.quantized, args.index, args.ood)
        publish_evaluation(result, config, args.output, inputs={
            "beir": result.data_fingerprint,
            "index": INDEXES.read_manifest(args.index, verify=False).fingerprint})
        images = draw_plots(result, config, args.report.parent)
        write_text_atomic(args.report, report_markdown(result, config, args.beir, images))
        write_text_atomic(args.plots / "ndcg_vs_dim.csv",
                          ndcg_by_dim_csv([r for r in result.grid if r.index == "float_flat"], lambda r: r.model))
        write_text_atomic(args.plots / "ndcg_vs_dim_by_precision.csv",
                          ndcg_by_dim_csv(flat_by_precision(result.grid, config.serve_model), lambda r: r.config))
        write_text_atomic(args.plots / "ndcg_vs_bytes.csv", ndcg_by_bytes_csv(result.grid))
        print(result.table, flush=True)
        return StageOutcome(metrics=result.metrics, data_fingerprint=result.data_fingerprint,
                            files=[args.report, *images, args.output / "grid.json",
                                   args.output / "operating_point.json"])

    run_stage(STAGE, args, config, quick if args.model else work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
