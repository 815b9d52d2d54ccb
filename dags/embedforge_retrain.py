"""Airflow 3 adapter: `embedforge_retrain`, the embedforge pipeline as one task per stage.

Scheduled weekly (cron in params.yaml `airflow.schedule`) and whenever the raw-data Asset is updated; a run can be
triggered from the UI with Params (profile, mode, the raw pairs and the pipeline's knobs, each typed and described
by the stage param it sets). The DAG holds no stage logic: `plan` lays out this run's artifact paths and each
stage's command line from the stage table (`components/stages.py`, which the Kubeflow adapter reads too); then
the `local` tasks run each stage's CLI in a subprocess of the worker, the `docker` tasks run it in a container on
the worker's Docker API (Docker, or podman's socket: `DOCKER_HOST`) with the project checkout mounted, or the
`kubernetes` tasks run it in a pod; containers and pods run the project images (GPU stages on the CUDA image). `publish` emits the model Asset and logs the MLflow run
of this DAG run.

Parsing this file reads params.yaml only: no connection, Variable or database lookup at parse time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import Asset, Param, TaskGroup, Variable, chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable
from docker.types import Mount
from kubernetes.client import models as k8s
from pydantic import Field

from components.cli import EXIT_TEMPFAIL, EXIT_USAGE
from components.cluster import ClusterSettings, cluster_settings
from components.config import StageConfig, build_config, load_params, load_stage_config
from components.stages import (
    CURATE_STEPS,
    IMAGES,
    KNOBS,
    PIPELINE_INPUTS,
    STAGES,
    STEP_OUTPUT,
    Stage,
    command_line,
    curate_shards,
    merge_flags,
    step_command_line,
)
from components.tracking import PIPELINE_RUN_ENV, find_pipeline_run, tracking_uri

log = logging.getLogger("embedforge.airflow")

PROJECT = Path(__file__).resolve().parents[1]
PARAMS_FILE = "params.yaml"  # relative to the project root: the worker's checkout, or the image's WORKDIR
DAG_ID = "embedforge_retrain"
USAGE_ERROR = EXIT_USAGE  # a stage rejected its input or params: fails the task for good, never retried
TEMPORARY_FAILURE = EXIT_TEMPFAIL  # S3, network, MLflow server or disk failed: retried with the DAG's backoff
MODES = ("local", "docker", "kubernetes")


class AirflowSettings(StageConfig):
    """params.yaml `airflow`: deployment settings of this adapter (the knobs of a run are Params)."""

    schedule: str = Field("0 3 * * 1", min_length=9)
    mode: Literal["local", "docker", "kubernetes"] = "local"
    raw_pairs: str = Field(PIPELINE_INPUTS["raw_pairs"].path, min_length=1)
    general_text: str = Field(PIPELINE_INPUTS["general_text"].path, min_length=1)
    ood_sets: str = Field(PIPELINE_INPUTS["ood_sets"].path, min_length=1)
    local_artifact_root: str = Field("airflow_runs", min_length=1)
    kubernetes_artifact_root: str = Field("/artifacts", min_length=1)
    retries: int = Field(2, ge=0, le=10)
    retry_delay_seconds: int = Field(60, ge=1)
    max_retry_delay_seconds: int = Field(900, ge=1)
    namespace: str = Field("embedforge", min_length=1)
    cpu_image: str = Field(IMAGES["cpu"], min_length=1)  # set where the images go by another name (e.g. localhost/)
    cuda_image: str = Field(IMAGES["cuda"], min_length=1)
    artifacts_claim: str = Field("embedforge-artifacts", min_length=1)


PARAMS = load_params(PROJECT / PARAMS_FILE)
SETTINGS = build_config(AirflowSettings, PARAMS.get("airflow") or {}, where=f"{PARAMS_FILE}:airflow")
CLUSTER = cluster_settings(PARAMS, PROJECT / PARAMS_FILE)  # what a stage pod gets (shared with Kubeflow)
PROFILES = sorted({"default", *(PARAMS.get("profiles") or {})})
MODEL_NAME = load_stage_config(STAGES["register"].config_class, "register", PROJECT / PARAMS_FILE).model_name


def _uri(location: str) -> str:
    """An Asset URI for a path or URI: relative paths are taken from the project root."""
    return location if "://" in location else (PROJECT / location).resolve().as_uri()


RAW_PAIRS = Asset(name="embedforge-raw-pairs", uri=_uri(SETTINGS.raw_pairs))
STUDENT_MODEL = Asset(name=MODEL_NAME, uri=f"mlflow://models/{MODEL_NAME}")

def _run_dir_name(run_id: str) -> str:
    """Airflow run ids carry ':' and '+': keep a directory name that every filesystem and S3 accepts."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


