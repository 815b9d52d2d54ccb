"""End to end: `dvc repro` of the smoke profile (every stage) in a temporary copy of the repository.

Specifies what a user gets from the embedded default: every artifact published with a manifest, metrics and
plots written, one MLflow parent run with a nested run per stage, the student registered as champion, a second
`dvc repro` that re-runs nothing, and a third, with a deliberately worse student, that must not take the champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.artifacts import read_manifest
from components.data import read_beir
from components.distill import DistillConfig
from components.stages import STAGES
from tests.e2e.project import dvc_command, dvc_env, run_dvc
from tests.helpers import pipeline_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_project(dvc_smoke_project: Path) -> Path:
    return dvc_smoke_project


def test_smoke_repro_publishes_every_artifact_with_a_manifest(smoke_project: Path) -> None:
    curated = read_manifest(smoke_project / "data/curated", kind="curated_pairs", schema_version=1)
    embeddings = read_manifest(smoke_project / "data/embeddings/base", kind="embeddings", schema_version=1)
    beir = read_manifest(smoke_project / "data/beir/debian-test", kind="beir", schema_version=1)
    mined = read_manifest(smoke_project / "data/mined", kind="mined_pairs", schema_version=1)
    teacher = read_manifest(smoke_project / "models/teacher", kind="sentence_transformer", schema_version=1)
    student = read_manifest(smoke_project / "models/student", kind="sentence_transformer", schema_version=1)
    assert curated.counts["rows_test"] == beir.counts["queries"] > 0
    assert embeddings.counts["dim"] == 384
    assert 0 < mined.counts["rows"] <= curated.counts["rows_train"]
    assert teacher.counts == {"layers": 6, "dim": 384}
    assert student.counts == {"layers": len(DistillConfig().layers), "dim": 384}
    assert student.inputs["teacher"] == teacher.fingerprint
    quantized = read_manifest(smoke_project / "data/quantized", kind="quantized_embeddings", schema_version=1)
    assert quantized.inputs["model:student"] == student.fingerprint
    assert quantized.extra["models"]["student"]["dims"] == [384, 64]
    indexes = read_manifest(smoke_project / "data/index", kind="faiss_indexes", schema_version=1)
    assert indexes.counts["indexes"] == 3 * 2 * 5  # models x dims x index types
    evaluation = read_manifest(smoke_project / "data/evaluation", kind="evaluation", schema_version=1)
    assert evaluation.inputs["beir"] == beir.fingerprint
    dataset = read_beir(smoke_project / "data/beir/debian-test")
    assert set(dataset.qrels) == set(dataset.queries)


def test_smoke_repro_writes_metrics_plots_and_report(smoke_project: Path) -> None:
    curate = json.loads((smoke_project / "metrics/curate.json").read_text())
    assert curate["rows_sampled"] - curate["dropped_total"] == curate["rows_out"]
    evaluate = json.loads((smoke_project / "metrics/evaluate.json").read_text())
    grid = json.loads((smoke_project / "data/evaluation/grid.json").read_text())
    scored = {(row["model"], row["dim"], row["index"] + ("_rescore" if row["rescored"] else "")): row["ndcg_at_10"]
              for row in grid}
    for model in ("base", "teacher", "student"):
        for dim in (384, 64):
            for config in ("float_flat", "float_hnsw", "int8_flat", "binary_flat", "binary_hnsw",
                           "binary_flat_rescore", "binary_hnsw_rescore"):
                assert 0.0 < scored[(model, dim, config)] <= 1.0
        assert evaluate[f"{model}/ndcg@10"] == scored[(model, 384, "float_flat")]
    assert evaluate["queries"] == curate["rows_test"]
    assert evaluate["operating_point/bytes_per_vector"] <= 64
    train = json.loads((smoke_project / "metrics/train.json").read_text())
    assert train["loss_end"] < train["loss_start"]
    assert (smoke_project / "plots/curate_drops.csv").read_text().startswith("reason,count")
    header = (smoke_project / "plots/ndcg_vs_dim.csv").read_text().splitlines()[0]
    assert set(header.split(",")) == {"dim", "base", "teacher", "student"}
    assert (smoke_project / "plots/mine_scores.png").stat().st_size > 0
    assert (smoke_project / "plots/ndcg_vs_bytes.csv").read_text().startswith("config,model,bytes_per_vector,ndcg@10")
    report = (smoke_project / "reports/evaluation.md").read_text()
    assert "| student | 64 | binary_flat_rescore |" in report and "## Pareto front" in report
    assert (smoke_project / "reports/ndcg_vs_bytes.png").stat().st_size > 0
    shown = run_dvc(smoke_project, "metrics", "show", "--json")
    assert "student/ndcg@10" in shown.stdout and "student/d64/int8_flat/ndcg@10" not in shown.stdout


def test_smoke_repro_tracks_one_parent_run_with_a_nested_run_per_stage(smoke_project: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke_project / 'mlflow.db'}")
    parent, children = pipeline_runs(client)
    assert set(children) == set(STAGES)
    assert children["evaluate"].data.metrics["student/d384/float_flat/ndcg_at_10"] > 0
    assert children["register"].data.metrics["gate/promoted"] == 1.0
    assert "evaluation.md" in {item.path for item in client.list_artifacts(children["evaluate"].info.run_id)}
    assert str(client.get_model_version_by_alias("embedforge-student", "champion").version) == "1"
    assert children["curate"].data.params["eps"] == "0.05"
    assert parent.data.tags["embedforge.snapshot_sha256"] == children["curate"].data.tags["embedforge.data_fingerprint"]
    assert len(parent.data.tags["embedforge.git_commit"]) == 40
    artifacts = {item.path for item in client.list_artifacts(children["curate"].info.run_id)}
    assert "audit_sample.json" in artifacts
    assert parent.info.status == "FINISHED"  # by the last stage; RUNNING until then


def test_smoke_repro_logs_training_curves_system_metrics_and_datasets(smoke_project: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke_project / 'mlflow.db'}")
    _, children = pipeline_runs(client)
    curves = {"train": ("train/loss", "train/learning_rate", "dev/ndcg_at_10"),  # 24 steps, dev every 12
              "distill": ("train/loss", "train/learning_rate")}  # fewer steps than its eval_steps on smoke data
    for stage, names in curves.items():
        for curve in names:
            steps = [point.step for point in client.get_metric_history(children[stage].info.run_id, curve)]
            assert len(steps) >= 2 and steps == sorted(set(steps)), (stage, curve, steps)
    assert any(key.startswith("system/cpu_utilization") for key in children["train"].data.metrics)
    datasets = {(item.dataset.name, {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]):
                item.dataset.digest for item in children["train"].inputs.dataset_inputs}
    curated = read_manifest(smoke_project / "data/curated", kind="curated_pairs", schema_version=1)
    assert datasets[("curated", "input")] == curated.fingerprint[:32]
    assert {("mined", "input"), ("teacher", "output")} <= set(datasets)


def test_second_repro_reruns_nothing(smoke_project: Path) -> None:
    result = run_dvc(smoke_project, "repro")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Running stage" not in result.stdout
    status = run_dvc(smoke_project, "status")
    assert "up to date" in status.stdout


def test_a_repro_with_a_worse_student_does_not_take_the_champion(smoke_project: Path) -> None:
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load((smoke_project / "params.yaml").read_text())
    params["profiles"]["smoke"]["distill"] |= {"layers": [0], "learning_rate": 1e-9}  # one barely trained layer
    (smoke_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_dvc(smoke_project, "repro")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Running stage 'train'" not in result.stdout and "Running stage 'register'" in result.stdout
    gate = json.loads((smoke_project / "metrics/register.json").read_text())
    assert gate["gate/candidate_ndcg@10"] < gate["gate/champion_ndcg@10"]  # the premise: this student is worse
    assert gate["gate/promoted"] == 0.0
    client = MlflowClient(f"sqlite:///{smoke_project / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("embedforge-student", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("embedforge-student", "candidate").version) == "2"


def test_a_repro_killed_inside_a_stage_leaves_nothing_half_written_and_the_next_repro_completes(
        smoke_project: Path) -> None:
    """Without `persist`, DVC removes a stage's outputs before running it: a kill leaves no output (never a half
    one), `dvc checkout` brings back the last good one from the cache, and the next repro completes. Going back
    to params already run then takes no re-computation: quantize and index come back from DVC's run-cache;
    evaluate (whose report is kept in git, not the DVC cache) re-measures, and register records it."""
    import os
    import signal
    import subprocess
    import time

    before = read_manifest(smoke_project / "data/index", kind="faiss_indexes", schema_version=1)
    original = (smoke_project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["profiles"]["smoke"]["quantize"]["calibration_texts"] = 150  # quantize and all after it re-run
    (smoke_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = subprocess.Popen(dvc_command("repro"), cwd=smoke_project, env=dvc_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((smoke_project / "data").glob(".index.tmp-*")):  # the index stage is writing its artifact
        assert repro.poll() is None, "dvc repro ended before the index stage wrote anything"
        assert time.monotonic() < deadline, "the index stage did not start in time"
        time.sleep(0.02)
    os.killpg(repro.pid, signal.SIGKILL)  # dvc and the stage, as a node losing power would
    repro.wait()

    assert not (smoke_project / "data/index").exists()  # removed by DVC before the stage ran; nothing partial
    assert run_dvc(smoke_project, "checkout", "data/index").returncode == 0
    restored = read_manifest(smoke_project / "data/index", kind="faiss_indexes", schema_version=1)  # verifies files
    assert restored.fingerprint == before.fingerprint
    result = run_dvc(smoke_project, "repro")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Running stage 'index'" in result.stdout and "Running stage 'quantize'" not in result.stdout
    quantized = read_manifest(smoke_project / "data/quantized", kind="quantized_embeddings", schema_version=1)
    after = read_manifest(smoke_project / "data/index", kind="faiss_indexes", schema_version=1)
    assert after.inputs["quantized"] == quantized.fingerprint  # rebuilt from the new calibration
    assert not list((smoke_project / "data").glob(".index.tmp-*"))
    assert "up to date" in run_dvc(smoke_project, "status").stdout

    (smoke_project / "params.yaml").write_text(original)
    back = run_dvc(smoke_project, "repro")
    assert back.returncode == 0, back.stdout[-4000:] + back.stderr[-4000:]
    for stage in ("quantize", "index"):
        assert f"Stage '{stage}' is cached - skipping run" in back.stdout, back.stdout[-4000:]
    assert read_manifest(smoke_project / "data/index", kind="faiss_indexes", schema_version=1).fingerprint == \
        before.fingerprint


def test_dvc_experiments_of_two_settings_compare_by_their_headline_metrics(smoke_project: Path) -> None:
    """`dvc exp run -S` as users try settings: each re-runs only the stages the setting reaches, and `dvc exp
    show --only-changed` puts the experiments side by side with the setting and the headline metrics, not the
    evaluation grid (that stays in data/evaluation and MLflow)."""
    import csv

    for multiplier in (2, 8):
        result = run_dvc(smoke_project, "exp", "run", "-S", f"evaluate.rescore_multiplier={multiplier}")
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "Running stage 'evaluate'" in result.stdout and "Running stage 'index'" not in result.stdout

    def table(*options: str) -> list[dict[str, str]]:
        shown = run_dvc(smoke_project, "exp", "show", "--csv", *options)
        assert shown.returncode == 0, shown.stderr[-2000:]
        return list(csv.DictReader(shown.stdout.splitlines()))

    changed = table("--only-changed")
    assert sorted(row["evaluate.rescore_multiplier"] for row in changed if row["Experiment"]) == ["2", "8"], changed
    columns = {column.split(":")[-1] for column in table()[0]}  # a name shared by two files gets the file's prefix
    assert {"operating_point/ndcg@10", "student/ndcg@10", "student/ood_ndcg@10", "gate/promoted"} <= columns
    assert not [column for column in columns if "_flat" in column or column.startswith("ood/")]


@pytest.mark.slow
def test_the_smoke_runs_sharded_curate_equals_a_one_process_curate(dvc_smoke_results: Path, tmp_path: Path) -> None:
    """`dvc repro` curated the smoke profile in 3 shards on 2 worker processes; the same params in one shard
    and one process publish the same curated pairs (the manifest's fingerprint covers every file)."""
    from components.config import load_stage_config
    from components.curate import CurateConfig, CuratePaths, curate
    from tests.helpers import REPO_ROOT

    config = load_stage_config(CurateConfig, "curate", REPO_ROOT / "params.yaml", "smoke")
    assert (config.shards, config.workers) == (3, 2)
    paths = CuratePaths(input=REPO_ROOT / STAGES["curate"].port("input").path, output=tmp_path / "curated",
                        embeddings=tmp_path / "embeddings", beir=tmp_path / "beir")
    curate(config.model_copy(update={"shards": 1, "workers": 1}), paths)
    dvc = json.loads((dvc_smoke_results / "manifests" / "data/curated" / "manifest.json").read_text())
    assert read_manifest(paths.output, kind=dvc["kind"], schema_version=1).fingerprint == dvc["fingerprint"]
