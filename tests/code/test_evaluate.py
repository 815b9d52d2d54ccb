"""evaluate: trec metrics on hand-computed toy runs, exact search, the stage with a tiny model, and its CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components import artifacts
from components.cli import main as cli_main
from components.data import BeirDataset, write_beir
from components.evaluate import EvaluateConfig, evaluate, exact_search, retrieval_metrics, truncate

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}}


@pytest.mark.parametrize(
    ("qrels", "run", "expected"),
    [
        pytest.param(QRELS, {"q1": {"d1": 0.9, "d2": 0.1}, "q2": {"d2": 0.8, "d1": 0.3}},
                     {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@100": 1.0}, id="perfect-ranking"),
        pytest.param(QRELS, {"q1": {"d1": 0.9, "d2": 0.1}, "q2": {"d1": 0.9, "d2": 0.5, "d3": 0.1}},
                     {"ndcg@10": (1 + 1 / math.log2(3)) / 2, "mrr@10": (1 + 0.5) / 2, "recall@100": 1.0},
                     id="relevant-at-rank-2"),
        pytest.param(QRELS, {"q1": {"d1": 0.9, "d2": 0.1}},
                     {"ndcg@10": 0.5, "mrr@10": 0.5, "recall@100": 0.5}, id="query-missing-from-run"),
        pytest.param({"q1": {"d10": 1}}, {"q1": {f"d{rank}": 1.0 - rank / 100 for rank in range(11)}},
                     {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 1.0}, id="relevant-at-rank-11"),
        pytest.param({"q1": {"d1": 1, "d3": 1}}, {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7}},
                     {"ndcg@10": (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), "mrr@10": 1.0, "recall@100": 1.0},
                     id="two-relevant-at-ranks-1-and-3"),
        pytest.param({"q1": {"d1": 1, "d2": 1}}, {"q1": {"d1": 0.9, "d3": 0.8}},
                     {"ndcg@10": 1 / (1 + 1 / math.log2(3)), "mrr@10": 1.0, "recall@100": 0.5},
                     id="half-of-the-relevant-retrieved"),
    ],
)
def test_retrieval_metrics_match_hand_computed_values(qrels: dict, run: dict, expected: dict) -> None:
    assert retrieval_metrics(qrels, run) == pytest.approx(expected, abs=1e-4)


def test_exact_search_returns_the_exact_top_k_by_inner_product() -> None:
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 16)).astype(np.float32)
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    doc_ids, query_ids = [f"d{i}" for i in range(50)], [f"q{i}" for i in range(4)]
    run = exact_search(docs, queries, doc_ids, query_ids, top_k=7)
    scores = queries @ docs.T
    assert list(run) == query_ids
    for row, query_id in enumerate(query_ids):
        best = np.argsort(-scores[row])[:7]
        assert list(run[query_id]) == [doc_ids[i] for i in best]
        assert list(run[query_id].values()) == pytest.approx(scores[row, best].tolist(), rel=1e-5)


def test_exact_search_with_top_k_above_the_corpus_size_returns_every_document() -> None:
    docs = np.eye(3, dtype=np.float32)
    run = exact_search(docs, docs[:1], ["a", "b", "c"], ["q"], top_k=100)
    assert set(run["q"]) == {"a", "b", "c"}
    assert next(iter(run["q"].items())) == ("a", 1.0)


TEXTS = [
    "Exim is a mail transfer agent for Unix systems.",
    "Vim is a highly configurable text editor.",
    "PostgreSQL is an object-relational database system.",
    "GCC is the GNU compiler collection for C and C++.",
    "Nginx is a small, powerful HTTP and reverse proxy server.",
    "FFmpeg converts and streams audio and video.",
    "The Linux kernel image and its modules.",
    "CUPS is the common Unix printing system.",
]


@pytest.fixture
def self_retrieval_beir(tmp_path: Path) -> Path:
    """Each query is the exact text of its one relevant passage: any encoder retrieves it first."""
    dataset = BeirDataset(
        corpus={f"d{i}": text for i, text in enumerate(TEXTS)},
        queries={f"q{i}": text for i, text in enumerate(TEXTS[:5])},
        qrels={f"q{i}": {f"d{i}": 1} for i in range(5)},
    )
    target = tmp_path / "beir"
    with artifacts.publish(target, kind="beir", schema_version=1, stage="curate", params_digest="x") as (tmp, meta):
        write_beir(tmp, dataset)
    return target


@pytest.mark.slow
def test_evaluate_scores_every_model_with_namespaced_metrics(self_retrieval_beir: Path, tiny_model_dir: Path) -> None:
    config = EvaluateConfig(models={"tiny": str(tiny_model_dir)}, batch_size=4, max_seq_length=64, top_k=10,
                            dims=[384, 32, 16])
    result = evaluate(config, self_retrieval_beir)
    quality = {f"tiny/d{dim}/{name}" for dim in (32, 16) for name in ("ndcg@10", "mrr@10", "recall@100")}
    assert set(result.metrics) == quality | {"tiny/encode_docs_per_s", "tiny/encode_queries_per_s", "tiny/dim",
                                             "tiny/layers", "queries", "documents", "seconds"}
    for key in quality:
        assert 0.0 <= result.metrics[key] <= 1.0
    assert result.metrics["tiny/d32/ndcg@10"] == pytest.approx(1.0)  # exact-text queries find their passage first
    assert (result.metrics["queries"], result.metrics["documents"], result.metrics["tiny/dim"]) == (5, 8, 32)
    assert result.data_fingerprint == artifacts.read_manifest(self_retrieval_beir, kind="beir",
                                                              schema_version=1).fingerprint
    assert "| tiny | 2 | 32 | 1.0000 | 1.0000 | 1.0000 |" in result.table
    assert "| tiny | 2 | 16 |" in result.table


def test_evaluate_refuses_a_modified_managed_beir_dir_before_loading_any_model(self_retrieval_beir: Path) -> None:
    (self_retrieval_beir / "queries.jsonl").write_text('{"_id": "q0", "text": "tampered"}\n')
    with pytest.raises(artifacts.ArtifactError, match=r"content does not match its manifest.*queries\.jsonl"):
        evaluate(EvaluateConfig(models={"never": "/nonexistent/model"}), self_retrieval_beir)


def test_truncated_embeddings_are_renormalised_prefixes() -> None:
    vectors = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]], dtype=np.float32)
    cut = truncate(vectors, 2)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0)
    assert np.allclose(cut[0], [0.6, 0.8]) and np.allclose(cut[1], [0.0, 1.0])


# --- CLI ---

def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "components.evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_evaluates_a_model_dir_and_writes_metrics_report_and_plot(
    tmp_path: Path, self_retrieval_beir: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "results"
    done = _run_cli(["--model", f"tiny={tiny_model_dir}", "--beir", str(self_retrieval_beir), "--no-tracking",
                     "--metrics", str(out / "m.json"), "--report", str(out / "r.md"), "--plot", str(out / "p.csv")],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["tiny/d32/ndcg@10"] == pytest.approx(1.0)
    assert (out / "r.md").read_text().startswith(f"# Evaluation on `{self_retrieval_beir}`")
    assert (out / "p.csv").read_text() == "dim,tiny\n32,1.0000\n"
    assert "| tiny | 2 | 32 |" in done.stdout
    assert not (tmp_path / "mlflow.db").exists()  # --no-tracking


def test_cli_on_a_bad_beir_dir_exits_2_with_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    beir = tmp_path / "beir"
    write_beir(beir, BeirDataset(corpus={"d1": TEXTS[0]}, queries={"q1": "mail"}, qrels={"q1": {"d1": 1}}))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td404\t1\n")
    done = _run_cli(["--model", "tiny=/nonexistent", "--beir", str(beir), "--no-tracking",
                     "--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.md"),
                     "--plot", str(tmp_path / "p.csv")], cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert f"{beir / 'qrels' / 'test.tsv'}:2: corpus id 'd404' is not in corpus.jsonl" in errors[0]
    assert not any((tmp_path / name).exists() for name in ("m.json", "r.md", "p.csv"))


@pytest.mark.parametrize(("argv", "code"), [(["nope"], 2), ([], 2), (["--help"], 0)])
def test_embedforge_dispatcher_refuses_unknown_stages(argv: list[str], code: int, capsys) -> None:
    assert cli_main(argv) == code
    assert "usage: embedforge {curate,mine,train,distill,evaluate}" in capsys.readouterr().err
