"""search and serve: the run's model and index answer queries exactly as evaluate scored them, and refuse what
does not belong together or is not a query."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components import artifacts
from components.artifact_types import INDEXES
from components.artifacts import ArtifactError
from components.evaluate import EvaluateConfig, evaluate_grid, publish_evaluation, retrieval_metrics
from components.search import MAX_BATCH, MAX_QUERY_CHARS, QueryError, Retriever, open_retriever
from tests.conftest import build_retrieval_stack
from tests.helpers import run_python
from tests.servers import running_serve


def with_evaluation(stack: dict[str, Path], root: Path) -> dict[str, Path]:
    """A retrieval stack plus a real evaluation artifact whose operating point is a rescored binary index."""
    config = EvaluateConfig(latency_queries=10, max_bytes_per_vector=3.0)  # binary at 16 dims: 2 bytes
    result = evaluate_grid(config, stack["beir"], stack["quantized"], stack["index"])
    evaluation = root / "evaluation"
    publish_evaluation(result, config, evaluation, inputs={
        "beir": result.data_fingerprint, "index": INDEXES.read_manifest(stack["index"]).fingerprint})
    return {**stack, "evaluation": evaluation}


@pytest.fixture(scope="module")
def served(retrieval_stack: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return with_evaluation(retrieval_stack, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def served_onnx_student(onnx_student_dir: Path, training_inputs: tuple[Path, Path],
                        tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole stack for a student distill published with its int8 ONNX export."""
    root = tmp_path_factory.mktemp("served-onnx")
    return with_evaluation(build_retrieval_stack(root, training_inputs[0], onnx_student_dir), root)


def _open(stack: dict[str, Path], model: str | None = None) -> Retriever:
    return open_retriever(model or str(stack["student"]), evaluation=stack["evaluation"], index=stack["index"],
                          quantized=stack["quantized"], beir=stack["beir"])


def _cli_args(stack: dict[str, Path]) -> list[str]:
    return ["--model", str(stack["student"]), "--evaluation", str(stack["evaluation"]), "--index",
            str(stack["index"]), "--quantized", str(stack["quantized"]), "--beir", str(stack["beir"])]


def test_searching_every_test_query_scores_the_operating_points_ndcg(served: dict[str, Path]) -> None:
    """Same model, dims, index and rescoring candidates as evaluate: the registered quality is what users get."""
    from components.data import read_beir

    retriever = _open(served)
    point = json.loads((served["evaluation"] / "operating_point.json").read_text())["chosen"]
    assert (point["precision"], point["rescored"]) == ("binary", True)
    assert _searched_ndcg(retriever, served["beir"]) == pytest.approx(point["ndcg_at_10"], abs=1e-9)
    dataset = read_beir(served["beir"])
    hits = retriever.search([next(iter(dataset.queries.values()))], k=10)[0]
    assert all(hit.text == dataset.corpus[hit.doc_id] for hit in hits)
    assert retriever.version["operating_point"] == f"student/d{point['dim']}/binary_flat_rescore"


