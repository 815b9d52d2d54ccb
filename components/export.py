"""export: a sentence-transformers model as ONNX with int8 weights, for CPU serving with ONNX Runtime.

    embedforge export --model models/teacher --output exports/teacher-onnx

(The default profile's student needs none: distill's `onnx_int8` publishes it with this export.)

The output is the model directory itself (tokenizer, pooling, Dense and Normalize modules, safetensors) plus
`onnx/model.onnx` (the transformer, float32, exported by `torch.onnx`) and `onnx/model_qint8.onnx` (the same
with ONNX Runtime's BERT fusions and int8 weights, per output channel, activations quantized on the fly by
ONNX Runtime's dynamic quantization, one text at a time so that no text's embedding depends on its batch,
a batch's texts side by side on the cores), published as a model
artifact whose manifest names the model it was exported from. The `onnx/` layout is sentence-transformers'
ONNX backend's (`backend="onnx"`), and `modules.json` names the modules by the paths every
sentence-transformers release reads (`portable_module_names`): that backend needs optimum-onnx, whose only
release requires transformers < 4.58, which only sentence-transformers 5 runs on (release 6 needs
transformers >= 5). The export loads there (tests/code/test_export.py, in the environment
`requirements-onnx-backend.lock` pins).
This project, on transformers 5, runs the file with its own loader: `load_onnx` keeps the
sentence-transformers pipeline (tokenisation, truncation, pooling, Dense, Normalize) and swaps only the
transformer's forward pass for an ONNX Runtime session. `embed.load_model` does that for any exported
directory, so every stage, `embedforge evaluate --model`, search and serve take one.

distill writes the same `onnx/` into the student it publishes when `onnx_int8` is set (`write_onnx`): then the
pipeline's own student is the int8 model, and quantize, evaluate, register, search and serve all measure and
serve what will be deployed.

Why int8: one query's forward pass reads every weight once, so on a CPU it is bound by memory bandwidth; int8
weights are a quarter of the bytes (the 3-layer student: 21 MB -> 5 MB of transformer weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from components.artifact_types import MODEL, Provenance, model_fingerprint
from components.artifacts import MANIFEST, ArtifactError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

ONNX_BACKEND = "onnx-qint8"  # how search and the registry name a model served by its int8 export
ONNX_FILES = {"float32": "onnx/model.onnx", "qint8": "onnx/model_qint8.onnx"}
OPSET = 17
CHECK_TEXTS = ["how do I mount an NFS share at boot", "compress files with xz", "a library for HTTP requests",
               "detached debugging symbols for the GNU C library", "checkers board game for two players"]
MIN_CHECK_COSINE = 0.98  # int8 weights move a unit vector by ~0.004 on these texts; far more means a broken export


class OnnxTransformer(torch.nn.Module):
    """Stands in for the Hugging Face model inside sentence-transformers' Transformer module: the same inputs,
    the last hidden state computed by ONNX Runtime; the model's config stays (the module reads it).

    Each text runs alone, unpadded: dynamic quantization scales activations by the range of the whole input
    tensor, so in a batch the other texts and the padding would move a text's embedding (cosine 0.991 for a
    query encoded beside a long passage vs alone, measured on the default student). Alone, a text's embedding
    depends on the text only, and is what a single query gets at serve time. A batch's texts run side by side,
    one per core (`per_text`, a session on one thread each): a text of ~70 tokens is too small a job to split
    over cores, which then mostly wait on each other. A batch of one (a served query) runs on every core
    (`single`).
    """

    def __init__(self, single: Any, per_text: Any, workers: int, config: Any) -> None:
        super().__init__()
        self.single, self.per_text, self.workers, self.config = single, per_text, workers, config
        self.inputs = [item.name for item in single.get_inputs()]

    def forward(self, **features: Any) -> dict[str, torch.Tensor]:
        feeds = {name: features[name].cpu().numpy().astype(np.int64) for name in self.inputs}
        lengths = features["attention_mask"].sum(dim=1).tolist()
        texts = [{name: values[row:row + 1, :length] for name, values in feeds.items()}
                 for row, length in enumerate(lengths)]
        if len(texts) == 1:
            outputs = [self.single.run(["last_hidden_state"], texts[0])[0]]
        else:
            with ThreadPoolExecutor(self.workers) as pool:  # ONNX Runtime releases the GIL while it runs
                outputs = list(pool.map(lambda text: self.per_text.run(["last_hidden_state"], text)[0], texts))
        hidden = np.zeros((*feeds["input_ids"].shape, self.config.hidden_size), dtype=np.float32)
        for row, (length, output) in enumerate(zip(lengths, outputs, strict=True)):
            hidden[row, :length] = output[0]  # padding stays zero; pooling masks it out
        return {"last_hidden_state": torch.from_numpy(hidden)}


def onnx_record(path: Path) -> dict[str, Any] | None:
    """What `export` recorded in a model artifact's manifest, or None for a plain model directory."""
    if not (path / MANIFEST).is_file():
        return None
    return MODEL.read_manifest(path, verify=False).extra.get("onnx")


