"""register: the promotion gate. The student goes to the MLflow model registry; it becomes `champion` only if it earns it.

The candidate's score is its nDCG@10 at the operating point chosen by evaluate. It passes when it clears the
absolute floor, keeps the base model's quality out of domain (its mean nDCG@10 on evaluate's out-of-domain
sets at most `max_ood_drop` below the base model's: a student that forgot general text is no upgrade, whatever
it scores on Debian) and, if a champion exists and was scored on the same test set, reaches the champion's
score plus `min_gain_over_champion`. Every run registers a new version (sentence-transformers flavour, with a
signature and an input example) with its int8 calibration, operating point, the gate's decision and the
student's ONNX export with int8 weights (`serving/onnx/`, see components/export.py) and its model card with the
test table and operating point (`serving/README.md`, also the version's description) as artifacts; the
`champion` alias moves only on a pass, `candidate` marks a version that did not pass. The decision and its reasons go to the run's metrics and log.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field

from components.artifact_types import EVALUATION, model_fingerprint, read_evaluation, read_quantized
from components.artifacts import ArtifactError
from components.config import ConfigError, StageConfig
from components.model_card import CARD_FILE, registry_card

log = logging.getLogger(__name__)

STAGE = "register"
CHAMPION, CANDIDATE = "champion", "candidate"
SCORE_TAG, TEST_SET_TAG = "embedforge.ndcg_at_10", "embedforge.test_fingerprint"
EXAMPLE_QUERIES = ["how do I mount an NFS share at boot", "compress files with xz"]  # the model's input example


class RegisterConfig(StageConfig):
    """The `register` params; params.yaml's base section equals these defaults (test_params_defaults.py)."""

    model_name: str = Field(
        "embedforge-student", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="MLflow registered model name.")
    min_ndcg_at_10: float = Field(
        0.5, ge=0, le=1,
        description="Floor: a student below this nDCG@10 at its operating point is never champion.")
    min_gain_over_champion: float = Field(
        0.0, ge=-1, le=1,
        description="On the same test set the candidate must reach champion + this to take over.")
    max_ood_drop: float | None = Field(
        0.01, ge=0, le=1,
        description="The student's out-of-domain nDCG@10 (mean of evaluate's sets) may fall at most this far below "
                    "the baseline model's; null = no out-of-domain gate.")
    ood_baseline: str = Field(
        "base", min_length=1,
        description="The model (a quantize `models` name) whose out-of-domain score the student must keep.")


@dataclass(frozen=True)
class Champion:
    version: str
    ndcg_at_10: float
    test_fingerprint: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    candidate_ndcg_at_10: float | None
    champion: Champion | None


def decide(candidate_ndcg: float | None, test_fingerprint: str, champion: Champion | None,
           config: RegisterConfig, out_of_domain: dict[str, dict[str, float]] | None = None,
           candidate: str = "student") -> Decision:
    """The gate itself: pure, so that every rule is tested without a registry. `out_of_domain` is evaluate's
    model -> {set: nDCG@10, "mean": ...}; `candidate` the model name there."""
    if candidate_ndcg is None:
        return Decision(False, ["no operating point within the evaluate budgets"], None, champion)
    floor_ok = candidate_ndcg >= config.min_ndcg_at_10
    reasons = [f"nDCG@10 {candidate_ndcg:.4f} {'>=' if floor_ok else '<'} floor {config.min_ndcg_at_10:.4f}"]
    ood_ok, ood_reason = out_of_domain_check(out_of_domain, candidate, config)
    if ood_reason:
        reasons.append(ood_reason)
    beats_champion = True
    if champion is None:
        reasons.append("no champion yet")
    elif champion.test_fingerprint != test_fingerprint:
        reasons.append(f"champion v{champion.version} was scored on another test set: only the floor applies")
    else:
        needed = champion.ndcg_at_10 + config.min_gain_over_champion
        beats_champion = candidate_ndcg >= needed
        reasons.append(f"nDCG@10 {candidate_ndcg:.4f} {'>=' if beats_champion else '<'} champion v{champion.version} "
                       f"{champion.ndcg_at_10:.4f} + {config.min_gain_over_champion:.4f}")
    return Decision(floor_ok and ood_ok and beats_champion, reasons, candidate_ndcg, champion)


def out_of_domain_check(scores: dict[str, dict[str, float]] | None, candidate: str,
                        config: RegisterConfig) -> tuple[bool, str | None]:
    """Whether the candidate kept the baseline's out-of-domain quality, and the reason in words."""
    if config.max_ood_drop is None:
        return True, None
    if not scores:
        return False, ("no out-of-domain scores (evaluate ran without out-of-domain sets): the max_ood_drop gate "
                       "cannot pass; give evaluate its sets or set register.max_ood_drop to null")
    missing = [name for name in (candidate, config.ood_baseline) if name not in scores]
    if missing:
        return False, f"no out-of-domain score for {missing} (evaluate scored {sorted(scores)})"
    mine, baseline = scores[candidate]["mean"], scores[config.ood_baseline]["mean"]
    passed = mine >= baseline - config.max_ood_drop
    return passed, (f"out-of-domain nDCG@10 {mine:.4f} {'>=' if passed else '<'} {config.ood_baseline} "
                    f"{baseline:.4f} - {config.max_ood_drop:.4f}")


def current_champion(client: object, name: str) -> Champion | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model or no such alias yet
        return None
    return Champion(version=str(version.version), ndcg_at_10=float(version.tags.get(SCORE_TAG, "nan")),
                    test_fingerprint=version.tags.get(TEST_SET_TAG, ""))


