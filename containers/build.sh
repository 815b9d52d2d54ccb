#!/usr/bin/env bash
# Build embedforge's images from containers/ with podman (or docker): the CPU image always, the CUDA image with --cuda.
#
#   bash containers/build.sh [--cuda] [--base IMAGE]
#
# Base image: --base IMAGE (e.g. python:3.11-slim-bookworm where a registry is reachable); by default
# embedforge-base:bookworm, made here from Debian packages (mmdebstrap: python3, python3-venv, ca-certificates) when
# the engine does not have it yet, so no registry is needed.
# torch for the CPU image: TORCH_INDEX_URL (a wheel index serving torch==2.13.0+cpu) if set; otherwise the CPU wheel
# that pip finds locally without an index (its configured find-links), served to the build as a one-file index.
# With podman, CONTAINERS_CONF defaults to containers/containers.conf (cgroupfs, runc, ulimits, host network).
# Prints each image's size and build time. Exit status: 0 built, 1 a build failed, 2 a missing tool or input.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "containers/build.sh: $*" >&2; exit "${2:-1}"; }
usage_error() { fail "$1" 2; }

CUDA=0
BASE_IMAGE="embedforge-base:bookworm"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) CUDA=1 ;;
    --base) [[ $# -ge 2 ]] || usage_error "--base needs an image name"; BASE_IMAGE="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) usage_error "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

if command -v podman >/dev/null; then
  ENGINE=podman
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/containers/containers.conf}"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  ENGINE=docker
else
  usage_error "neither podman nor a running Docker engine found: install podman and runc (Debian: apt-get install podman runc), or start Docker"
fi

VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# The base: made from Debian packages when it is the default and missing; any other base must exist or be pullable.
if ! image_exists "$BASE_IMAGE"; then
  if [[ "$BASE_IMAGE" == "embedforge-base:bookworm" ]]; then
    command -v mmdebstrap >/dev/null \
      || usage_error "the base image embedforge-base:bookworm is missing and mmdebstrap is not installed (Debian: apt-get install mmdebstrap), or pass --base python:3.11-slim-bookworm"
    echo "containers/build.sh: building the base image from Debian bookworm packages (mmdebstrap)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/base.tar" \
      || fail "mmdebstrap could not build the Debian base (is a Debian mirror reachable?)"
    "$ENGINE" import --change 'CMD ["python3"]' "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$WORK/base.tar"
  else
    "$ENGINE" pull "$BASE_IMAGE" \
      || fail "base image $BASE_IMAGE is not in the local store and could not be pulled; build the default base (no --base) or load it first"
  fi
fi

# Build-time mounts (podman only; docker build has no -v): this machine's CA bundle for pip behind a TLS proxy,
# and the local torch wheel index.
MOUNTS=()
if [[ "$ENGINE" == podman && -f "$CA_BUNDLE" ]]; then
  MOUNTS+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi

serve_local_torch_wheel() {  # sets TORCH_INDEX_URL (and its mount) unless it is set already
  [[ -z "${TORCH_INDEX_URL:-}" ]] || return 0
  [[ "$ENGINE" == podman ]] || usage_error "set TORCH_INDEX_URL to a wheel index serving torch==2.13.0+cpu (docker build cannot mount a local one)"
  local index="$WORK/torch-index"
  mkdir -p "$index/torch"
  python3 -m pip download --quiet --no-deps --no-index --dest "$index/torch" torch==2.13.0 >/dev/null 2>&1 \
    || usage_error "no local torch==2.13.0 wheel found by pip (find-links) and TORCH_INDEX_URL is not set: set it to a wheel index serving torch==2.13.0+cpu"
  local wheel
  wheel="$(basename "$(ls "$index"/torch/torch-2.13.0*.whl)")"
  [[ "$wheel" == *+cpu-* ]] || usage_error "the local torch wheel $wheel is not the CPU build: set TORCH_INDEX_URL to a wheel index serving torch==2.13.0+cpu"
  printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' "$wheel" "$wheel" > "$index/torch/index.html"
  MOUNTS+=(-v "$index:/torch-index:ro")
  TORCH_INDEX_URL="file:///torch-index"
}

build() {  # build <kind> <extra build args...>
  local kind="$1"; shift
  local tag="embedforge-$kind:$VERSION" started=$SECONDS
  local network=()
  [[ "$ENGINE" == podman ]] && network=(--network host)
  echo "containers/build.sh: building $tag on $BASE_IMAGE with $ENGINE"
  "$ENGINE" build "${network[@]}" "${MOUNTS[@]}" -f "containers/Dockerfile.$kind" \
      --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VERSION="$VERSION" --build-arg GIT_COMMIT="$GIT_COMMIT" \
      "$@" -t "$tag" . \
    || fail "building $tag failed (see the build log above). If pip could not reach a package index: check the network, a proxy's CA bundle (CA_BUNDLE=$CA_BUNDLE) and pip's index settings"
  local size
  size="$("$ENGINE" image inspect --format '{{.Size}}' "$tag")"
  echo "containers/build.sh: built $tag: $((size / 1000000)) MB in $((SECONDS - started)) s"
}

serve_local_torch_wheel
build cpu --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL"
if [[ "$CUDA" == 1 ]]; then
  build cuda
fi
