"""search: the model and index the pipeline built, answering queries at the operating point evaluate chose.

`open_retriever` loads a model (a directory, `package:<module>`, its ONNX export from `embedforge export`, or a
registered version such as `models:/embedforge-student@champion`), the operating point (the registered
version's own, or the evaluation artifact's), the index artifact, the quantize artifact (int8 rescoring
vectors) and the BEIR corpus (passage texts), and refuses to start when they do not belong together. Queries
are then searched exactly as evaluate measured them: the same dims, index, HNSW/IVF settings and rescoring,
through the same `make_searcher` (an ONNX export encodes the queries with int8 weights: bench/onnx_export.py
measures what that costs).

    embedforge search "how do I mount an NFS share"          # one query, top 10 with scores and passages
    embedforge search --model models:/embedforge-student@champion - < queries.txt   # one query per line
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.artifact_types import (
    BEIR,
    binary_codes,
    model_fingerprint,
    read_evaluation,
    read_index,
    read_indexes,
    read_quantized,
)
from components.artifacts import ArtifactError
from components.data import DataError, read_beir
from components.embed import truncate
from components.export import ONNX_BACKEND
from components.evaluate import (
    EvaluateConfig,
    Searcher,
    check_same_corpus,
    configuration_name,
    make_searcher,
    rescore_store,
)
from components.tracking import tracking_uri

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "models:/"
MAX_QUERY_CHARS = 2000  # longer text is truncated by the tokenizer anyway; a longer query is a client bug
MAX_BATCH = 64
DEFAULT_PATHS = {"evaluation": Path("data/evaluation"), "index": Path("data/index"),
                 "quantized": Path("data/quantized"), "beir": Path("data/beir/debian-test")}


class QueryError(DataError):
    """A query the service refuses (empty, too long, too many): the caller's to fix."""


@dataclass(frozen=True)
class OperatingPoint:
    """What evaluate measured and register published: one model x dim x index (x rescoring) and its settings."""

    model: str
    dim: int
    index: str
    rescored: bool
    ndcg_at_10: float
    top_k: int
    rescore_multiplier: int
    rescore_with: str
    hnsw_ef_search: int
    ivf_nprobe: int

    @classmethod
    def from_record(cls, record: dict[str, Any], source: str) -> OperatingPoint:
        chosen = record.get("chosen")
        if not chosen:
            raise ArtifactError(f"{source}: no operating point was chosen ({record.get('reason', 'no reason given')}); "
                                f"nothing to serve - relax evaluate's budgets and re-run evaluate")
        defaults = EvaluateConfig()
        try:
            return cls(model=chosen["model"], dim=int(chosen["dim"]), index=chosen["index"],
                       rescored=bool(chosen["rescored"]), ndcg_at_10=float(chosen["ndcg_at_10"]),
                       top_k=int(record.get("top_k", defaults.top_k)),
                       rescore_multiplier=int(record["rescore"]["multiplier"]),
                       rescore_with=str(record["rescore"]["with"]),
                       hnsw_ef_search=int(record["hnsw_ef_search"]),
                       ivf_nprobe=int(record.get("ivf_nprobe", defaults.ivf_nprobe)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: not an operating point written by evaluate ({exc!r} missing or "
                                f"malformed); re-run evaluate") from None

    @property
    def name(self) -> str:
        return f"{self.model}/d{self.dim}/{configuration_name(self.index, self.rescored)}"

    def search_config(self) -> EvaluateConfig:
        return EvaluateConfig(top_k=self.top_k, rescore_multiplier=self.rescore_multiplier,
                              rescore_with=self.rescore_with, hnsw_ef_search=self.hnsw_ef_search,
                              ivf_nprobe=self.ivf_nprobe)


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    text: str


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are and what identifies it: the fingerprint the quantize artifact recorded for the
    model it embedded, and, for a registered version, the operating point logged beside it."""

    reference: str
    path: str
    fingerprint: str
    registered_point: dict[str, Any] | None = None
    backend: str = "torch"  # or ONNX_BACKEND: the int8 ONNX export of the model with that fingerprint
    download: Path | None = None  # a registered version's local copy, removed once loaded


class Retriever:
    """Encode, search and (where the operating point says so) rescore; every answer names what produced it."""

    def __init__(self, model: SentenceTransformer, point: OperatingPoint, index: Any, searcher: Searcher,
                 doc_ids: list[str], texts: dict[str, str], version: dict[str, str]) -> None:
        self.model, self.point, self.index = model, point, index
        self._searcher, self.doc_ids, self.texts, self.version = searcher, doc_ids, texts, version

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors at the operating point's dims: what the index holds for a passage."""
        check_texts(texts)
        vectors = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return truncate(np.asarray(vectors, dtype=np.float32), self.point.dim)

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.point.top_k:
            raise QueryError(f"k={k}: ask for 1 to {self.point.top_k} results (the candidates evaluate scored)")

    def search(self, queries: list[str], k: int = 10) -> list[list[Hit]]:
        self.check_k(k)
        return self.search_vectors(self.embed(queries), k)

    def search_vectors(self, floats: np.ndarray, k: int) -> list[list[Hit]]:
        """Search with query vectors from `embed`."""
        scores, positions = self._searcher(floats, binary_codes(floats), min(k, len(self.doc_ids)))
        return [[Hit(self.doc_ids[p], float(s), self.texts[self.doc_ids[p]])
                 for s, p in zip(row_scores, row_positions, strict=True) if p >= 0]
                for row_scores, row_positions in zip(scores, positions, strict=True)]


def check_texts(texts: list[str]) -> None:
    """Refuse what no model should be asked: nothing, empty or whitespace text, text past MAX_QUERY_CHARS, or
    more than MAX_BATCH texts at once."""
    if not texts:
        raise QueryError("no query given: pass at least one non-empty text")
    if len(texts) > MAX_BATCH:
        raise QueryError(f"{len(texts)} texts in one request: at most {MAX_BATCH}; split the batch")
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"text {number} is empty: give some words to search for")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"text {number} has {len(text)} characters: at most {MAX_QUERY_CHARS}; shorten it")


