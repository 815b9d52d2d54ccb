"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Stages run as separate processes (under DVC, Kubeflow or Airflow), so the parent run is found again by a
pipeline key: `EMBEDFORGE_PIPELINE_RUN` when an orchestrator sets it (its run id), otherwise a digest of the
git commit and the params file, so one `dvc repro` gathers all its stages under one parent. The parent is
RUNNING while stages run, FAILED when one fails, and FINISHED when the pipeline's last stage ends. Each stage
run samples system metrics (CPU, memory, disk, network, and the GPU where there is one, through nvidia-ml-py)
and records its input and output artifacts as MLflow datasets, named after the artifact with its fingerprint as
digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_STORE}"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
EXPERIMENT = "embedforge"
PREFLIGHT_TIMEOUT_S = 5.0
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")
SYSTEM_METRICS_INTERVAL_S = 5.0
DATASET_DIGEST_CHARS = 32  # MLflow keeps 36 characters of a dataset digest; the full fingerprint goes in a tag


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer: better said before a stage starts than after hours of training."""


def tracking_uri(project: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, else the local SQLite store of the working directory (or of `project`, for a
    process that runs elsewhere, such as an Airflow worker)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return DEFAULT_TRACKING_URI if project is None else f"sqlite:///{Path(project).resolve() / DEFAULT_STORE}"


def _shown(uri: str) -> str:
    """The URI without any `user:password@` part, fit for a log line."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def check_server(uri: str | None = None, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Refuse an http(s) tracking URI whose server does not answer `GET /health` within `timeout_s`.

    Any HTTP answer below 500 counts as up (an auth proxy, say: MLflow's own calls will say more). Local
    stores (sqlite, file) need no check.
    """
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingUnavailable(
        f"MLflow tracking server {_shown(uri)} (MLFLOW_TRACKING_URI) did not answer within {timeout_s:g}s "
        f"({reason}); nothing was run. Start the server, point MLFLOW_TRACKING_URI at one that is up, or run "
        f"the stage with --no-tracking."
    )


def mlflow_key(name: str) -> str:
    """MLflow refuses '@' and most punctuation in metric names: `ndcg@10` is logged as `ndcg_at_10`."""
    return _INVALID_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def git_code_state() -> str:
    """The commit, marked when tracked files differ from it: a `dvc repro` usually runs before the commit that
    records its outputs, so a model made from uncommitted code says so."""
    commit = git_commit()
    try:
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return commit
    return f"{commit} + uncommitted changes" if changes else commit


PIPELINE_RUN_ENV = "EMBEDFORGE_PIPELINE_RUN"  # an orchestrator's run id: the key of its MLflow parent run


def pipeline_key(params_path: Path) -> str:
    explicit = os.environ.get(PIPELINE_RUN_ENV)
    if explicit:
        return explicit
    params_bytes = params_path.read_bytes() if params_path.is_file() else b""
    return hashlib.sha256(git_commit().encode() + b"\0" + params_bytes).hexdigest()[:16]


def _experiment_id(client: Any, uri: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri == DEFAULT_TRACKING_URI:
        artifact_location = Path(DEFAULT_ARTIFACT_DIR).resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)


def find_pipeline_run(client: Any, key: str) -> Any | None:
    """The parent MLflow run of the pipeline run `key` (an orchestrator's run id, or dvc's digest), if any."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`embedforge.pipeline_key` = '{key}' and tags.`embedforge.role` = 'pipeline'",
        max_results=1,
    )
    return found[0] if found else None


def _parent_run_id(client: Any, experiment_id: str, key: str, tags: Mapping[str, str]) -> str:
    found = find_pipeline_run(client, key)
    if found is not None:
        return found.info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline-{key[:8]}",
        tags={"embedforge.pipeline_key": key, "embedforge.role": "pipeline", **tags},
    )
    return run.info.run_id


def record_outcome(
    metrics: Mapping[str, float],
    data_fingerprint: str,
    json_artifacts: Mapping[str, Any],
    files: list[Path],
    pipeline_tags: Mapping[str, str],
) -> None:
    """Log a stage's metrics, data fingerprint tag, small JSON artifacts and files to the active run.

    `pipeline_tags` go on the parent run (the snapshot hash, say), where a reader of the pipeline looks first.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    run = mlflow.active_run()
    mlflow.log_metrics({mlflow_key(name): float(value) for name, value in metrics.items()})
    mlflow.set_tag("embedforge.data_fingerprint", data_fingerprint)
    client = MlflowClient()
    for name, value in pipeline_tags.items():
        client.set_tag(run.data.tags["mlflow.parentRunId"], name, value)
    with tempfile.TemporaryDirectory() as tmp:
        for name, payload in json_artifacts.items():
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(path))
    for path in files:
        mlflow.log_artifact(str(path))


@dataclass(frozen=True)
class ArtifactDataset:
    """An artifact a stage read or wrote, as an MLflow dataset: where it is and its content fingerprint."""

    name: str
    uri: str
    fingerprint: str
    context: Literal["input", "output"]


def log_datasets(datasets: list[ArtifactDataset]) -> None:
    """Record each artifact on the active run (`log_input`): the run page lists what went in and came out."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for dataset in datasets:
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(dataset.uri)
        mlflow.log_input(MetaDataset(source, name=dataset.name, digest=dataset.fingerprint[:DATASET_DIGEST_CHARS]),
                         context=dataset.context, tags={"embedforge.fingerprint": dataset.fingerprint})


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    params_path: Path,
    final: bool,
) -> Iterator[str]:
    """Open the nested MLflow run of `stage` under this pipeline's parent run; yields the stage run id.

    The parent goes (back) to RUNNING as the stage starts, to FAILED if it fails, and to FINISHED after the
    `final` stage (the pipeline's last). The tracking URI is `MLFLOW_TRACKING_URI` when set, else a local
    SQLite store in the working directory.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, uri)
    tags = {"embedforge.git_commit": git_commit()}
    parent_id = _parent_run_id(client, experiment_id, pipeline_key(params_path), tags)
    client.update_run(parent_id, status="RUNNING")
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        tags={"mlflow.parentRunId": parent_id, "embedforge.stage": stage, **tags},
        log_system_metrics=True,
    ) as run:
        mlflow.log_params({mlflow_key(key): value for key, value in params.items()})
        log.info("MLflow: stage run %s under pipeline run %s (%s)", run.info.run_id, parent_id, _shown(uri))
        try:
            yield run.info.run_id
        except BaseException:
            client.set_terminated(parent_id, status="FAILED")
            raise
    if final:
        client.set_terminated(parent_id, status="FINISHED")