def load_onnx(path: Path, model: SentenceTransformer, variant: Literal["float32", "qint8"] = "qint8",
              threads: int | None = None) -> SentenceTransformer:
    """`model` (loaded from the exported directory) with its transformer run by ONNX Runtime from `variant`, on
    the CPU: the whole model moves there, so that tokenised inputs, ONNX outputs and pooling meet on one device.
    `threads` (default: torch's thread count) is how many cores a batch's texts, or a single text, run on."""
    import onnxruntime

    workers = threads or torch.get_num_threads()

    def session(intra_op_threads: int) -> Any:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        return onnxruntime.InferenceSession(str(path / ONNX_FILES[variant]), options,
                                            providers=["CPUExecutionProvider"])

    model = model.to("cpu")
    config = model[0].model.config
    model[0].model = OnnxTransformer(session(workers), session(1), workers, config)  # torch weights released
    return model


def _export_transformer(model: SentenceTransformer, target: Path) -> None:
    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, names: list[str]) -> None:
            super().__init__()
            self.inner, self.names = inner, names

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(self.names, tensors, strict=True))).last_hidden_state

    sample = model.tokenizer(CHECK_TEXTS[:2], padding=True, return_tensors="pt")
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
    encoder = model[0].auto_model.float().eval()
    encoder.set_attn_implementation("eager")  # SDPA exports a graph ONNX Runtime's attention fusion does not match
    wrapper = LastHiddenState(encoder, names)
    with torch.inference_mode():
        torch.onnx.export(wrapper, tuple(sample[name] for name in names), str(target), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)  # the TorchScript exporter: no onnxscript dependency


def fuse_for_cpu(source: Path, target: Path, model: SentenceTransformer) -> dict[str, int]:
    """Write `source` with ONNX Runtime's BERT fusions (one Attention op a layer, its Q, K and V projections one
    matrix; SkipLayerNormalization; BiasGelu) to `target`, and return how many of each it made. Quantized after
    fusion, a layer quantizes its input once for Q, K and V and runs attention as one kernel (its inner products
    in float32 again): a text alone on 2 AVX2 cores encodes 1.2x as fast (the 5-layer student, 106 against 89
    passages/s; side by side, one text a core, both reach 131). The fusions do not match an already quantized
    graph. Python-level fusions only (opt_level 0): the file stays portable across CPUs."""
    from onnxruntime.transformers.optimizer import optimize_model

    config = model[0].auto_model.config
    optimized = optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=0)
    optimized.save_model_to_file(str(target))
    return {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}


def portable_module_names(directory: Path) -> None:
    """Rewrite `directory`'s modules.json to name each built-in module by its `sentence_transformers.models.X`
    path, which releases 2 to 5 import and release 6 maps to its own classes (release 6 saves
    `sentence_transformers.base.modules.dense.Dense`, which release 5 cannot import). Other modules stay."""
    from sentence_transformers.util import import_from_string

    modules_file = directory / "modules.json"
    modules = json.loads(modules_file.read_text())
    for module in modules:
        legacy = f"sentence_transformers.models.{module['type'].rsplit('.', 1)[-1]}"
        with warnings.catch_warnings():  # release 6 warns that the old path is deprecated; it still loads it
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                same = import_from_string(legacy) is import_from_string(module["type"])
            except ImportError:
                same = False
        if same:
            module["type"] = legacy
    modules_file.write_text(json.dumps(modules, indent=2))