def locate_registered(uri: str) -> ModelSource:
    """A registered version (`models:/<name>@<alias>` or `models:/<name>/<version>`), downloaded: its
    sentence-transformers weights, the student fingerprint register recorded, and its operating point."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.sentence_transformers import SENTENCE_TRANSFORMERS_DATA_PATH
    from mlflow.tracking import MlflowClient

    name, _, alias = uri.removeprefix(REGISTRY_PREFIX).partition("@")
    store = tracking_uri()  # the environment's, not whatever an earlier stage in this process set
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        pinned = f"{REGISTRY_PREFIX}{name}/{version.version}"
        info = mlflow.models.get_model_info(pinned)
        scratch = Path(tempfile.mkdtemp(prefix="embedforge-model-"))
        local = Path(mlflow.artifacts.download_artifacts(pinned, dst_path=str(scratch / "model")))
        point_file = Path(client.download_artifacts(version.run_id, "serving/operating_point.json", str(scratch)))
        backend = (info.metadata or {}).get("serving_backend", "torch")
        if backend == ONNX_BACKEND:  # evaluate measured the int8 export: serve it, beside the torch weights
            client.download_artifacts(version.run_id, "serving/onnx", str(local / SENTENCE_TRANSFORMERS_DATA_PATH))
    except MlflowException as exc:
        raise ArtifactError(f"{uri}: not found in the MLflow registry at {mlflow.get_tracking_uri()} "
                            f"({exc.message}); check the name and alias, or set MLFLOW_TRACKING_URI") from None
    fingerprint = (info.metadata or {}).get("student_fingerprint")
    if not fingerprint:
        raise ArtifactError(f"{uri}: version {version.version} records no student_fingerprint; register it again "
                            f"with `embedforge register`")
    return ModelSource(pinned, str(local / SENTENCE_TRANSFORMERS_DATA_PATH), fingerprint,
                       json.loads(point_file.read_text()), backend=backend, download=scratch)


def locate_model(reference: str) -> ModelSource:
    """A registered version, an ONNX export (identified by the model it was exported from, or by itself where
    distill published the student with it), or a model."""
    from components.embed import resolve_model_path
    from components.export import onnx_record

    if reference.startswith(REGISTRY_PREFIX):
        return locate_registered(reference)
    exported = onnx_record(resolve_model_path(reference))
    if exported is not None:
        fingerprint = exported.get("source_fingerprint") or model_fingerprint(reference)
        return ModelSource(reference, reference, fingerprint, backend=ONNX_BACKEND)
    return ModelSource(reference, reference, model_fingerprint(reference))


def open_retriever(model_reference: str, *, evaluation: Path, index: Path, quantized: Path,
                   beir: Path) -> Retriever:
    """Check that everything belongs together, then load it: the model is the one the quantize artifact
    embedded for the operating point, the index was built from that artifact, and the corpus is the one it
    embedded. Nothing heavy loads before the checks pass."""
    started = time.perf_counter()
    source = locate_model(model_reference)
    try:
        retriever = _checked_retriever(source, evaluation=evaluation, index=index, quantized=quantized, beir=beir)
    finally:
        if source.download is not None:  # loaded into memory, or refused: the local copy is not needed again
            shutil.rmtree(source.download, ignore_errors=True)
    log.info("search: %s, %d passages, operating point %s (nDCG@10 %.4f), ready in %.1fs", source.reference,
             len(retriever.doc_ids), retriever.point.name, retriever.point.ndcg_at_10, time.perf_counter() - started)
    return retriever


def _checked_retriever(source: ModelSource, *, evaluation: Path, index: Path, quantized: Path,
                       beir: Path) -> Retriever:
    from components.embed import load_model
    from components.export import load_onnx

    if source.registered_point is not None:
        point = OperatingPoint.from_record(source.registered_point, f"{source.reference} serving/operating_point.json")
    else:
        point = OperatingPoint.from_record(read_evaluation(evaluation).operating_point, str(evaluation))
    quantized_corpus = read_quantized(quantized)
    indexes = read_indexes(index)
    check_same_corpus(quantized_corpus, indexes, BEIR.read_manifest(beir).fingerprint, beir)
    embedded = quantized_corpus.manifest.inputs.get(f"model:{point.model}")
    if embedded != source.fingerprint:
        raise ArtifactError(f"model {source.reference} (fingerprint {source.fingerprint}) is not the model "
                            f"{point.model!r} that {quantized} embedded ({embedded}) for operating point "
                            f"{point.name}; serve the model that run produced, or re-run quantize, index and "
                            f"evaluate for this one")
    records = [r for r in indexes.records if (r.model, r.dim, r.type) == (point.model, point.dim, point.index)]
    if not records:
        raise ArtifactError(f"{index}: no {point.index} index of {point.model!r} at {point.dim} dims for operating "
                            f"point {point.name}; re-run the index stage with index.types including {point.index}")
    record = records[0]
    model = load_model(source.path, max_seq_length=int(quantized_corpus.models[point.model]["max_seq_length"]),
                       onnx=False)
    if source.backend == ONNX_BACKEND:
        model = load_onnx(Path(source.path), model)
    width = model.get_embedding_dimension()
    if width is None or width < point.dim:
        raise ArtifactError(f"model {source.reference} makes {width}-dim embeddings, operating point {point.name} "
                            f"needs {point.dim}")
    faiss_index = read_index(indexes, record)
    store = rescore_store(quantized_corpus, point.model, point.dim, point.rescore_with) if point.rescored else None
    searcher = make_searcher(faiss_index, record.type, store, point.search_config())
    corpus = read_beir(beir).corpus
    version = {"model": source.reference, "model_fingerprint": source.fingerprint, "model_backend": source.backend,
               "index": indexes.manifest.fingerprint, "operating_point": point.name}
    return Retriever(model, point, faiss_index, searcher, quantized_corpus.doc_ids, corpus, version)


def add_retriever_args(parser: argparse.ArgumentParser) -> None:
    """The flags `search` and `serve` share: which model, and where the run's artifacts are."""
    parser.add_argument("--model", default="models/student",
                        help="model dir, package:<module>, or a registered version: models:/<name>@<alias> "
                             "(its operating point is then the registered one)")
    for name, default in DEFAULT_PATHS.items():
        parser.add_argument(f"--{name}", type=Path, default=default, help=f"{name} artifact")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def retriever_from_args(args: argparse.Namespace) -> Retriever:
    return open_retriever(args.model, evaluation=args.evaluation, index=args.index, quantized=args.quantized,
                          beir=args.beir)


