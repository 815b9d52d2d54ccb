"""What a stage's pod gets on Kubernetes, the same under both cluster adapters: params.yaml `kubernetes`.

The Airflow DAG's `kubernetes` mode (a pod per stage) and the compiled Kubeflow pipeline read these settings, so a
team sets resources, `/dev/shm`, timeouts, retries and GPU placement once. Settings and credentials reach the
pods as environment variables from a ConfigMap and a Secret, named here and created out of band (infra/k8s).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from components.config import StageConfig, build_config


class PodResources(StageConfig):
    """Requests and limits of one kind of stage pod (Kubernetes quantities, e.g. "4", "500m", "16Gi")."""

    cpu_request: str = Field(min_length=1)
    cpu_limit: str = Field(min_length=1)
    memory_request: str = Field(min_length=1)
    memory_limit: str = Field(min_length=1)
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod (GPU stages: train, distill)")
    timeout_seconds: int = Field(ge=60, description="a stage running longer is stopped (and retried)")


class Toleration(StageConfig):
    key: str = Field(min_length=1)
    operator: str = Field("Exists", pattern="^(Exists|Equal)$")
    value: str | None = None
    effect: str | None = Field(None, pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$")


class ClusterSettings(StageConfig):
    """params.yaml `kubernetes`."""

    settings_config_map: str = Field("embedforge-settings", min_length=1)
    config_map_keys: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                        "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE")
    credentials_secret: str = Field("embedforge-credentials", min_length=1)
    secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    cpu_pod: PodResources = PodResources(cpu_request="2", cpu_limit="4", memory_request="4Gi",
                                         memory_limit="8Gi", timeout_seconds=7200)
    gpu_pod: PodResources = PodResources(cpu_request="4", cpu_limit="8", memory_request="16Gi",
                                         memory_limit="32Gi", gpus=1, timeout_seconds=21600)
    shm_size: str = Field("8Gi", min_length=1, description="memory-backed /dev/shm for data-loader workers")
    gpu_node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    gpu_tolerations: tuple[Toleration, ...] = (Toleration(key="nvidia.com/gpu", effect="NoSchedule"),)
    retries: int = Field(2, ge=0, le=10, description="retries of a failed stage pod, with exponential backoff")
    retry_delay_seconds: int = Field(60, ge=1)
    max_retry_delay_seconds: int = Field(900, ge=1)

    def pod(self, gpu: bool) -> PodResources:
        return self.gpu_pod if gpu else self.cpu_pod


RUN_ID_LABEL = "pipeline/runid"  # the label Kubeflow puts on every pod of a run: the run's MLflow parent key


def cluster_settings(params: Mapping[str, Any], params_file: Path) -> ClusterSettings:
    """The `kubernetes` section of a loaded params file, validated (errors name the file and key)."""
    return build_config(ClusterSettings, params.get("kubernetes") or {}, where=f"{params_file}:kubernetes")