def write_onnx(directory: Path) -> dict[str, Any]:
    """Add `onnx/` (float32 and int8 weights) to `directory`, a sentence-transformers model being published,
    with portable module names, after checking that both encode like it; returns the record a manifest keeps
    under `extra["onnx"]`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from components.embed import load_model

    # traced on the CPU, where ONNX Runtime will run it (on a GPU machine the model would load on CUDA and the
    # traced inputs would not)
    portable_module_names(directory)
    model = load_model(str(directory), device="cpu", onnx=False)
    expected = model.encode(CHECK_TEXTS, normalize_embeddings=True)
    (directory / "onnx").mkdir()
    _export_transformer(model, directory / ONNX_FILES["float32"])
    fused_file = directory / "onnx" / "fused.onnx"  # float32 with the fusions: quantized, then deleted
    fused = fuse_for_cpu(directory / ONNX_FILES["float32"], fused_file, model)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # ONNX Runtime's quantizer logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(fused_file), str(directory / ONNX_FILES["qint8"]),
                         weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops' outputs
    finally:
        root.setLevel(level)
        fused_file.unlink()
    cosines = {}
    for variant in ONNX_FILES:
        exported = load_onnx(directory, load_model(str(directory), device="cpu", onnx=False), variant)
        got = exported.encode(CHECK_TEXTS, normalize_embeddings=True)
        cosines[variant] = float((got * expected).sum(axis=1).min())
        if cosines[variant] < MIN_CHECK_COSINE:
            raise ArtifactError(f"the {variant} ONNX export encodes unlike the model (cosine {cosines[variant]:.4f} "
                                f"< {MIN_CHECK_COSINE}); nothing was published")
    return {"files": ONNX_FILES, "opset": OPSET, "dim": int(expected.shape[1]),
            "bytes": {variant: (directory / file).stat().st_size for variant, file in ONNX_FILES.items()},
            "min_cosine_to_source": cosines,
            "fused_operators": fused,
            "quantization": "fused (ONNX Runtime's BERT optimizer), then dynamic: int8 weights per output channel, "
                            "activations quantized at run time per text"}


def check_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An ONNX record's checks as flat metrics: each variant's cosine to the torch model and its size."""
    metrics = {f"{variant}/min_cosine": value for variant, value in record["min_cosine_to_source"].items()}
    return metrics | {f"{variant}/megabytes": size / 1e6 for variant, size in record["bytes"].items()}


def export_onnx(reference: str, output: Path) -> dict[str, float]:
    """Export `reference` (a model directory or artifact) and publish it with its int8 variant, after checking
    both encode like the original."""
    from components.embed import resolve_model_path

    started = time.perf_counter()
    source = resolve_model_path(reference)
    if (record := onnx_record(source)) is not None:
        raise ArtifactError(f"{reference}: already an ONNX export; export the model it came from" if "source" in record
                            else f"{reference}: already carries its int8 ONNX export (onnx/, distill's onnx_int8); "
                                 "search, serve and every stage run it as it is")
    source_fingerprint = model_fingerprint(reference)  # verifies every file of a model artifact: once
    provenance = Provenance("export", "onnx", {"model": source_fingerprint})
    with MODEL.publish(output, provenance) as (tmp, meta):
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        try:
            record = write_onnx(tmp)
        except ArtifactError as exc:
            raise ArtifactError(f"{reference}: {exc}") from None
        meta["counts"] = (MODEL.read_manifest(source, verify=False).counts if (source / MANIFEST).is_file()
                          else {"dim": record["dim"]})
        meta["extra"] = {"onnx": {"source": reference, "source_fingerprint": source_fingerprint, **record}}
    return check_metrics(record) | {"seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    """CLI: `embedforge export --model DIR --output DIR`."""
    from components.cli import configure_logging

    parser = argparse.ArgumentParser(prog="embedforge export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory or artifact to export")
    parser.add_argument("--output", type=Path, required=True, help="exported model dir")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    metrics = export_onnx(args.model, args.output)
    print(json.dumps(metrics, indent=1), flush=True)


if __name__ == "__main__":
    from components.cli import guarded

    sys.exit(guarded(main)())