def read_query_lines(stream: Any) -> list[str]:
    """One query per line from a byte stream, refusing text that is not UTF-8 (naming the line)."""
    queries = []
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise QueryError(f"stdin line {number}: not valid UTF-8 (byte {exc.start}); send UTF-8 text") from None
        if line.strip():
            queries.append(line)
    return queries


def print_hits(query: str, hits: list[Hit], as_json: bool, width: int = 160) -> None:
    if as_json:
        print(json.dumps({"query": query, "hits": [asdict(hit) for hit in hits]}, ensure_ascii=False), flush=True)
        return
    print(f"# {query}")
    for rank, hit in enumerate(hits, start=1):
        text = " ".join(hit.text.split())
        print(f"{rank:>3}  {hit.score:.4f}  {hit.doc_id}  {text[:width]}{'...' if len(text) > width else ''}")
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    """CLI: `embedforge search [QUERY ...]` (`-` or no query: one per line on stdin, searched in batches)."""
    from components.cli import configure_logging

    parser = argparse.ArgumentParser(prog="embedforge search", description=__doc__.splitlines()[0])
    parser.add_argument("queries", nargs="*", help="queries; '-' or none reads one per line from stdin")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--json", action="store_true", help="one JSON object per query instead of a table")
    add_retriever_args(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    queries = args.queries if args.queries and args.queries != ["-"] else read_query_lines(sys.stdin.buffer)
    batches = [queries[start:start + MAX_BATCH] for start in range(0, len(queries), MAX_BATCH)] or [[]]
    for batch in batches:  # every query checked before the model loads
        check_texts(batch)
    retriever = retriever_from_args(args)
    for batch in batches:
        for query, hits in zip(batch, retriever.search(batch, args.k), strict=True):
            print_hits(query, hits, args.json)


if __name__ == "__main__":
    from components.cli import guarded

    sys.exit(guarded(main)())
