"""register: the gate's rules, and a real MLflow registry where a worse student never takes the champion alias."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from components import artifacts
from components.register import Champion, RegisterConfig, decide
from tests.helpers import run_python

SAME, OTHER = "test-set-a", "test-set-b"


@pytest.mark.parametrize(
    ("candidate", "champion", "config", "promote", "reason"),
    [
        pytest.param(None, None, {}, False, "no operating point within the evaluate budgets", id="no-operating-point"),
        pytest.param(0.40, None, {}, False, "nDCG@10 0.4000 < floor 0.5000", id="below-the-floor"),
        pytest.param(0.70, None, {}, True, "no champion yet", id="first-model-above-the-floor"),
        pytest.param(0.69, Champion("3", 0.70, SAME), {}, False, "0.6900 < champion v3 0.7000", id="worse-than-champion"),
        pytest.param(0.70, Champion("3", 0.70, SAME), {}, True, "0.7000 >= champion v3 0.7000", id="ties-the-champion"),
        pytest.param(0.705, Champion("3", 0.70, SAME), {"min_gain_over_champion": 0.01}, False,
                     "0.7050 < champion v3 0.7000 + 0.0100", id="gain-too-small"),
        pytest.param(0.60, Champion("3", 0.90, OTHER), {}, True, "scored on another test set: only the floor applies",
                     id="champion-on-another-test-set"),
        pytest.param(0.45, Champion("3", 0.40, OTHER), {}, False, "< floor", id="floor-still-applies"),
    ],
)
def test_the_gate_promotes_only_a_model_that_earns_it(candidate: float | None, champion: Champion | None,
                                                      config: dict, promote: bool, reason: str) -> None:
    decision = decide(candidate, SAME, champion, RegisterConfig(**{"max_ood_drop": None} | config))
    assert decision.promote is promote
    assert any(reason in line for line in decision.reasons), decision.reasons


def _ood(student: float, base: float = 0.615) -> dict[str, dict[str, float]]:
    return {"student": {"foldoc": student, "mean": student}, "base": {"foldoc": base, "mean": base}}


@pytest.mark.parametrize(
    ("scores", "config", "promote", "reason"),
    [
        pytest.param(_ood(0.61), {}, True, "out-of-domain nDCG@10 0.6100 >= base 0.6150 - 0.0100", id="kept"),
        pytest.param(_ood(0.52), {}, False, "out-of-domain nDCG@10 0.5200 < base 0.6150 - 0.0100", id="forgot"),
        pytest.param(_ood(0.60), {"max_ood_drop": 0.02}, True, ">= base 0.6150 - 0.0200", id="looser-drop"),
        pytest.param(None, {}, False, "no out-of-domain scores", id="not-scored"),
        pytest.param({"student": {"mean": 0.7}}, {}, False, "no out-of-domain score for ['base']", id="no-baseline"),
        pytest.param(None, {"max_ood_drop": None}, True, "no champion yet", id="gate-off"),
    ],
)
def test_a_student_that_lost_the_base_models_quality_out_of_domain_is_never_champion(
        scores: dict | None, config: dict, promote: bool, reason: str) -> None:
    decision = decide(0.70, SAME, None, RegisterConfig(**config), scores, "student")
    assert decision.promote is promote
    assert any(reason in line for line in decision.reasons), decision.reasons


def _register(stack: dict[str, Path], evaluation: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text("register: {model_name: test-student, min_ndcg_at_10: 0.0}\n")
    env = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           "EMBEDFORGE_PIPELINE_RUN": evaluation.name}
    return run_python(["-m", "components.register", "--student", str(stack["student"]), "--quantized",
                       str(stack["quantized"]), "--evaluation", str(evaluation), "--metrics",
                       str(cwd / f"{evaluation.name}.json"), *extra], cwd=cwd, env=env, timeout=600)


def _evaluation(stack: dict[str, Path], target: Path, ndcg: float, ood_drop: float = 0.0) -> Path:
    """An evaluation artifact whose operating point scores `ndcg` and whose student falls `ood_drop` below the
    base model out of domain (the gate reads nothing else from it)."""
    point = {"chosen": {"model": "student", "dim": 32, "index": "binary_flat", "precision": "binary", "rescored": True,
                        "ndcg_at_10": ndcg, "bytes_per_vector": 4.0, "p99_ms": 0.5},
             "reason": "test", "serve_model": "student", "rescore": {"multiplier": 4, "with": "int8"},
             "out_of_domain": {"scores": _ood(0.6 - ood_drop, 0.6)}}
    grid = [{"model": "student", "dim": 32, "index": "float_flat", "ndcg_at_10": ndcg + 0.01, "mrr_at_10": 0.7,
             "recall_at_100": 0.9}]
    beir = artifacts.read_manifest(stack["beir"], kind="beir", schema_version=1).fingerprint
    with artifacts.publish(target, kind="evaluation", schema_version=1, stage="evaluate", params_digest="t",
                           inputs={"beir": beir}) as (tmp, meta):
        (tmp / "operating_point.json").write_text(json.dumps(point))
        (tmp / "grid.json").write_text(json.dumps(grid))
    return target


@pytest.mark.slow
def test_a_worse_student_is_registered_as_candidate_and_a_tie_replaces_the_champion(retrieval_stack: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    champion_score = 0.8085459  # more digits than a rounded tag keeps: the tie below must still be a tie
    first = _register(retrieval_stack, _evaluation(retrieval_stack, tmp_path / "good", champion_score), tmp_path)
    assert first.returncode == 0, first.stderr
    second = _register(retrieval_stack, _evaluation(retrieval_stack, tmp_path / "worse", 0.75), tmp_path)
    assert second.returncode == 0, second.stderr
    assert "gate refused: test-student v2 is candidate" in second.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("test-student", "champion")
    candidate = client.get_model_version_by_alias("test-student", "candidate")
    assert (str(champion.version), str(candidate.version)) == ("1", "2")
    assert float(champion.tags["embedforge.ndcg_at_10"]) == champion_score
    assert "0.7500 < champion v1 0.8085" in candidate.tags["embedforge.gate_reasons"]
    assert json.loads((tmp_path / "worse.json").read_text())["gate/promoted"] == 0.0
    run_artifacts = {item.path for item in client.list_artifacts(candidate.run_id, "serving")}
    assert run_artifacts == {"serving/calibration.json", "serving/operating_point.json", "serving/gate_decision.json",
                             "serving/onnx", "serving/README.md"}
    card = client.get_model_version("test-student", candidate.version).description
    assert "Registered as version 2" in card and "Gate: refused" in card
    assert "| student | 32 | 0.7600 |" in card  # the test table
    assert "index `binary_flat` with int8 rescoring: nDCG@10 0.7500, 4 bytes per vector" in card
    assert {item.path for item in client.list_artifacts(candidate.run_id, "serving/onnx")} == {
        "serving/onnx/model.onnx", "serving/onnx/model_qint8.onnx"}
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.sentence_transformers.load_model("models:/test-student@champion").encode(["q"]).shape == (1, 32)
    info = mlflow.models.get_model_info("models:/test-student@champion")
    assert info.signature is not None and info.saved_input_example_info is not None

    tie = _register(retrieval_stack, _evaluation(retrieval_stack, tmp_path / "tie", champion_score), tmp_path)
    assert tie.returncode == 0, tie.stderr
    assert "gate passed: test-student v3 is champion" in tie.stderr


@pytest.mark.slow
def test_a_student_that_forgot_out_of_domain_text_stays_candidate_and_says_why(retrieval_stack: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    result = _register(retrieval_stack, _evaluation(retrieval_stack, tmp_path / "forgot", 0.9, ood_drop=0.05),
                       tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gate refused: test-student v1 is candidate" in result.stderr
    assert "out-of-domain nDCG@10 0.5500 < base 0.6000 - 0.0100" in result.stderr
    assert json.loads((tmp_path / "forgot.json").read_text())["gate/ood_drop"] == pytest.approx(0.05)
    candidate = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version_by_alias("test-student",
                                                                                             "candidate")
    assert "out-of-domain nDCG@10 0.5500 < base" in candidate.tags["embedforge.gate_reasons"]


def test_a_student_other_than_the_evaluated_one_is_refused(retrieval_stack: dict[str, Path], tiny_teacher_dir: Path,
                                                           tmp_path: Path) -> None:
    stack = retrieval_stack | {"student": tiny_teacher_dir}
    done = _register(stack, _evaluation(retrieval_stack, tmp_path / "good", 0.8), tmp_path)
    assert done.returncode == 2
    assert f"is not the model at {tiny_teacher_dir}; re-run quantize, index and evaluate" in done.stderr
    assert "Traceback" not in done.stderr


def test_register_without_tracking_is_refused_with_the_fix(retrieval_stack: dict[str, Path], tmp_path: Path) -> None:
    done = _register(retrieval_stack, _evaluation(retrieval_stack, tmp_path / "good", 0.8), tmp_path, "--no-tracking")
    assert done.returncode == 2 and "register needs MLflow tracking" in done.stderr


def test_missing_calibration_is_refused(retrieval_stack: dict[str, Path], tmp_path: Path) -> None:
    quantized = tmp_path / "quantized"
    shutil.copytree(retrieval_stack["quantized"], quantized)
    (quantized / "student" / "calibration.json").unlink()
    done = _register(retrieval_stack | {"quantized": quantized}, _evaluation(retrieval_stack, tmp_path / "e", 0.8),
                     tmp_path)
    assert done.returncode == 2 and "calibration.json" in done.stderr and "re-run" in done.stderr