def plan_run(params: dict[str, Any], run_id: str, mode: str) -> dict[str, Any]:
    """This run's artifact paths (each stage output at its table path under the run's directory) and every
    stage's argv (`<stage> --port PATH ... --params .. --profile .. --set key=value ...`)."""
    root = SETTINGS.kubernetes_artifact_root if mode == "kubernetes" else SETTINGS.local_artifact_root
    if mode != "kubernetes" and "://" not in root:
        root = str(PROJECT / root)
    run_dir = f"{root.rstrip('/')}/{_run_dir_name(run_id)}"
    artifacts = {artifact: params[artifact] for artifact in PIPELINE_INPUTS} | {
        port.artifact: f"{run_dir}/{port.path}" for stage in STAGES.values() for port in stage.outputs}
    argv = {name: command_line(name, artifacts, params=PARAMS_FILE, profile=params["profile"], knobs=params)
            for name in STAGES}
    steps, made = curate_steps(params, run_dir)
    argv["curate"] += merge_flags(made["plan"][0], made["cluster"][0], made["dedup"])
    return {"mode": mode, "run_dir": run_dir, "pipeline_run": f"{DAG_ID}/{run_id}", "artifacts": artifacts,
            "argv": argv, "steps": steps, "shards": list(range(len(made["dedup"])))}


def curate_steps(params: dict[str, Any], run_dir: str) -> tuple[dict[str, list[list[str]]], dict[str, list[str]]]:
    """The argv of each curate shard step, one per shard where it fans out (`.expand()` maps over them), and
    the paths each step writes under `<run>/curate_steps/`. The shard count is the run's curate.shards."""
    shards = len(curate_shards(PROJECT / PARAMS_FILE, params["profile"], params))
    steps: dict[str, list[list[str]]] = {}
    made: dict[str, list[str]] = {}
    for step, (source, per_shard) in CURATE_STEPS.items():
        inputs = [params["raw_pairs"]] if source == "raw" else made[source]
        numbers: list[int | None] = list(range(shards)) if per_shard else [None]
        made[step] = [f"{run_dir}/curate_steps/{STEP_OUTPUT[step]}" + ("" if shard is None else f"/{shard:05d}")
                      for shard in numbers]
        steps[step] = [step_command_line(step, shard, inputs, out, params=PARAMS_FILE, profile=params["profile"],
                                         knobs=params) for shard, out in zip(numbers, made[step], strict=True)]
    return steps, made


def task_argv(layout: dict[str, Any], stage: str, step: str | None, shard: int | None) -> list[str]:
    """The argv of a stage's task, or of one curate step's (mapped) task."""
    return layout["argv"][stage] if step is None else layout["steps"][step][shard or 0]


def stage_environment(pipeline_run: str) -> dict[str, str]:
    """What a stage process needs from the worker: the tracking URI, this DAG run's MLflow parent key, the hub
    offline, and S3 / MLflow settings passed through."""
    passed = {key: value for key, value in os.environ.items() if key.startswith(("AWS_", "MLFLOW_"))}
    return {"MLFLOW_TRACKING_URI": tracking_uri(PROJECT), **passed, PIPELINE_RUN_ENV: pipeline_run,
            "HF_HUB_OFFLINE": "1"}


def stage_failed(stage: str, code: int) -> NoReturn:
    """A rejected input or param (exit 2) fails the task for good; an infrastructure failure (exit 75) and any
    other non-zero exit (a crash) are retried, with the DAG's retries and exponential backoff."""
    if code == USAGE_ERROR:
        raise AirflowFailException(f"embedforge {stage} rejected its input or params (exit {code}): see the log "
                                   f"above; a retry cannot help - fix the input or the run's Params and trigger again")
    if code == TEMPORARY_FAILURE:
        raise AirflowException(f"embedforge {stage} hit an infrastructure failure (exit {code}: S3, network, MLflow "
                               f"server or disk; see the log above); retrying with backoff, if retries are left")
    how = f"was killed by signal {-code}" if code < 0 else f"crashed with exit code {code}"
    raise AirflowException(f"embedforge {stage} {how} (see the log above); retrying, if retries are left")


