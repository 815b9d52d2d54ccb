"""What flows between stages: every artifact kind, its schema version, its files, and its typed reader and writer.

Producers and consumers both import this module, never each other (the way `kfp.dsl` declares `Dataset` and
`Model` once for every component). `artifacts` is the plumbing underneath (manifests, atomic publish,
verification); this module says what each kind of artifact holds:

| kind | written by | files |
|---|---|---|
| `curated_pairs` | curate | `pairs.parquet` (id, query, positive, package, source, split), `audit.parquet` |
| `embeddings` | curate | `embeddings.npy` (normalised float32), `ids.parquet` |
| `beir` | curate | `corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv` |
| `mined_pairs` | mine | `pairs.parquet` (id, query, positive, negative_1..n, negative_ids) |
| `sentence_transformer` | train, distill | a sentence-transformers model dir; a student adds `embedforge_matryoshka.json` |
| `quantized_embeddings` | quantize | `doc_ids.json`; per model `float32.npy`, `d<dim>.int8.npy`, `d<dim>.ubinary.npy`, `calibration.json` |
| `faiss_indexes` | index | per model and dim `<type>.faiss` and `<type>.json` (an `IndexRecord`) |
| `evaluation` | evaluate | `grid.json`, `operating_point.json` |
| `prepared_shard` | curate (step `prepare`) | `rows.parquet` (raw columns normalised, split, key), `audit.parquet` |
| `curate_plan` | curate (step `plan`) | `rows.parquet` (+ embed_batch), `audit.parquet`, `embed-<shard>.parquet` |
| `embedded_shard` | curate (step `embed`) | `embeddings.npy`, `ids.parquet` (one shard's batches) |
| `clustered_embeddings` | curate (step `cluster`) | `embeddings.npy`, `ids.parquet` (id order), `centroids.npy`, `probed.npy` |
| `near_duplicates` | curate (step `dedup`) | `pairs.parquet` (a, b row positions, cosine) of one cluster group |

A schema version changes only when a file's layout changes; readers refuse any other version.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components import artifacts, storage
from components.artifacts import ArtifactError, Manifest
from components.data import BeirDataset, write_beir

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@dataclass(frozen=True)
class ArtifactType:
    """One kind of artifact: the manifest's `kind` and `schema_version`, and what it is for."""

    kind: str
    schema_version: int
    description: str

    def read_manifest(self, path: Path, *, verify: bool = True) -> Manifest:
        """The artifact's manifest, after checking kind, schema version and (with `verify`) every file's hash."""
        return artifacts.read_manifest(path, kind=self.kind, schema_version=self.schema_version, verify=verify)

    @contextlib.contextmanager
    def publish(self, target: Path, provenance: Provenance) -> Iterator[tuple[Path, dict[str, Any]]]:
        """`artifacts.publish` for this kind: yields `(tmp_dir, meta)`, swapped into `target` on success."""
        with artifacts.publish(target, kind=self.kind, schema_version=self.schema_version, stage=provenance.stage,
                               params_digest=provenance.params_digest, inputs=provenance.inputs) as published:
            yield published


@dataclass(frozen=True)
class Provenance:
    """Who made an artifact from what: the producing stage, its params digest and its inputs' fingerprints."""

    stage: str
    params_digest: str
    inputs: dict[str, str]


CURATED = ArtifactType("curated_pairs", 1, "validated, normalised, deduplicated pairs with their split; audit")
EMBEDDINGS = ArtifactType("embeddings", 1, "base-model embeddings of the train and dev passages")
BEIR = ArtifactType("beir", 1, "the test split in BEIR format")
MINED = ArtifactType("mined_pairs", 1, "train queries with their positive and mined hard negatives")
MODEL = ArtifactType("sentence_transformer", 1, "a sentence-transformers model directory (safetensors)")
QUANTIZED = ArtifactType("quantized_embeddings", 1, "the test corpus per model and dim: float32, int8, binary")
INDEXES = ArtifactType("faiss_indexes", 1, "faiss indexes per model, dim and index type")
EVALUATION = ArtifactType("evaluation", 1, "every measurement of the grid and the chosen operating point")
# curate's shard steps: what its fanned-out tasks hand each other (components/curate.py)
PREPARED_SHARD = ArtifactType("prepared_shard", 1, "one input shard, validated and normalised, with split and key")
CURATE_PLAN = ArtifactType("curate_plan", 1, "rows after global exact dedup and the cap; embedding batches")
EMBEDDED_SHARD = ArtifactType("embedded_shard", 1, "base-model embeddings of one shard's batches")
CLUSTERED = ArtifactType("clustered_embeddings", 1, "all train+dev embeddings, k-means centroids, probed clusters")
NEAR_DUPLICATES = ArtifactType("near_duplicates", 1, "near-duplicate pairs found in one group of clusters")