def test_a_model_other_than_the_one_the_index_embedded_is_refused_naming_both(served: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(served["student"], other)
    with pytest.raises(ArtifactError, match=r"other-model.*is not the model 'student'.*embedded"):
        _open(served, str(other))


def test_an_operating_point_whose_index_was_not_built_is_refused(served: dict[str, Path], tmp_path: Path) -> None:
    record = json.loads((served["evaluation"] / "operating_point.json").read_text())
    record["chosen"]["index"] = "binary_ivf"
    evaluation = tmp_path / "evaluation"
    with artifacts.publish(evaluation, kind="evaluation", schema_version=1, stage="evaluate", params_digest="t",
                           inputs={}) as (tmp, _):
        (tmp / "operating_point.json").write_text(json.dumps(record))
        (tmp / "grid.json").write_text("[]")
    with pytest.raises(ArtifactError, match=r"no binary_ivf index of 'student' at \d+ dims"):
        _open({**served, "evaluation": evaluation})


def test_an_onnx_export_of_the_student_is_served_as_that_student(served: dict[str, Path], tmp_path: Path) -> None:
    from components.export import export_onnx

    export_onnx(str(served["student"]), tmp_path / "student-onnx")
    retriever = _open(served, str(tmp_path / "student-onnx"))
    assert retriever.version["model_backend"] == "onnx-qint8"
    assert retriever.version["model_fingerprint"] == _open(served).version["model_fingerprint"]
    assert len(retriever.search(["install a package"], k=5)[0]) == 5


def _searched_ndcg(retriever: Retriever, beir: Path) -> float:
    from components.data import read_beir

    dataset = read_beir(beir)
    query_ids = list(dataset.qrels)
    results = retriever.search([dataset.queries[i] for i in query_ids], k=10)
    run = {query: {hit.doc_id: hit.score for hit in hits} for query, hits in zip(query_ids, results, strict=True)}
    return retrieval_metrics(dataset.qrels, run)["ndcg@10"]


def test_a_student_published_with_its_int8_export_is_searched_with_it_at_the_evaluated_ndcg(
        served_onnx_student: dict[str, Path]) -> None:
    """quantize and evaluate encoded the student with its int8 export: search does too, and scores the same."""
    from components.artifact_types import model_fingerprint

    retriever = _open(served_onnx_student)
    assert retriever.version["model_backend"] == "onnx-qint8"
    assert retriever.version["model_fingerprint"] == model_fingerprint(str(served_onnx_student["student"]))
    point = json.loads((served_onnx_student["evaluation"] / "operating_point.json").read_text())["chosen"]
    assert _searched_ndcg(retriever, served_onnx_student["beir"]) == pytest.approx(point["ndcg_at_10"], abs=1e-9)


@pytest.mark.slow
def test_a_registered_student_with_its_int8_export_is_searched_with_it_from_the_registry(
        served_onnx_student: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("register: {model_name: onnx-student, min_ndcg_at_10: 0.0, "
                                          "max_ood_drop: null}\n")
    env = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    registered = run_python(["-m", "components.register", "--student", str(served_onnx_student["student"]),
                             "--quantized", str(served_onnx_student["quantized"]), "--evaluation",
                             str(served_onnx_student["evaluation"]), "--metrics", str(tmp_path / "register.json")],
                            cwd=tmp_path, env=env, timeout=600)
    assert registered.returncode == 0, registered.stderr
    assert json.loads((tmp_path / "register.json").read_text())["gate/promoted"] == 1.0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    retriever = _open(served_onnx_student, "models:/onnx-student@champion")
    assert retriever.version["model_backend"] == "onnx-qint8"
    point = json.loads((served_onnx_student["evaluation"] / "operating_point.json").read_text())["chosen"]
    assert _searched_ndcg(retriever, served_onnx_student["beir"]) == pytest.approx(point["ndcg_at_10"], abs=1e-9)


@pytest.mark.parametrize(("queries", "message"), [
    ([], "no query given"),
    (["  "], "text 1 is empty"),
    (["fine", "x" * (MAX_QUERY_CHARS + 1)], f"text 2 has {MAX_QUERY_CHARS + 1} characters"),
    (["q"] * (MAX_BATCH + 1), f"{MAX_BATCH + 1} texts in one request"),
])
def test_queries_that_are_not_searchable_are_refused(served: dict[str, Path], queries: list[str],
                                                     message: str) -> None:
    with pytest.raises(QueryError, match=message):
        _open(served).search(queries)


def test_the_cli_answers_queries_from_arguments_and_stdin_and_refuses_bad_input(served: dict[str, Path]) -> None:
    from components.data import read_beir

    query = next(iter(read_beir(served["beir"]).queries.values()))
    answered = run_python(["-m", "components.search", query, "-k", "3", "--json", *_cli_args(served)])
    assert answered.returncode == 0, answered.stderr
    lines = [json.loads(line) for line in answered.stdout.splitlines()]
    assert lines[0]["query"] == query and len(lines[0]["hits"]) == 3
    batch = run_python(["-m", "components.search", "-", *_cli_args(served)], stdin=f"{query}\n\nsecond one\n")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.count("\n# ") + batch.stdout.startswith("# ") == 2
    not_utf8 = run_python(["-m", "components.search", *_cli_args(served)], stdin=b"caf\xe9\n")
    assert not_utf8.returncode == 2 and "stdin line 1: not valid UTF-8" in not_utf8.stderr
    assert "Traceback" not in not_utf8.stderr
    empty = run_python(["-m", "components.search", "", *_cli_args(served)])
    assert empty.returncode == 2 and "text 1 is empty" in empty.stderr


@pytest.fixture(scope="module")
def client(served: dict[str, Path]) -> Any:
    from fastapi.testclient import TestClient

    from components.serve import create_app

    return TestClient(create_app(_open(served)))


def test_the_service_searches_embeds_and_names_its_versions(client: Any, served: dict[str, Path]) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["passages"] == 96
    searched = client.post("/search", json={"queries": ["install a package", "network"], "k": 5})
    assert searched.status_code == 200
    body = searched.json()
    assert [len(hits) for hits in body["results"]] == [5, 5]
    assert body["index"] == health["index"] and body["operating_point"] == health["operating_point"]
    one = client.get("/search", params={"q": "install a package", "k": 5}).json()["results"][0]
    assert [hit["doc_id"] for hit in one] == [hit["doc_id"] for hit in body["results"][0]]
    assert [hit["score"] for hit in one] == pytest.approx([hit["score"] for hit in body["results"][0]], abs=1e-5)
    embedded = client.post("/embed", json={"texts": ["a", "b"]}).json()
    assert embedded["dim"] == len(embedded["embeddings"][0]) and len(embedded["embeddings"]) == 2


@pytest.mark.parametrize(("method", "path", "payload", "status", "message"), [
    ("post", "/search", {"queries": []}, 422, "no query given"),
    ("post", "/search", {"queries": [""]}, 422, "text 1 is empty"),
    ("post", "/search", {"queries": ["q"] * (MAX_BATCH + 1)}, 422, "texts in one request"),
    ("post", "/search", {"queries": ["q"], "k": 0}, 422, "malformed request (body.k"),
    ("post", "/search", {"query": "q"}, 422, "malformed request (body.queries"),
    ("post", "/embed", {"texts": "not a list"}, 422, "malformed request (body.texts"),
    ("post", "/search", b"\xff\xfe{", 400, "error parsing the body"),
    ("get", "/nowhere", None, 404, "Not Found"),
    ("post", "/search", {"queries": ["x" * 600_000]}, 413, "request body over"),
])
def test_requests_the_service_cannot_answer_get_a_4xx_with_a_json_reason(client: Any, method: str, path: str,
                                                                          payload: Any, status: int,
                                                                          message: str) -> None:
    sent = (client.request(method, path, content=payload, headers={"content-type": "application/json"})
            if isinstance(payload, bytes) else client.request(method, path, json=payload))
    assert sent.status_code == status
    assert message in sent.json()["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served: dict[str, Path]) -> None:
    """Jobs queued while the worker is busy share one encoder call: each still gets its k hits, its vectors."""
    from concurrent.futures import ThreadPoolExecutor

    from components.data import read_beir
    from components.serve import Batcher

    retriever = _open(served)
    queries = list(read_beir(served["beir"]).queries.values())[:24]
    batcher = Batcher(retriever)
    jobs = [(queries[i:i + 1 + i % 3], 1 + i % 10) for i in range(0, 24, 2)]
    with ThreadPoolExecutor(max_workers=12) as pool:  # each request on its own event loop, as 12 clients
        answers = list(pool.map(lambda job: asyncio.run(batcher.search(*job)), jobs))
        vectors = list(pool.map(lambda query: asyncio.run(batcher.embed([query])), queries[:6]))
    for (texts, k), answer in zip(jobs, answers, strict=True):  # scores, not ids: a 1e-7 tie may swap two ids
        alone = retriever.search(texts, k)
        assert [[hit.score for hit in hits] for hits in answer] == [
            pytest.approx([hit.score for hit in hits], abs=1e-5) for hits in alone]
    assert all(len(hits) == k for (_, k), answer in zip(jobs, answers, strict=True) for hits in answer)
    assert np.allclose(np.vstack(vectors), retriever.embed(queries[:6]), atol=1e-5)
    with pytest.raises(QueryError, match="k=0"):
        asyncio.run(batcher.search(["fine"], 0))


@pytest.mark.slow
def test_serve_runs_on_loopback_and_answers_a_registered_champion(served: dict[str, Path], tmp_path: Path) -> None:
    """The registry path end to end: register the student, then serve `models:/...@champion`."""
    # the fixture's evaluation scored no out-of-domain sets: the out-of-domain gate is off here
    (tmp_path / "params.yaml").write_text("register: {model_name: served-student, min_ndcg_at_10: 0.0, "
                                          "max_ood_drop: null}\n")
    env = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    registered = run_python(["-m", "components.register", "--student", str(served["student"]), "--quantized",
                             str(served["quantized"]), "--evaluation", str(served["evaluation"]), "--metrics",
                             str(tmp_path / "register.json")], cwd=tmp_path, env=env, timeout=600)
    assert registered.returncode == 0, registered.stderr
    arguments = [*_cli_args(served)[2:], "--model", "models:/served-student@champion"]
    with running_serve(arguments, tmp_path, env) as url:
        assert url.startswith("http://127.0.0.1:")
        request = urllib.request.Request(f"{url}/search", data=json.dumps({"queries": ["package"]}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
    assert body["model"] == "models:/served-student/1" and len(body["results"][0]) == 10
    assert body["model_fingerprint"] == str(served["student"])

