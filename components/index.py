"""index: faiss indexes of the test corpus for every model x dim x index type, each with its own manifest.

Index types (precision in brackets):

- `float_flat` (float32): exact inner product, the reference;
- `float_hnsw` (float32): HNSW graph over the float vectors;
- `int8_flat` (int8): faiss 8-bit scalar quantizer holding exactly the quantize stage's calibrated int8 codes;
  a float query is scored against the decoded vectors (asymmetric, no query quantization error);
- `binary_flat` (binary): exact Hamming search over packed sign bits, 1/32 of the float bytes;
- `binary_hnsw` (binary): HNSW graph over the packed bits;
- `binary_ivf` (binary): inverted lists of packed bits (Hamming k-means coarse quantizer, ~2 sqrt(n) lists):
  the index that keeps to 1/32 of the float bytes plus an 8-byte id at 1M vectors, where the HNSW graph's links
  alone cost more than the codes (bench/scale.py). Not built by default (the test corpus is small).

Indexes are faiss files (`faiss.read_index` / `read_index_binary`: no pickle). The evaluate stage searches them;
binary search is rescored there against the int8 (or float) vectors of the quantize artifact.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.artifact_types import (
    INDEXES,
    PRECISION_OF,
    QUANTIZED,
    IndexRecord,
    Provenance,
    build_index,
    read_quantized,
    write_index,
    write_index_record,
)
from components.config import StageConfig, params_digest

log = logging.getLogger(__name__)

STAGE = "index"
IndexType = Literal["float_flat", "float_hnsw", "int8_flat", "binary_flat", "binary_hnsw", "binary_ivf"]


class IndexConfig(StageConfig):
    """The `index` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    types: list[IndexType] = Field(
        default_factory=lambda: ["float_flat", "float_hnsw", "int8_flat", "binary_flat", "binary_hnsw"],
        min_length=1,
        description="faiss index types built per model x dim: float_flat | float_hnsw | int8_flat | "
                    "binary_flat | binary_hnsw | binary_ivf.")
    models: list[str] | None = Field(
        None, description="Models to index; null = every model quantize embedded.")
    hnsw_m: int = Field(
        32, ge=4, le=128, description="HNSW neighbours per node (graph bytes per vector grow with it).")
    hnsw_ef_construction: int = Field(
        128, ge=8, description="HNSW build-time candidate list: recall vs build time.")


def code_bytes(index: Any) -> int:
    """Bytes of one stored vector: its code (an HNSW index keeps its vectors in a flat storage index), plus the
    8-byte id an inverted list stores beside each code."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return int(faiss.downcast_index(index.storage).code_size)
    return int(index.code_size) + (8 if isinstance(index, faiss.IndexBinaryIVF | faiss.IndexIVF) else 0)


def build_indexes(config: IndexConfig, quantized_path: Path, output: Path) -> dict[str, float]:
    """Build every configured index and publish them with one manifest each plus the artifact manifest."""
    started = time.perf_counter()
    quantized = read_quantized(quantized_path)
    models = config.models or list(quantized.models)
    for model in models:
        quantized.dims(model)  # refuses an unknown model before any work
    records: list[IndexRecord] = []
    provenance = Provenance(STAGE, params_digest(config), {"quantized": quantized.manifest.fingerprint})
    with INDEXES.publish(output, provenance) as (tmp, meta):
        for model in models:
            for dim in quantized.dims(model):
                folder = tmp / model / f"d{dim}"
                folder.mkdir(parents=True)
                for kind in config.types:
                    built = time.perf_counter()
                    index = build_index(kind, quantized, model, dim, hnsw_m=config.hnsw_m,
                                        hnsw_ef_construction=config.hnsw_ef_construction)
                    seconds = time.perf_counter() - built
                    write_index(index, folder / f"{kind}.faiss")
                    record = IndexRecord(
                        model=model, dim=dim, type=kind, precision=PRECISION_OF[kind], vectors=int(index.ntotal),
                        vector_bytes=int(index.ntotal) * code_bytes(index),
                        file_bytes=(folder / f"{kind}.faiss").stat().st_size, build_seconds=seconds,
                        file=f"{model}/d{dim}/{kind}.faiss")
                    write_index_record(record, tmp)
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


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.index` / `embedforge index`."""
    from components.cli import (
        StageOutcome,
        parse_stage_args,
        run_stage,
        stage_parser,
    )

    parser = stage_parser(STAGE, IndexConfig)
    args, config = parse_stage_args(parser, argv, IndexConfig, STAGE)

    def work() -> StageOutcome:
        metrics = build_indexes(config, args.quantized, args.output)
        fingerprint = QUANTIZED.read_manifest(args.quantized, verify=False).fingerprint
        return StageOutcome(metrics=metrics, data_fingerprint=fingerprint)

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