# --- curated pairs ---

@dataclass(frozen=True)
class Curated:
    manifest: Manifest
    pairs: pd.DataFrame


def write_curated(target: Path, pairs: pd.DataFrame, audit: pd.DataFrame, provenance: Provenance,
                  splits: tuple[str, ...]) -> None:
    with CURATED.publish(target, provenance) as (tmp, meta):
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
        audit.to_parquet(tmp / "audit.parquet", index=False)
        meta["counts"] = {f"rows_{split}": int((pairs["split"] == split).sum()) for split in splits} | {
            "audit": len(audit)}


def read_curated(path: Path, columns: list[str] | None = None) -> Curated:
    manifest = CURATED.read_manifest(path)
    return Curated(manifest, pd.read_parquet(artifacts.member(path, manifest, "pairs.parquet"), columns=columns))


# --- tables and arrays of curate's shard steps ---

def write_step(kind: ArtifactType, target: Path, provenance: Provenance, *, tables: dict[str, pd.DataFrame],
               arrays: dict[str, np.ndarray] | None = None, counts: dict[str, int] | None = None,
               extra: dict[str, Any] | None = None) -> None:
    """An intermediate artifact of curate's steps: parquet tables and npy arrays, published atomically."""
    with kind.publish(target, provenance) as (tmp, meta):
        for name, frame in tables.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        for name, array in (arrays or {}).items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        meta["counts"] = counts or {}
        meta["extra"] = extra or {}


@dataclass(frozen=True)
class StepArtifact:
    path: Path
    manifest: Manifest

    def table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(artifacts.member(self.path, self.manifest, f"{name}.parquet"), columns=columns)

    def array(self, name: str, *, mmap: bool = False) -> np.ndarray:
        return np.load(artifacts.member(self.path, self.manifest, f"{name}.npy"), allow_pickle=False,
                       mmap_mode="r" if mmap else None)


def read_step(kind: ArtifactType, path: Path) -> StepArtifact:
    return StepArtifact(Path(path), kind.read_manifest(Path(path)))


# --- base-model embeddings ---

@dataclass(frozen=True)
class Embeddings:
    manifest: Manifest
    vectors: np.ndarray
    ids: list[str]


def write_embeddings(target: Path, vectors: np.ndarray, ids: list[str], provenance: Provenance,
                     extra: dict[str, Any]) -> None:
    with EMBEDDINGS.publish(target, provenance) as (tmp, meta):
        np.save(tmp / "embeddings.npy", vectors, allow_pickle=False)
        pd.DataFrame({"id": ids}).to_parquet(tmp / "ids.parquet", index=False)
        meta["counts"] = {"vectors": len(ids), "dim": vectors.shape[1]}
        meta["extra"] = extra


def read_embeddings(path: Path) -> Embeddings:
    """The cached passage embeddings, checked against their manifest's counts."""
    manifest = EMBEDDINGS.read_manifest(path)
    vectors = np.load(artifacts.member(path, manifest, "embeddings.npy"), allow_pickle=False)
    ids = pd.read_parquet(artifacts.member(path, manifest, "ids.parquet"))["id"].tolist()
    if vectors.shape != (manifest.counts["vectors"], manifest.counts["dim"]) or len(ids) != len(vectors):
        raise ArtifactError(
            f"{path}: embeddings shape {vectors.shape} and {len(ids)} ids disagree with the manifest counts "
            f"{manifest.counts}; re-run curate"
        )
    return Embeddings(manifest, vectors, ids)


# --- BEIR test set (read with `components.data.read_beir`, which also takes plain BEIR directories) ---

def write_beir_artifact(target: Path, dataset: BeirDataset, provenance: Provenance) -> None:
    with BEIR.publish(target, provenance) as (tmp, meta):
        write_beir(tmp, dataset)
        meta["counts"] = {"corpus": len(dataset.corpus), "queries": len(dataset.queries),
                          "qrels": sum(len(docs) for docs in dataset.qrels.values())}


# --- mined pairs ---

@dataclass(frozen=True)
class Mined:
    manifest: Manifest
    pairs: pd.DataFrame