@dataclass(frozen=True)
class RegisterPaths:
    student: Path
    quantized: Path
    evaluation: Path


def register(config: RegisterConfig, paths: RegisterPaths) -> tuple[Decision, dict[str, float]]:
    """Check the artifacts belong together, apply the gate, register the version and move its alias."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.embed import load_model
    from components.export import ONNX_BACKEND, check_metrics, export_onnx, onnx_record

    if mlflow.active_run() is None:
        raise ConfigError("register needs MLflow tracking (its model registry); run it without --no-tracking")
    evaluation = read_evaluation(paths.evaluation)
    point = evaluation.operating_point
    quantized = read_quantized(paths.quantized)
    served = point["serve_model"]
    student_fingerprint = model_fingerprint(str(paths.student))
    if quantized.manifest.inputs.get(f"model:{served}") != student_fingerprint:
        raise ArtifactError(f"{paths.quantized}: model {served!r} there is not the model at {paths.student}; "
                            f"re-run quantize, index and evaluate (`dvc repro`) before registering")
    calibration = quantized.calibration_path(served)

    client = MlflowClient()
    champion = current_champion(client, config.model_name)
    chosen = point["chosen"]
    out_of_domain = (point.get("out_of_domain") or {}).get("scores")
    decision = decide(chosen["ndcg_at_10"] if chosen else None, evaluation.manifest.inputs["beir"], champion,
                      config, out_of_domain, served)
    model = load_model(str(paths.student), onnx=False)  # MLflow's flavour saves the torch weights
    info = mlflow.sentence_transformers.log_model(
        model, name="student", registered_model_name=config.model_name,
        signature=mlflow.models.infer_signature(EXAMPLE_QUERIES, model.encode(EXAMPLE_QUERIES)),
        input_example=EXAMPLE_QUERIES,
        pip_requirements=[f"{package}=={importlib.metadata.version(package)}"
                          for package in ("sentence-transformers", "transformers", "torch")],
        metadata={"operating_point": chosen, "student_fingerprint": student_fingerprint,
                  "serving_backend": ONNX_BACKEND if onnx_record(paths.student) is not None else "torch"})
    version = str(info.registered_model_version)
    mlflow.log_artifact(str(calibration), artifact_path="serving")
    mlflow.log_artifact(str(evaluation.operating_point_path), artifact_path="serving")
    mlflow.log_dict(asdict(decision), "serving/gate_decision.json")
    if (record := onnx_record(paths.student)) is not None:  # distill published it with its export: log that
        export_checks = check_metrics(record)
        mlflow.log_artifacts(str(paths.student / "onnx"), artifact_path="serving/onnx")
    else:
        with tempfile.TemporaryDirectory(prefix="embedforge-onnx-") as scratch:
            export_checks = export_onnx(str(paths.student), Path(scratch) / "student-onnx")
            mlflow.log_artifacts(str(Path(scratch) / "student-onnx" / "onnx"), artifact_path="serving/onnx")
    tags = {TEST_SET_TAG: evaluation.manifest.inputs["beir"], "embedforge.gate": "passed" if decision.promote else "refused",
            "embedforge.gate_reasons": "; ".join(decision.reasons)}
    if chosen:
        tags |= {SCORE_TAG: repr(float(chosen["ndcg_at_10"])),  # exact: the next gate compares against it
                 "embedforge.operating_point": f"d{chosen['dim']}/{chosen['index']}{'_rescore' if chosen['rescored'] else ''}"}
    student_card = paths.student / CARD_FILE
    card = registry_card(student_card.read_text(encoding="utf-8") if student_card.is_file() else "",
                         json.loads((evaluation.operating_point_path.parent / "grid.json").read_text()), point,
                         asdict(decision), version)
    mlflow.log_text(card, "serving/README.md")
    client.update_model_version(config.model_name, version, description=card)
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    client.set_registered_model_alias(config.model_name, CHAMPION if decision.promote else CANDIDATE, version)
    log.info("gate %s: %s v%s is %s (%s)", "passed" if decision.promote else "refused", config.model_name, version,
             CHAMPION if decision.promote else CANDIDATE, "; ".join(decision.reasons))
    metrics = {"gate/promoted": float(decision.promote), "registered_version": float(version),
               **{f"onnx/{name}": value for name, value in export_checks.items()}}
    if decision.candidate_ndcg_at_10 is not None:
        metrics["gate/candidate_ndcg@10"] = decision.candidate_ndcg_at_10
    if champion is not None:
        metrics["gate/champion_ndcg@10"] = champion.ndcg_at_10
    if out_of_domain and served in out_of_domain and config.ood_baseline in out_of_domain:
        metrics["gate/ood_drop"] = out_of_domain[config.ood_baseline]["mean"] - out_of_domain[served]["mean"]
    return decision, metrics


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m components.register` / `embedforge register`."""
    from components.cli import (
        StageOutcome,
        parse_stage_args,
        run_stage,
        stage_parser,
    )

    parser = stage_parser(STAGE, RegisterConfig)
    args, config = parse_stage_args(parser, argv, RegisterConfig, STAGE)
    paths = RegisterPaths(student=args.student, quantized=args.quantized, evaluation=args.evaluation)

    def work() -> StageOutcome:
        decision, metrics = register(config, paths)
        fingerprint = EVALUATION.read_manifest(paths.evaluation, verify=False).inputs["beir"]
        return StageOutcome(metrics=metrics, data_fingerprint=fingerprint, json_artifacts={"gate.json": asdict(decision)})

    run_stage(STAGE, args, config, work, args.metrics)


if __name__ == "__main__":
    import sys

    from components.cli import guarded

    sys.exit(guarded(main)())
