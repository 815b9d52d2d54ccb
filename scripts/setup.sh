#!/usr/bin/env bash
# Create or update .venv from the lock file; with --tests, also what the tests need besides (Chromium, podman,
# runc, mmdebstrap).
# Idempotent: a venv already built from this lock is left alone.
# torch is installed first, alone, as the CPU build (any looser pin would pull a multi-GB CUDA build). Where the
# default pip index serves the CUDA build of torch==2.13.0, set TORCH_INDEX_URL to a wheel index with the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: embedforge needs Python 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }

# With --tests: what the tests need besides the venv, from Debian's packages (never a browser or image download):
# headless Chromium for the UI tests (tests/e2e/test_ui.py); podman + runc to build and run the images, and
# mmdebstrap to make their base from Debian packages (tests/e2e: containers).
if [[ "${1:-}" == "--tests" ]]; then
  missing=()
  for tool in chromium podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    else
      echo "setup: ${missing[*]} not found; the UI and container tests need them (as root: apt-get install ${missing[*]})" >&2
    fi
  fi
fi

# With --tests: a second venv, .venv-onnx-backend, in which sentence-transformers' ONNX backend installs
# (requirements-onnx-backend.in says why); tests/code/test_export.py loads the pipeline's export there.
if [[ "${1:-}" == "--tests" ]]; then
  backend_stamp="$(sha256sum requirements-onnx-backend.lock | cut -c1-16)"
  if [[ "$(cat .venv-onnx-backend/.embedforge-lock 2>/dev/null)" != "$backend_stamp" ]]; then
    rm -rf .venv-onnx-backend && "$PYTHON" -m venv .venv-onnx-backend
    .venv-onnx-backend/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
    .venv-onnx-backend/bin/python -m pip install --quiet -r requirements-onnx-backend.lock
    echo "$backend_stamp" > .venv-onnx-backend/.embedforge-lock
    echo "setup: .venv-onnx-backend ready"
  fi
fi

stamp="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [[ -x .venv/bin/python && "$(cat .venv/.embedforge-lock 2>/dev/null)" == "$stamp" ]]; then
  echo "setup: .venv is current"
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
.venv/bin/python -m pip install --quiet -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "$stamp" > .venv/.embedforge-lock
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, sentence_transformers as st; print(f"torch {torch.__version__}, sentence-transformers {st.__version__}")'))"
