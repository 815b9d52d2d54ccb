"""evaluate: trec metrics on hand-computed toy runs, exact search, the grid over real indexes, the operating point
and Pareto front, the quick mode and the CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from components import artifacts
from components.cli import main as cli_main
from components.data import BeirDataset, DataError, write_beir
from components.embed import truncate
from components.evaluate import (
    EvaluateConfig,
    GridRow,
    Int8Rows,
    choose_operating_point,
    configuration_name,
    evaluate_grid,
    evaluate_models,
    exact_search,
    for_query_sets,
    out_of_domain_sets,
    pareto_front,
    rescore,
    retrieval_metrics,
)
from components.stages import STAGES
from tests.helpers import run_python

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
def test_quick_mode_scores_every_model_at_every_dim_it_has(self_retrieval_beir: Path, tiny_model_dir: Path) -> None:
    metrics = evaluate_models({"tiny": str(tiny_model_dir)}, self_retrieval_beir, EvaluateConfig(top_k=10),
                              dims=[384, 32, 16])
    quality = {f"tiny/d{dim}/{name}" for dim in (32, 16) for name in ("ndcg@10", "mrr@10", "recall@100")}
    assert set(metrics) == quality | {"tiny/encode_docs_per_s"}
    assert metrics["tiny/d32/ndcg@10"] == pytest.approx(1.0)  # exact-text queries find their passage first


def test_the_metrics_file_keeps_the_headline_and_leaves_the_grid_to_the_artifact_and_mlflow() -> None:
    metrics = {"operating_point/ndcg@10": 0.8, "student/ndcg@10": 0.8, "student/ood_ndcg@10": 0.5,
               "student/encode_docs_per_s": 90.0, "queries": 100, "seconds": 3.0,
               "student/d64/int8_flat/ndcg@10": 0.7, "ood/mean/student/d64/ndcg@10": 0.4,
               "ood/foldoc/student/d384/ndcg@10": 0.5, "student/layers": 3, "quick/d64/ndcg@10": 0.6}
    kept = STAGES["evaluate"].headline_metrics(metrics)
    assert set(kept) == {"operating_point/ndcg@10", "student/ndcg@10", "student/ood_ndcg@10",
                         "student/encode_docs_per_s", "queries", "seconds", "quick/d64/ndcg@10"}
    assert STAGES["train"].headline_metrics(metrics) == metrics  # no headline: every metric


def row(model: str = "student", dim: int = 32, index: str = "float_flat", ndcg: float = 0.5, bytes_: float = 128,
        p99: float = 1.0, rescored: bool = False) -> GridRow:
    return GridRow(model=model, dim=dim, index=index, precision="float32", rescored=rescored, ndcg_at_10=ndcg,
                   mrr_at_10=ndcg, recall_at_100=1.0, p50_ms=p99 / 2, p99_ms=p99, bytes_per_vector=bytes_, build_s=0.1)


def test_pareto_front_keeps_only_rows_nothing_beats_on_both_bytes_and_quality() -> None:
    cheap, mid, dominated, rich = row(ndcg=0.6, bytes_=4), row(ndcg=0.7, bytes_=16), row(ndcg=0.65, bytes_=32), \
        row(ndcg=0.8, bytes_=128)
    assert pareto_front([rich, dominated, mid, cheap]) == [cheap, mid, rich]


def test_operating_point_is_the_best_served_row_within_the_budgets() -> None:
    rows = [row(ndcg=0.9, bytes_=1536), row(ndcg=0.85, bytes_=48, index="binary_flat", rescored=True),
            row(ndcg=0.8, bytes_=48, index="binary_flat"), row(ndcg=0.86, bytes_=64, p99=50),
            row(model="teacher", ndcg=0.95, bytes_=48)]
    chosen, reason = choose_operating_point(rows, EvaluateConfig(max_bytes_per_vector=64, max_p99_ms=10))
    assert chosen == rows[1] and "2 of 4" in reason
    chosen, reason = choose_operating_point(rows, EvaluateConfig(max_bytes_per_vector=1))
    assert chosen is None and "no configuration of 'student' meets the budget" in reason


@pytest.mark.slow
def test_the_grid_scores_every_index_and_rescored_binary_of_every_dim(retrieval_stack: dict[str, Path]) -> None:
    config = EvaluateConfig(top_k=10, latency_queries=10, max_bytes_per_vector=None, max_p99_ms=None)
    result = evaluate_grid(config, retrieval_stack["beir"], retrieval_stack["quantized"], retrieval_stack["index"])
    configs = {"float_flat", "float_hnsw", "int8_flat", "binary_flat", "binary_hnsw", "binary_flat_rescore",
               "binary_hnsw_rescore"}
    assert {(r.dim, r.config) for r in result.grid} == {(dim, c) for dim in (32, 16, 8) for c in configs}
    for grid_row in result.grid:
        assert 0.0 <= grid_row.ndcg_at_10 <= 1.0 and 0 < grid_row.p50_ms <= grid_row.p99_ms
        assert result.metrics[f"{grid_row.key}/ndcg@10"] == grid_row.ndcg_at_10
    by_key = {r.key: r for r in result.grid}
    assert by_key["student/d32/float_hnsw"].ndcg_at_10 == pytest.approx(by_key["student/d32/float_flat"].ndcg_at_10)
    assert by_key["student/d32/binary_flat"].bytes_per_vector < by_key["student/d32/float_flat"].bytes_per_vector / 8
    assert result.chosen == max(result.grid, key=lambda r: (r.ndcg_at_10, -r.bytes_per_vector, -r.p99_ms))
    assert result.pareto[-1].ndcg_at_10 == max(r.ndcg_at_10 for r in result.grid)
    assert result.metrics["operating_point/ndcg@10"] == result.chosen.ndcg_at_10
    assert (result.metrics["queries"], result.metrics["documents"]) == (48, 96)


def test_a_modified_beir_dir_is_refused_before_any_model_is_loaded(retrieval_stack: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    import shutil

    beir = tmp_path / "beir"
    shutil.copytree(retrieval_stack["beir"], beir)
    (beir / "queries.jsonl").write_text('{"_id": "q0", "text": "tampered"}\n')
    with pytest.raises(artifacts.ArtifactError, match=r"content does not match its manifest.*queries\.jsonl"):
        evaluate_grid(EvaluateConfig(), beir, retrieval_stack["quantized"], retrieval_stack["index"])


def test_an_index_built_from_another_quantize_artifact_is_refused(retrieval_stack: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "quantized"
    shutil.copytree(retrieval_stack["quantized"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "doc_ids.json").write_text(json.dumps(list(reversed(json.loads((other / "doc_ids.json").read_text())))))
    from components.artifacts import _content_hashes, _fingerprint

    manifest["files"] = _content_hashes(other)
    manifest["fingerprint"] = _fingerprint(manifest["files"])
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(artifacts.ArtifactError, match=r"built from another quantize artifact.*re-run the index stage"):
        evaluate_grid(EvaluateConfig(), retrieval_stack["beir"], other, retrieval_stack["index"])


def test_truncated_embeddings_are_renormalised_prefixes() -> None:
    vectors = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]], dtype=np.float32)
    cut = truncate(vectors, 2)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0)
    assert np.allclose(cut[0], [0.6, 0.8]) and np.allclose(cut[1], [0.0, 1.0])


def test_a_query_set_rescores_against_rows_decoded_once_exactly_as_against_each_candidate_decoded() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, size=(50, 16), dtype=np.int8)
    ranges = np.stack([np.full(16, -0.5, dtype=np.float32), np.full(16, 0.5, dtype=np.float32)])
    rows, config = Int8Rows(codes, ranges), EvaluateConfig(top_k=10, rescore_multiplier=4)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    candidates = rng.integers(-1, 50, size=(8, 40))
    decoded = for_query_sets(rows, config)
    assert isinstance(decoded, np.ndarray)
    for got, expected in zip(rescore(queries, candidates, decoded, 10), rescore(queries, candidates, rows, 10),
                             strict=True):
        assert np.array_equal(got, expected)


def test_a_corpus_larger_than_one_chunk_of_candidates_stays_decoded_per_candidate() -> None:
    config = EvaluateConfig(top_k=10, rescore_multiplier=1)  # a chunk of 256 queries gathers 2,560 candidates
    rows = Int8Rows(np.zeros((2561, 8), dtype=np.int8), np.zeros((2, 8), dtype=np.float32))
    assert for_query_sets(rows, config) is rows


# --- CLI ---

def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_python(["-m", "components.evaluate", *args], cwd=cwd, env=offline)


def test_quick_mode_prints_its_scores_and_leaves_the_pipelines_metrics_file_alone(self_retrieval_beir: Path,
                                                                                  tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    pipeline_metrics = tmp_path / "metrics" / "evaluate.json"
    pipeline_metrics.parent.mkdir()
    pipeline_metrics.write_text('{"operating_point/ndcg@10": 0.8}')
    done = _run_cli(["--model", f"tiny={tiny_model_dir}", "--beir", str(self_retrieval_beir), "--no-tracking"],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tiny/d32/ndcg@10"] == pytest.approx(1.0)
    assert pipeline_metrics.read_text() == '{"operating_point/ndcg@10": 0.8}'


@pytest.mark.slow
def test_cli_writes_metrics_report_plots_and_the_evaluation_artifact(tmp_path: Path,
                                                                      retrieval_stack: dict[str, Path]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {top_k: 10, latency_queries: 10, max_bytes_per_vector: 8}\n")
    out = tmp_path / "results"
    ood = tmp_path / "ood"
    shutil.copytree(retrieval_stack["beir"], ood / "elsewhere")  # stands in for an out-of-domain set
    done = _run_cli(["--params", str(params), "--beir", str(retrieval_stack["beir"]), "--quantized",
                     str(retrieval_stack["quantized"]), "--index", str(retrieval_stack["index"]), "--output",
                     str(out / "evaluation"), "--no-tracking", "--metrics", str(out / "m.json"), "--report",
                     str(out / "report" / "evaluation.md"), "--plots", str(out / "plots"), "--ood", str(ood)],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["operating_point/bytes_per_vector"] <= 8
    point = json.loads((out / "evaluation" / "operating_point.json").read_text())
    assert point["chosen"]["ndcg_at_10"] == metrics["operating_point/ndcg@10"]
    assert artifacts.read_manifest(out / "evaluation", kind="evaluation", schema_version=1).counts["rows"] == 21
    report = (out / "report" / "evaluation.md").read_text()
    assert "## Operating point" in report and "## Whole grid" in report and "![ndcg_vs_bytes](ndcg_vs_bytes.png)" in report
    assert (out / "report" / "ndcg_vs_bytes.png").stat().st_size > 0
    assert (out / "plots" / "ndcg_vs_dim_by_precision.csv").read_text().startswith(
        "dim,float_flat,int8_flat,binary_flat,binary_flat_rescore\n8,")
    assert "operating point: student/d" in done.stdout
    assert not (tmp_path / "mlflow.db").exists()  # --no-tracking
    scores = point["out_of_domain"]["scores"]
    assert scores["student"]["elsewhere"] == scores["student"]["mean"] == metrics["student/ood_ndcg@10"]
    grid = json.loads((out / "evaluation" / "grid.json").read_text())
    exact = next(row for row in grid if (row["model"], row["dim"], row["index"]) == ("student", 32, "float_flat"))
    assert metrics["student/ndcg@10"] == exact["ndcg_at_10"]
    assert not [key for key in metrics if key.startswith("ood/") or "_flat" in key]  # the grid stays in the artifact
    assert "## Out of domain" in report and "| student |" in report.split("## Out of domain")[1]
    # the out-of-domain set is a copy of the test set: the served configuration scores it as it scored the test
    # set, up to the float noise of encoding the passages in other batches
    at_point = point["out_of_domain"]["operating_point"]
    assert at_point["elsewhere"] == at_point["mean"] == metrics["operating_point/ood_ndcg@10"]
    assert at_point["mean"] == pytest.approx(point["chosen"]["ndcg_at_10"], abs=0.01)
    served = f"student/d{point['chosen']['dim']}/{configuration_name(point['chosen']['index'], point['chosen']['rescored'])}"
    assert f"| student at the operating point ({served}) |" in report


def test_cli_on_a_bad_beir_dir_exits_2_with_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    beir = tmp_path / "beir"
    write_beir(beir, BeirDataset(corpus={"d1": TEXTS[0]}, queries={"q1": "mail"}, qrels={"q1": {"d1": 1}}))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td404\t1\n")
    done = _run_cli(["--model", "tiny=/nonexistent", "--beir", str(beir), "--no-tracking",
                     "--metrics", str(tmp_path / "m.json")], cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert f"{beir / 'qrels' / 'test.tsv'}:2: corpus id 'd404' is not in corpus.jsonl" in errors[0]
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(("argv", "code"), [(["nope"], 2), ([], 2), (["--help"], 0)])
def test_embedforge_dispatcher_refuses_unknown_stages(argv: list[str], code: int, capsys) -> None:
    assert cli_main(argv) == code
    usage = f"usage: embedforge {{{','.join(STAGES)},search,serve,export}}"  # the stages in order, then tools
    assert usage in capsys.readouterr().err


def test_an_out_of_domain_set_is_cut_to_its_first_queries_their_passages_and_as_many_others(tmp_path: Path) -> None:
    corpus = {f"d{index}": f"passage {index}" for index in range(10)}
    dataset = BeirDataset(corpus=corpus, queries={f"q{index}": f"query {index}" for index in range(5)},
                          qrels={f"q{index}": {f"d{9 - index}": 1} for index in range(5)})
    write_beir(tmp_path / "sets" / "one", dataset)
    (cut,) = out_of_domain_sets(tmp_path / "sets", max_queries=2).values()
    assert list(cut.queries) == ["q0", "q1"] and cut.qrels == {"q0": {"d9": 1}, "q1": {"d8": 1}}
    assert set(cut.corpus) == {"d9", "d8", "d0", "d1"}


def test_a_missing_or_empty_out_of_domain_folder_is_an_error_saying_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder of out-of-domain sets"):
        out_of_domain_sets(tmp_path / "nowhere", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BEIR set inside"):
        out_of_domain_sets(tmp_path / "empty", None)
