"""Fixtures for the behavioural model tests: the smoke run's teacher and student (and the base model they came
from), loaded by the project's own loader, and the held-out retrieval set they are checked on (see
tests/model/retrieval.py), encoded once per model and session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.model.retrieval import (
    BASE_MODEL,
    BATCH_SIZE,
    MATRYOSHKA_FILE,
    Encoded,
    RetrievalSet,
    build_retrieval_set,
)


@pytest.fixture(scope="session")
def smoke_run(dvc_smoke_artifacts: Path) -> Path:
    """The smoke run's models and data, as `dvc repro` left them (see tests/conftest.py)."""
    return dvc_smoke_artifacts


@pytest.fixture(scope="session")
def retrieval_set(smoke_run: Path) -> RetrievalSet:
    return build_retrieval_set(smoke_run)


@pytest.fixture(scope="session")
def load(smoke_run: Path) -> Callable[[str], object]:
    """`load(name)`: "base", "teacher" or "student", loaded once with components.embed.load_model."""
    from components.embed import load_model

    loaded: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in loaded:
            loaded[name] = load_model(BASE_MODEL if name == "base" else str(smoke_run / "models" / name))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def embed(load: Callable[[str], object]) -> Callable[[str, list[str]], np.ndarray]:
    """`embed(name, texts)`: unit-length float32 embeddings from components.embed.encode."""
    from components.embed import encode

    def run(name: str, texts: list[str]) -> np.ndarray:
        return encode(load(name), list(texts), batch_size=BATCH_SIZE, label=f"{name} test texts").vectors

    return run


@pytest.fixture(scope="session")
def encoded(embed: Callable[[str, list[str]], np.ndarray],
            retrieval_set: RetrievalSet) -> Callable[[str], Encoded]:
    """`encoded(name)`: the retrieval set's queries and passages embedded by that model (once a session)."""
    cache: dict[str, Encoded] = {}

    def get(name: str) -> Encoded:
        if name not in cache:
            cache[name] = Encoded(queries=embed(name, retrieval_set.queries),
                                  passages=embed(name, retrieval_set.passages))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def matryoshka_dims(smoke_run: Path) -> list[int]:
    """The prefix sizes the student was trained for, as distill recorded them next to its weights."""
    return json.loads((smoke_run / "models/student" / MATRYOSHKA_FILE).read_text())["matryoshka_dims"]
