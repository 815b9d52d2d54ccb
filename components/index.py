"""index: faiss indexes of the test corpus for every model x dim x index type, each with its own manifest.

Index types (precision in brackets):

- `float_flat` (float32): exact inner product, the reference;
- `float_hnsw` (float32): HNSW graph over the float vectors;
- `int8_flat` (int8): faiss 8-bit scalar quantizer holding exactly the quantize stage's calibrated int8 codes;
  a float query is scored against the decoded vectors (asymmetric, no query quantization error);
- `binary_flat` (binary): exact Hamming search over packed sign bits, 1/32 of the float bytes;
- `binary_hnsw` (binary): HNSW graph over the packed bits.

Indexes are faiss files (`faiss.read_index` / `read_index_binary`: no pickle). The evaluate stage searches them;
binary search is rescored there against the int8 (or float) vectors of the quantize artifact.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from pydantic import Field

from components import artifacts
from components.config import StageConfig, params_digest
from components.quantize import QUANTIZED_KIND, QUANTIZED_SCHEMA, QuantizedCorpus, dequantize_int8, load_quantized

log = logging.getLogger(__name__)

STAGE = "index"
INDEX_KIND = "faiss_indexes"
INDEX_SCHEMA = 1
IndexType = Literal["float_flat", "float_hnsw", "int8_flat", "binary_flat", "binary_hnsw"]
PRECISION_OF: dict[str, str] = {"float_flat": "float32", "float_hnsw": "float32", "int8_flat": "int8",
                                "binary_flat": "binary", "binary_hnsw": "binary"}


class IndexConfig(StageConfig):
    types: list[IndexType] = Field(default_factory=lambda: list(PRECISION_OF), min_length=1)
    models: list[str] | None = None  # None: every model in the quantize artifact
    hnsw_m: int = Field(32, ge=4, le=128)  # graph neighbours per node
    hnsw_ef_construction: int = Field(128, ge=8)  # candidate list while building: recall vs build time


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


def int8_index(quantized: QuantizedCorpus, model: str, dim: int) -> Any:
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


def build_index(kind: str, quantized: QuantizedCorpus, model: str, dim: int, config: IndexConfig) -> Any:
    import faiss

    builders: dict[str, Callable[[], Any]] = {
        "float_flat": lambda: faiss.IndexFlatIP(dim),
        "float_hnsw": lambda: faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT),
        "binary_flat": lambda: faiss.IndexBinaryFlat(dim),
        "binary_hnsw": lambda: faiss.IndexBinaryHNSW(dim, config.hnsw_m),
    }
    if kind == "int8_flat":
        return int8_index(quantized, model, dim)
    index = builders[kind]()
    if kind.endswith("hnsw"):
        index.hnsw.efConstruction = config.hnsw_ef_construction
    index.add(quantized.ubinary(model, dim) if kind.startswith("binary") else quantized.float32(model, dim))
    return index


def code_bytes(index: Any) -> int:
    """Bytes of one stored vector code (an HNSW index keeps its vectors in a flat storage index)."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return int(faiss.downcast_index(index.storage).code_size)
    return int(index.code_size)


def write_index(index: Any, path: Path) -> None:
    import faiss

    (faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else faiss.write_index)(index, str(path))


def build_indexes(config: IndexConfig, quantized_path: Path, output: Path) -> dict[str, float]:
    """Build every configured index and publish them with one manifest each plus the artifact manifest."""
    started = time.perf_counter()
    quantized = load_quantized(quantized_path)
    models = config.models or list(quantized.models)
    for model in models:
        quantized.dims(model)  # refuses an unknown model before any work
    records: list[IndexRecord] = []
    with artifacts.publish(output, kind=INDEX_KIND, schema_version=INDEX_SCHEMA, stage=STAGE,
                           params_digest=params_digest(config),
                           inputs={"quantized": quantized.manifest.fingerprint}) as (tmp, meta):
        for model in models:
            for dim in quantized.dims(model):
                folder = tmp / model / f"d{dim}"
                folder.mkdir(parents=True)
                for kind in config.types:
                    built = time.perf_counter()
                    index = build_index(kind, quantized, model, dim, config)
                    seconds = time.perf_counter() - built
                    write_index(index, folder / f"{kind}.faiss")
                    record = IndexRecord(
                        model=model, dim=dim, type=kind, precision=PRECISION_OF[kind], vectors=int(index.ntotal),
                        vector_bytes=int(index.ntotal) * code_bytes(index),
                        file_bytes=(folder / f"{kind}.faiss").stat().st_size, build_seconds=seconds,
                        file=f"{model}/d{dim}/{kind}.faiss")
                    (folder / f"{kind}.json").write_text(json.dumps(record.__dict__, indent=2) + "\n")
                    records.append(record)
            log.info("index: %s, %d indexes", model, len(quantized.dims(model)) * len(config.types))
        meta["counts"] = {"indexes": len(records), "vectors": len(quantized.doc_ids)}
        meta["extra"] = {"indexes": [record.file for record in records],
                         "hnsw": {"m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction}}
    metrics: dict[str, float] = {"indexes": len(records), "seconds": time.perf_counter() - started}
    for record in records:
        key = f"{record.model}/d{record.dim}/{record.type}"
        metrics[f"{key}/build_s"] = record.build_seconds
        metrics[f"{key}/bytes_per_vector"] = record.bytes_per_vector
    return metrics


@dataclass(frozen=True)
class IndexSet:
    path: Path
    manifest: artifacts.Manifest
    records: list[IndexRecord]


def load_indexes(path: Path) -> IndexSet:
    """Open an index artifact after verifying it; the per-index manifests say what each file holds."""
    manifest = artifacts.read_manifest(path, kind=INDEX_KIND, schema_version=INDEX_SCHEMA)
    records = []
    for file in manifest.extra["indexes"]:
        record_path = artifacts.member(path, manifest, PurePosixPath(file).with_suffix(".json").as_posix())
        record = IndexRecord(**json.loads(record_path.read_text()))
        records.append(record)
    return IndexSet(path=Path(path), manifest=manifest, records=records)


def read_index(index_set: IndexSet, record: IndexRecord) -> Any:
    """Load one index file of a verified index artifact (faiss's own format: nothing is unpickled)."""
    import faiss

    path = artifacts.member(index_set.path, index_set.manifest, record.file)
    return faiss.read_index_binary(str(path)) if record.precision == "binary" else faiss.read_index(str(path))


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.index` / `embedforge index`."""
    from components.cli import (
        StageOutcome,
        artifact_in,
        artifact_out,
        local_path,
        parse_stage_args,
        run_stage,
        stage_parser,
    )

    parser = stage_parser(STAGE, __doc__.splitlines()[0])
    parser.add_argument("--quantized", type=artifact_in(QUANTIZED_KIND, QUANTIZED_SCHEMA),
                        default="data/quantized", help="quantize artifact")
    parser.add_argument("--output", type=artifact_out, default="data/index", help="index artifact")
    parser.add_argument("--metrics", type=local_path, default=Path("metrics/index.json"), help="metrics JSON for DVC")
    args, config = parse_stage_args(parser, argv, IndexConfig, STAGE)

    def work() -> StageOutcome:
        metrics = build_indexes(config, args.quantized, args.output)
        fingerprint = artifacts.read_manifest(args.quantized, kind=QUANTIZED_KIND, schema_version=QUANTIZED_SCHEMA,
                                              verify=False).fingerprint
        return StageOutcome(metrics=metrics, data_fingerprint=fingerprint)

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