def stage_metrics(stage: str, layout: dict[str, Any]) -> dict[str, float]:
    """The metrics file the stage wrote under this run's directory: the task's XCom."""
    return json.loads(Path(layout["artifacts"][STAGES[stage].port("metrics").artifact]).read_text())


def run_stage_subprocess(argv: list[str], pipeline_run: str) -> None:
    """Run `embedforge <stage> ...` in a subprocess of the worker, streaming its log lines into the task log."""
    command = [sys.executable, "-m", "components.cli", *argv]
    log.info("running: %s", " ".join(command))
    with subprocess.Popen(command, cwd=PROJECT, env={**os.environ, **stage_environment(pipeline_run)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            log.info("%s", line.rstrip())
    if process.returncode != 0:
        stage_failed(argv[0], process.returncode)


def bind_mount(path: Path) -> Mount:
    """A host path mounted at the same path in the container."""
    return Mount(target=str(path), source=str(path), type="bind")


class StageContainer(DockerOperator):
    """A stage in a container on the worker's Docker API (`DOCKER_HOST`: Docker, or podman's socket), on the
    project image, with the project checkout (params, raw data, this run's directory, a local MLflow store)
    mounted at its own path as the working directory: the local task's argv runs unchanged, as the worker's
    user so that what the stage writes belongs to it. Host network, so servers on the host's 127.0.0.1 (MLflow,
    S3) are reachable. The argv and environment come from `plan`'s XCom, as in `StagePod`.
    """

    def __init__(self, *, stage: Stage, step: str | None = None, shard: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("task_id", stage.name)
        super().__init__(
            image=SETTINGS.cuda_image if stage.gpu else SETTINGS.cpu_image,
            mounts=[bind_mount(PROJECT)],
            working_dir=str(PROJECT),
            user=f"{os.getuid()}:{os.getgid()}",
            network_mode="host",
            mount_tmp_dir=False,
            auto_remove="never",  # removed in `execute` once its exit code is read ("success" removes it first)
            **kwargs,
        )
        self.stage, self.step, self.shard = stage.name, step, shard

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        self.take_plan(context)

    def take_plan(self, context: Any) -> None:
        """This task's argv, environment and mounts from `plan`'s XCom: when its templates are rendered (the UI
        shows them), and again in `execute`, since Airflow renders a mapped task without this class's override."""
        layout = context["ti"].xcom_pull(task_ids="plan")
        self.command = task_argv(layout, self.stage, self.step, self.shard)
        self.environment = stage_environment(layout["pipeline_run"])
        outside = [Path(layout["run_dir"])] if not Path(layout["run_dir"]).is_relative_to(PROJECT) else []
        self.mounts = [bind_mount(path) for path in (PROJECT, *outside)]

    def execute(self, context: Any) -> dict[str, float] | None:
        self.take_plan(context)
        try:
            super().execute(context)
        except DockerContainerFailedException:
            stage_failed(self.task_id, self.cli.inspect_container(self.container["Id"])["State"]["ExitCode"])
        finally:
            if self.container is not None:
                self.cli.remove_container(self.container["Id"])
        return None if self.step else stage_metrics(self.stage, context["ti"].xcom_pull(task_ids="plan"))


class StagePod(KubernetesPodOperator):
    """A stage in a pod on the project image, running the argv `plan` laid out for this run (the local task's argv).

    The argv is a list whose length depends on the run's Params, so it is read from `plan`'s XCom when the task's
    templates are rendered (it then shows in the UI's rendered-template view) rather than templated element-wise.
    """

    def __init__(self, *, stage: Stage, step: str | None = None, shard: int | None = None,
                 cluster: ClusterSettings = CLUSTER, **kwargs: Any) -> None:
        gpu, pod = stage.gpu, cluster.pod(stage.gpu)
        kwargs.setdefault("task_id", stage.name)
        super().__init__(
            name=f"embedforge-{stage.name}" + (f"-{step}" if step else ""),
            namespace=SETTINGS.namespace,
            image=SETTINGS.cuda_image if gpu else SETTINGS.cpu_image,
            cmds=["embedforge"],
            env_from=[k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=cluster.settings_config_map)),
                      k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=cluster.credentials_secret,
                                                                          optional=True))],
            container_resources=k8s.V1ResourceRequirements(
                requests={"cpu": pod.cpu_request, "memory": pod.memory_request},
                limits={"cpu": pod.cpu_limit, "memory": pod.memory_limit,
                        **({"nvidia.com/gpu": str(pod.gpus)} if pod.gpus else {})}),
            volumes=[k8s.V1Volume(name="artifacts", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                         claim_name=SETTINGS.artifacts_claim)),
                     k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                                  size_limit=cluster.shm_size))],
            volume_mounts=[k8s.V1VolumeMount(name="artifacts", mount_path=SETTINGS.kubernetes_artifact_root),
                           k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
            node_selector=cluster.gpu_node_selector if gpu else None,
            tolerations=[k8s.V1Toleration(**toleration.model_dump()) for toleration in cluster.gpu_tolerations]
            if gpu else None,
            active_deadline_seconds=pod.timeout_seconds,
            execution_timeout=timedelta(seconds=pod.timeout_seconds),
            labels={"app.kubernetes.io/part-of": "embedforge", "embedforge/stage": stage.name},
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            **kwargs,
        )
        self.stage, self.step, self.shard = stage.name, step, shard

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod) -> None:
        """The provider reports any failed pod as one retryable error: read the stage container's exit code
        instead, so that a rejected input (2) fails for good here too."""
        try:
            super().cleanup(pod, remote_pod)
        except AirflowException:
            statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
            stage = next((status for status in statuses if status.name == self.base_container_name), None)
            terminated = stage.state.terminated if stage and stage.state else None
            if terminated and terminated.exit_code:
                stage_failed(self.task_id, terminated.exit_code)
            raise

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        self.take_plan(context)

    def take_plan(self, context: Any) -> None:
        """This task's argv and run key from `plan`'s XCom (see `StageContainer.take_plan`)."""
        layout = context["ti"].xcom_pull(task_ids="plan")
        self.arguments = task_argv(layout, self.stage, self.step, self.shard)
        self.env_vars = [k8s.V1EnvVar(name=PIPELINE_RUN_ENV, value=layout["pipeline_run"])]

    def execute(self, context: Any) -> Any:
        self.take_plan(context)
        return super().execute(context)