def write_mined(target: Path, pairs: pd.DataFrame, provenance: Provenance, negatives_per_query: int,
                extra: dict[str, Any]) -> None:
    with MINED.publish(target, provenance) as (tmp, meta):
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
        meta["counts"] = {"rows": len(pairs), "negatives_per_query": negatives_per_query}
        meta["extra"] = extra


def read_mined(path: Path) -> Mined:
    manifest = MINED.read_manifest(path)
    return Mined(manifest, pd.read_parquet(artifacts.member(path, manifest, "pairs.parquet")))


# --- models ---

MATRYOSHKA_FILE = "embedforge_matryoshka.json"


def write_model(model: SentenceTransformer, target: Path, provenance: Provenance, *, metrics: dict[str, float],
                extra: dict[str, object], matryoshka_dims: list[int] | None = None, card: str | None = None,
                onnx_int8: bool = False) -> None:
    """Save a model in sentence-transformers format (safetensors) as an atomically published artifact; a
    Matryoshka model records its nested dims beside it (what quantize's `dims: null` means); `card` replaces
    the generic README.md model card sentence-transformers writes (components/model_card.py); `onnx_int8` adds
    its checked ONNX export, which every later load then runs (components/export.py)."""
    with MODEL.publish(target, provenance) as (tmp, meta):
        model.save(str(tmp), safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if matryoshka_dims is not None:
            (tmp / MATRYOSHKA_FILE).write_text(json.dumps({"matryoshka_dims": matryoshka_dims}))
        meta["counts"] = {"layers": model[0].auto_model.config.num_hidden_layers,
                          "dim": model.get_embedding_dimension()}
        meta["extra"] = {**extra, "metrics": metrics}
        if onnx_int8:
            from components.export import write_onnx

            meta["extra"]["onnx"] = write_onnx(tmp)


def model_fingerprint(reference: str) -> str:
    """A model artifact's verified content fingerprint, or the reference itself for packaged weights."""
    path = storage.local_dir(reference)
    if (path / artifacts.MANIFEST).is_file():
        return MODEL.read_manifest(path).fingerprint
    return reference


def matryoshka_dims(reference: str) -> list[int] | None:
    """The nested dims a model was distilled for, or None for a model that records none."""
    record = storage.local_dir(reference) / MATRYOSHKA_FILE
    return list(json.loads(record.read_text())["matryoshka_dims"]) if record.is_file() else None


# --- quantized embeddings: the code formats, and the artifact ---

CALIBRATION_FILE = "calibration.json"


def calibration_ranges(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension [min, max] of a calibration sample, shape (2, dim): sentence-transformers' int8 rule."""
    return np.vstack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)


def int8_codes(vectors: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Quantize with fixed ranges: 256 equal buckets per dimension, values outside the range clipped."""
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(vectors, precision="int8", ranges=ranges)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Bucket centres in the float coordinate system: what a float query is scored against when rescoring."""
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    return ((codes.astype(np.float32) + 128.5) * steps + ranges[0]).astype(np.float32)


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 per byte (`ubinary`): the layout faiss binary indexes take."""
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(vectors, precision="ubinary")


def read_calibration(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path}: int8 calibration is missing; re-run quantize")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class QuantizedCorpus:
    """A verified quantize artifact: codes and calibration per model and dim, checked for shape on access."""

    path: Path
    manifest: Manifest
    doc_ids: list[str]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.manifest.extra["models"]

    def dims(self, model: str) -> list[int]:
        return list(self._model(model)["dims"])

    def calibration_path(self, model: str) -> Path:
        return artifacts.member(self.path, self.manifest, f"{model}/{CALIBRATION_FILE}")

    def _model(self, model: str) -> dict[str, Any]:
        if model not in self.models:
            raise ArtifactError(f"{self.path}: no embeddings of model {model!r} (has {', '.join(self.models)}); "
                                f"add it to quantize.models and re-run quantize")
        return self.models[model]

    def _check_dim(self, model: str, dim: int) -> None:
        if dim not in self.dims(model):
            raise ArtifactError(f"{self.path}: model {model!r} was quantized at dims {self.dims(model)}, not {dim}; "
                                f"add {dim} to quantize.dims and re-run quantize")

    def _load(self, model: str, name: str, shape: tuple[int, int]) -> np.ndarray:
        array = np.load(artifacts.member(self.path, self.manifest, f"{model}/{name}"), allow_pickle=False)
        if array.shape != shape:
            raise ArtifactError(f"{self.path / model / name}: shape {array.shape}, expected {shape} "
                                f"({len(self.doc_ids)} documents); re-run quantize")
        return array

    def float32(self, model: str, dim: int) -> np.ndarray:
        from components.embed import truncate

        self._check_dim(model, dim)
        full = self._load(model, "float32.npy", (len(self.doc_ids), int(self._model(model)["dim"])))
        return truncate(full, dim)

    def int8(self, model: str, dim: int) -> np.ndarray:
        self._check_dim(model, dim)
        return self._load(model, f"d{dim}.int8.npy", (len(self.doc_ids), dim))

    def ubinary(self, model: str, dim: int) -> np.ndarray:
        self._check_dim(model, dim)
        return self._load(model, f"d{dim}.ubinary.npy", (len(self.doc_ids), dim // 8))

    def ranges(self, model: str, dim: int) -> np.ndarray:
        self._check_dim(model, dim)
        record = read_calibration(self.calibration_path(model))
        if str(dim) not in record["dims"]:
            raise ArtifactError(f"{self.path / model / CALIBRATION_FILE}: no int8 ranges for dim {dim}; re-run quantize")
        ranges = np.array([record["dims"][str(dim)]["min"], record["dims"][str(dim)]["max"]], dtype=np.float32)
        if ranges.shape != (2, dim):
            raise ArtifactError(f"{self.path / model / CALIBRATION_FILE}: ranges for dim {dim} have shape "
                                f"{ranges.shape}, expected (2, {dim}); re-run quantize")
        return ranges


def write_quantized_model(folder: Path, vectors: np.ndarray, codes: dict[int, tuple[np.ndarray, np.ndarray]],
                          calibration: dict[str, Any]) -> None:
    """One model's files inside a quantize artifact being published: float32 vectors, then per dim its int8
    and packed-binary codes (`codes[dim] = (int8, ubinary)`), and the calibration record."""
    folder.mkdir()
    np.save(folder / "float32.npy", vectors, allow_pickle=False)
    for dim, (int8, ubinary) in codes.items():
        np.save(folder / f"d{dim}.int8.npy", int8, allow_pickle=False)
        np.save(folder / f"d{dim}.ubinary.npy", ubinary, allow_pickle=False)
    (folder / CALIBRATION_FILE).write_text(json.dumps(calibration))


class InMemoryCorpus:
    """A quantize artifact's codes for passages it never held, computed from their vectors (any width >= the
    dims asked) and given int8 ranges per dim, so that the index builders and rescoring run on them unchanged:
    out-of-domain sets at the operating point, benchmarks at sizes no artifact has."""

    def __init__(self, vectors: np.ndarray, ranges: dict[int, np.ndarray]) -> None:
        self._vectors, self._ranges = vectors, ranges

    def float32(self, model: str, dim: int) -> np.ndarray:
        from components.embed import truncate

        return truncate(self._vectors, dim)

    def int8(self, model: str, dim: int) -> np.ndarray:
        return int8_codes(self.float32(model, dim), self.ranges(model, dim))

    def ubinary(self, model: str, dim: int) -> np.ndarray:
        return binary_codes(self.float32(model, dim))

    def ranges(self, model: str, dim: int) -> np.ndarray:
        return self._ranges[dim]


CodedCorpus = QuantizedCorpus | InMemoryCorpus  # what index builders and rescoring read codes from


def read_quantized(path: Path) -> QuantizedCorpus:
    """Open a quantize artifact after checking its kind, schema and content fingerprint."""
    manifest = QUANTIZED.read_manifest(path)
    doc_ids = json.loads(artifacts.member(path, manifest, "doc_ids.json").read_text())
    return QuantizedCorpus(path=Path(path), manifest=manifest, doc_ids=doc_ids)


# --- faiss indexes ---

PRECISION_OF: dict[str, str] = {"float_flat": "float32", "float_hnsw": "float32", "int8_flat": "int8",
                                "binary_flat": "binary", "binary_hnsw": "binary", "binary_ivf": "binary"}


@dataclass(frozen=True)
class IndexRecord:
    """What one index holds and costs: the per-index manifest."""

    model: str
    dim: int
    type: str
    precision: str
    vectors: int
    vector_bytes: int  # bytes of vector codes alone (exact: ntotal x code size)
    file_bytes: int  # bytes on disk, graph and header included; faiss holds the same arrays in memory
    build_seconds: float
    file: str

    @property
    def bytes_per_vector(self) -> float:
        return self.file_bytes / self.vectors if self.vectors else 0.0


@dataclass(frozen=True)
class IndexSet:
    path: Path
    manifest: Manifest
    records: list[IndexRecord]


def write_index(index: Any, path: Path) -> None:
    import faiss

    (faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else faiss.write_index)(index, str(path))


def write_index_record(record: IndexRecord, root: Path) -> None:
    """The per-index manifest beside its faiss file inside an index artifact being published."""
    path = root / PurePosixPath(record.file).with_suffix(".json")
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")


def read_indexes(path: Path) -> IndexSet:
    """Open an index artifact after verifying it; the per-index manifests say what each file holds."""
    manifest = INDEXES.read_manifest(path)
    records = []
    for file in manifest.extra["indexes"]:
        record_path = artifacts.member(path, manifest, PurePosixPath(file).with_suffix(".json").as_posix())
        records.append(IndexRecord(**json.loads(record_path.read_text())))
    return IndexSet(path=Path(path), manifest=manifest, records=records)


def int8_index(quantized: CodedCorpus, model: str, dim: int) -> Any:
    """An 8-bit scalar-quantizer index whose ranges are the calibration ranges, holding the stored int8 codes.

    Bucket centres are added: faiss re-encodes each to the very same code (tested), so no second rounding.
    """
    import faiss

    ranges = quantized.ranges(model, dim)
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.concatenate([ranges[0], ranges[1] - ranges[0]]).astype(np.float32),
                               index.sq.trained)
    index.is_trained = True
    index.add(dequantize_int8(quantized.int8(model, dim), ranges))
    return index


def binary_ivf_index(codes: np.ndarray, dim: int) -> Any:
    """Inverted lists over packed bits: a binary k-means coarse quantizer trained on the codes themselves."""
    import faiss

    from components.faiss_device import IVF_TRAINING_ROWS_PER_LIST, ivf_lists

    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, ivf_lists(len(codes)))
    index.cp.seed = 42
    index.cp.max_points_per_centroid = IVF_TRAINING_ROWS_PER_LIST
    index.train(codes)
    index.add(codes)
    return index


def build_index(kind: str, quantized: CodedCorpus, model: str, dim: int, *, hnsw_m: int,
                hnsw_ef_construction: int) -> Any:
    """A faiss index of `kind` (`PRECISION_OF`'s keys) over one model's codes at `dim`: the index stage builds
    every one it is asked for; evaluate builds the operating point's for out-of-domain sets."""
    import faiss

    if kind == "binary_ivf":
        return binary_ivf_index(quantized.ubinary(model, dim), dim)
    builders: dict[str, Callable[[], Any]] = {
        "float_flat": lambda: faiss.IndexFlatIP(dim),
        "float_hnsw": lambda: faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT),
        "binary_flat": lambda: faiss.IndexBinaryFlat(dim),
        "binary_hnsw": lambda: faiss.IndexBinaryHNSW(dim, hnsw_m),
    }
    if kind == "int8_flat":
        return int8_index(quantized, model, dim)
    index = builders[kind]()
    if kind.endswith("hnsw"):
        index.hnsw.efConstruction = hnsw_ef_construction
    index.add(quantized.ubinary(model, dim) if kind.startswith("binary") else quantized.float32(model, dim))
    return index


def read_index(index_set: IndexSet, record: IndexRecord) -> Any:
    """Load one index file of a verified index artifact (faiss's own format: nothing is unpickled)."""
    import faiss

    path = artifacts.member(index_set.path, index_set.manifest, record.file)
    return faiss.read_index_binary(str(path)) if record.precision == "binary" else faiss.read_index(str(path))


# --- evaluation ---

@dataclass(frozen=True)
class Evaluation:
    manifest: Manifest
    operating_point: dict[str, Any]
    operating_point_path: Path


def write_evaluation(target: Path, grid: list[dict[str, Any]], operating_point: dict[str, Any],
                     provenance: Provenance) -> None:
    with EVALUATION.publish(target, provenance) as (tmp, meta):
        (tmp / "grid.json").write_text(json.dumps(grid, indent=1) + "\n")
        (tmp / "operating_point.json").write_text(json.dumps(operating_point, indent=2) + "\n")
        meta["counts"] = {"rows": len(grid)}


def read_evaluation(path: Path) -> Evaluation:
    manifest = EVALUATION.read_manifest(path)
    point_path = artifacts.member(path, manifest, "operating_point.json")
    return Evaluation(manifest, json.loads(point_path.read_text()), point_path)