def knob_param(knob: str) -> Param:
    """A run Param for a pipeline knob, typed and described by the stage param it sets (its config field's JSON
    schema); empty keeps the profile's value."""
    stage, key = KNOBS[knob]
    field, *entry = key.split(".")
    schema = STAGES[stage].config_class.model_json_schema()["properties"][field]
    if entry:  # one entry of a mapping param, e.g. quantize's models.base
        schema = {**schema["additionalProperties"], "description": f"{schema['description']} (entry {entry[0]})"}
    bounds = {name: value for name, value in schema.items()
              if name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "items", "minItems")}
    return Param(None, type=["null", schema["type"]], **bounds,
                 description=f"{stage}.{key}: {schema['description']} Empty: the profile's value.")


@dag(
    dag_id=DAG_ID,
    description="Retrain the embedforge student: curate, mine, train, distill, quantize, index, evaluate, register",
    # A newly deployed DAG waits for the next cron tick instead of retraining at once: no start_date, and
    # run_immediately=timedelta(0) (Airflow 3.3 treats `False` like its default, a 10%-of-the-period grace).
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(SETTINGS.schedule, timezone="UTC",
                                                                run_immediately=timedelta(0)),
                                 assets=[RAW_PAIRS]),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": SETTINGS.retries,
        "retry_delay": timedelta(seconds=SETTINGS.retry_delay_seconds),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=SETTINGS.max_retry_delay_seconds),
    },
    tags=["embedforge", "retraining"],
    params={
        "profile": Param(PARAMS.get("profile", "default"), type="string", enum=PROFILES,
                         description="params.yaml profile: smoke (minutes), default (CPU: under 30 min on 2 AVX2 "
                                     "cores), medium (about an hour), full (hours on CPU), gpu."),
        "mode": Param(None, type=["null", "string"], enum=[None, *MODES],
                      description="Where stages run: local subprocesses, containers on the worker's Docker API, or "
                                  "Kubernetes pods. Empty: the Airflow "
                                  f"Variable embedforge_mode, else params.yaml ({SETTINGS.mode})."),
        "raw_pairs": Param(SETTINGS.raw_pairs, type="string", minLength=1,
                           description="Raw pairs (JSONL, JSONL.gz or Parquet): a path under the project or a URI."),
        "general_text": Param(SETTINGS.general_text, type="string", minLength=1,
                              description="General-domain texts distillation mixes in (JSONL or JSONL.gz of "
                                          "{\"text\": ...}): a path under the project or a URI."),
        "ood_sets": Param(SETTINGS.ood_sets, type="string", minLength=1,
                          description="Folder of out-of-domain BEIR sets evaluate scores every model on: a path "
                                      "under the project (or in the image)."),
        **{knob: knob_param(knob) for knob in KNOBS},
    },
    doc_md=__doc__,
)
def embedforge_retrain() -> None:
    @task
    def plan() -> dict[str, Any]:
        """Resolve the mode and lay out this run's artifacts and stage command lines."""
        context = get_current_context()
        params = dict(context["params"])
        mode = params.get("mode") or Variable.get("embedforge_mode", default=SETTINGS.mode)
        if mode not in MODES:
            raise AirflowFailException(f"mode {mode!r} (Param or Variable embedforge_mode): use one of "
                                       f"{', '.join(MODES)}")
        layout = plan_run(params, context["run_id"], mode)
        log.info("mode %s, artifacts under %s", mode, layout["run_dir"])
        return layout

    @task.branch
    def choose_mode(layout: dict[str, Any]) -> str:
        return f"{layout['mode']}.curate_{next(iter(CURATE_STEPS))}"

    @task
    def run_locally(stage: str, layout: dict[str, Any]) -> dict[str, float]:
        """One stage in a subprocess; its metrics become the task's XCom."""
        run_stage_subprocess(layout["argv"][stage], layout["pipeline_run"])
        return stage_metrics(stage, layout)

    @task
    def run_step_locally(step: str, layout: dict[str, Any], shard: int | None = None) -> None:
        """One curate shard step in a subprocess."""
        run_stage_subprocess(task_argv(layout, "curate", step, shard), layout["pipeline_run"])

    @task
    def curate_shards(layout: dict[str, Any]) -> list[int]:
        """The shard numbers the curate steps fan out over (`.expand()`): the run's curate.shards."""
        return layout["shards"]

    def fanned_out(make: Callable[[str, int | None], Any], shards: Any) -> list[Any]:
        """Each curate step's task, mapped over the shards where it runs per shard, then each stage's task."""
        return [make(step, shards if per_shard else None) for step, (_, per_shard) in CURATE_STEPS.items()]

    @task(trigger_rule="none_failed_min_one_success", outlets=[STUDENT_MODEL])
    def publish(layout: dict[str, Any]) -> dict[str, Any]:
        """Emit the model Asset with this run's MLflow parent run, and log where to look."""
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(PROJECT)
        found = find_pipeline_run(MlflowClient(uri), layout["pipeline_run"])
        if found is None:
            raise AirflowFailException(f"no MLflow pipeline run tagged {layout['pipeline_run']!r} at {uri}")
        run = found.info
        link = (f"{uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
                if uri.startswith("http") else f"run {run.run_id} in {uri} (see `mlflow ui`)")
        log.info("MLflow pipeline run: %s", link)
        summary = {"mlflow_run_id": run.run_id, "mlflow_run": link, "artifacts": layout["run_dir"]}
        get_current_context()["outlet_events"][STUDENT_MODEL].extra = summary
        return summary

    def local_step(step: str, shards: Any) -> Any:
        task = run_step_locally.override(task_id=f"curate_{step}")
        return task(step, layout) if shards is None else task.partial(step=step, layout=layout).expand(shard=shards)

    def operator_step(operator: type[StageContainer | StagePod]) -> Callable[[str, Any], Any]:
        def make(step: str, shards: Any) -> Any:
            settings = {"task_id": f"curate_{step}", "stage": STAGES["curate"], "step": step}
            return operator(**settings) if shards is None else operator.partial(**settings).expand(shard=shards)
        return make

    layout = plan()
    shards = curate_shards(layout)
    branch = choose_mode(layout)
    with TaskGroup("local") as local:
        chain(*fanned_out(local_step, shards), *[run_locally.override(task_id=stage)(stage, layout)
                                                 for stage in STAGES])
    with TaskGroup("docker") as docker:
        chain(*fanned_out(operator_step(StageContainer), shards), *[StageContainer(stage=stage)
                                                                   for stage in STAGES.values()])
    with TaskGroup("kubernetes") as kubernetes:
        chain(*fanned_out(operator_step(StagePod), shards), *[StagePod(stage=stage) for stage in STAGES.values()])
    shards >> branch
    branch >> [local, docker, kubernetes] >> publish(layout)


embedforge_retrain()
