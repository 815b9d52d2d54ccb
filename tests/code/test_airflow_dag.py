"""The Airflow adapter's DAG: parses cleanly, wires every stage the way dvc.yaml does, and renders its pods.

These tests need no Airflow database or cluster: the DAG file is parsed with a DagBag and the Kubernetes tasks
render their pod specs offline. Running the DAG for real is in tests/e2e/test_airflow_dags.py.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.stages import CURATE_STEPS, PIPELINE_INPUTS
from components.stages import STAGES as STAGE_TABLE
from tests.helpers import REPO_ROOT

STAGES = list(STAGE_TABLE)

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="embedforge-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

RUN_ID = "manual__2026-11-23T03:00:00+00:00"


@pytest.fixture(scope="module")
def dagbag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


@pytest.fixture(scope="module")
def dag(dagbag: Any) -> Any:
    return dagbag.dags["embedforge_retrain"]


@pytest.fixture(scope="module")
def retrain_module() -> Any:
    spec = importlib.util.spec_from_file_location("embedforge_retrain",
                                                  REPO_ROOT / "dags" / "embedforge_retrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the settings' annotations through it
    spec.loader.exec_module(module)
    return module


def _default_params(dag: Any) -> dict[str, Any]:
    return {name: param.value for name, param in dag.params.items()}


def test_dag_files_import_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"embedforge_retrain"}


def test_every_stage_is_a_task_in_every_mode_in_pipeline_order_without_cycles(dag: Any) -> None:
    """Each mode: curate's shard steps (the per-shard ones mapped over the shards), the curate merge, then every
    other stage in order."""
    dag.check_cycle()
    steps = [f"curate_{step}" for step in CURATE_STEPS]
    for mode in ("local", "docker", "kubernetes"):
        tasks = [*steps, *STAGES]
        for upstream, downstream in zip(tasks, tasks[1:]):
            assert f"{mode}.{upstream}" in dag.get_task(f"{mode}.{downstream}").upstream_task_ids
        assert dag.get_task(f"{mode}.{tasks[0]}").upstream_task_ids >= {"choose_mode"}
        assert f"{mode}.{STAGES[-1]}" in dag.get_task("publish").upstream_task_ids
        mapped = {step for step in steps if dag.get_task(f"{mode}.{step}").is_mapped}
        assert mapped == {f"curate_{step}" for step, (_, per_shard) in CURATE_STEPS.items() if per_shard}
    assert dag.get_task("publish").trigger_rule == "none_failed_min_one_success"


def test_plan_lays_out_the_curate_steps_over_the_runs_shard_count(dag: Any, retrain_module: Any) -> None:
    """The smoke profile's 3 shards: 3 argvs for each per-shard step, each step reading what the one before
    wrote, and the curate merge reading the plan, the clustering and every group's pairs."""
    layout = retrain_module.plan_run(_default_params(dag) | {"profile": "smoke", "eps": 0.1}, RUN_ID, "local")
    assert layout["shards"] == [0, 1, 2]
    steps = layout["steps"]
    assert [len(steps[step]) for step in CURATE_STEPS] == [3, 1, 3, 1, 3]
    prepared = [argv[argv.index("--out") + 1] for argv in steps["prepare"]]
    plan = steps["plan"][0]
    assert plan[plan.index("--prepared") + 1:plan.index("--out")] == prepared
    assert [argv[argv.index("--shard") + 1] for argv in steps["embed"]] == ["0", "1", "2"]
    assert all(argv[argv.index("--set") + 1] == "eps=0.1" for step in steps.values() for argv in step)
    curate = layout["argv"]["curate"]
    near_duplicates = [argv[argv.index("--out") + 1] for argv in steps["dedup"]]
    assert curate[curate.index("--near-duplicates") + 1:] == near_duplicates


def test_dag_runs_weekly_by_the_params_cron_and_when_raw_data_is_updated(dag: Any, retrain_module: Any) -> None:
    from airflow.timetables.assets import AssetOrTimeSchedule

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable._expression == params["airflow"]["schedule"]
    assert retrain_module.RAW_PAIRS.uri.endswith(params["airflow"]["raw_pairs"])
    assert "Triggered by assets" in dag.timetable.description and "Monday" in dag.timetable.description


def test_a_newly_deployed_dag_waits_for_the_next_cron_tick_instead_of_running_at_once(dag: Any) -> None:
    from airflow.sdk import timezone
    from airflow.timetables.base import TimeRestriction

    first = dag.timetable.next_dagrun_info(last_automated_data_interval=None,
                                           restriction=TimeRestriction(earliest=None, latest=None, catchup=False))
    assert first.run_after > timezone.utcnow()


def test_every_trigger_form_param_has_a_type_and_a_description(dag: Any) -> None:
    for name, param in dag.params.items():
        assert param.schema.get("type"), name
        assert len(param.description or "") > 20, name
    assert dag.params.get_param("profile").schema["enum"] == ["default", "full", "gpu", "medium", "smoke"]


@pytest.mark.parametrize(("name", "value"), [
    ("eps", 1.5), ("eps", "0.1"), ("num_negatives", 0), ("epochs", 0), ("profile", "tiny"),
    ("mode", "cloud"), ("student_layers", [-1]), ("matryoshka_dims", []),
])
def test_trigger_form_rejects_out_of_range_or_mistyped_values(dag: Any, name: str, value: Any) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_each_stage_gets_the_artifact_flags_dvc_yaml_gives_it(dag: Any, retrain_module: Any) -> None:
    dvc_stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    layout = retrain_module.plan_run(_default_params(dag), RUN_ID, "local")
    for stage in STAGES:
        dvc_flags = {part for part in shlex.split(dvc_stages[stage]["cmd"]) if part.startswith("--")}
        argv = layout["argv"][stage]
        assert argv[0] == stage
        merge = {"--plan", "--clustered", "--near-duplicates"}  # curate merges its fanned-out steps
        assert {part for part in argv if part.startswith("--")} - {"--profile", "--set"} - merge == dvc_flags, stage


def test_plan_puts_a_run_under_its_own_directory_and_turns_params_into_overrides(dag: Any,
                                                                                  retrain_module: Any) -> None:
    params = _default_params(dag) | {"profile": "smoke", "eps": 0.1, "student_layers": [0, 3], "epochs": None}
    layout = retrain_module.plan_run(params, RUN_ID, "local")
    assert layout["run_dir"] == str(REPO_ROOT / "airflow_runs" / "manual__2026-11-23T03_00_00_00_00")
    assert all(path.startswith(layout["run_dir"]) for name, path in layout["artifacts"].items()
               if name not in PIPELINE_INPUTS)
    curate, distill, train = layout["argv"]["curate"], layout["argv"]["distill"], layout["argv"]["train"]
    assert curate[curate.index("--profile") + 1] == "smoke"
    assert curate[curate.index("--set") + 1] == "eps=0.1"
    assert distill[distill.index("--set") + 1] == "layers=[0, 3]"
    assert "--set" not in train  # an empty Param keeps the profile's value
    quantize = layout["argv"]["quantize"]
    assert quantize[quantize.index("--student") + 1] == layout["artifacts"]["student"]
    assert "--set" not in quantize  # base_model empty: the profile's quantize.models.base


class PlanXCom:
    """What a task instance's `xcom_pull` returns for the `plan` task of one run (the only XCom the pods read)."""

    def __init__(self, layout: dict[str, Any]) -> None:
        self.layout = layout

    def xcom_pull(self, task_ids: str, **_: Any) -> dict[str, Any]:
        assert task_ids == "plan"
        return self.layout


@pytest.fixture
def offline_kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig naming a cluster that is never contacted: building a pod spec only reads the config."""
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "offline",
              "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
              "users": [{"name": "offline", "user": {"token": "not-a-secret"}}],
              "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stage", STAGES)
def test_kubernetes_mode_renders_a_pod_running_the_stage_cli_on_the_project_image(
        dag: Any, retrain_module: Any, stage: str, offline_kubeconfig: Path) -> None:
    settings = retrain_module.SETTINGS
    layout = retrain_module.plan_run(_default_params(dag), RUN_ID, "kubernetes")
    operator = dag.get_task(f"kubernetes.{stage}")
    operator.config_file = str(offline_kubeconfig)  # the worker's own kubeconfig in a deployment
    operator.render_template_fields({"ti": PlanXCom(layout), "params": _default_params(dag), "run_id": RUN_ID})
    pod = operator.build_pod_request_obj()

    container = pod.spec.containers[0]
    gpu = STAGE_TABLE[stage].gpu
    assert container.image == (settings.cuda_image if gpu else settings.cpu_image)
    assert container.command == ["embedforge"]
    assert container.args == layout["argv"][stage]
    assert all(path.startswith(settings.kubernetes_artifact_root + "/") for path in container.args
               if path.startswith("/"))
    cluster = retrain_module.CLUSTER
    resources = cluster.gpu_pod if gpu else cluster.cpu_pod
    assert (container.resources.limits.get("nvidia.com/gpu") == "1") is gpu
    assert container.resources.requests == {"cpu": resources.cpu_request, "memory": resources.memory_request}
    assert container.resources.limits["memory"] == resources.memory_limit
    assert [mount.mount_path for mount in container.volume_mounts] == [settings.kubernetes_artifact_root, "/dev/shm"]
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == settings.artifacts_claim
    assert (pod.spec.volumes[1].empty_dir.medium, pod.spec.volumes[1].empty_dir.size_limit) == \
        ("Memory", cluster.shm_size)
    assert pod.spec.active_deadline_seconds == resources.timeout_seconds
    assert operator.execution_timeout.total_seconds() == resources.timeout_seconds
    assert (pod.spec.node_selector or {}) == (cluster.gpu_node_selector if gpu else {})
    assert [toleration.key for toleration in pod.spec.tolerations or []] == \
        ([toleration.key for toleration in cluster.gpu_tolerations] if gpu else [])
    env = {item.name: item.value for item in container.env}
    assert env == {"EMBEDFORGE_PIPELINE_RUN": f"embedforge_retrain/{RUN_ID}"}
    assert {source.config_map_ref.name for source in container.env_from if source.config_map_ref} == \
        {retrain_module.CLUSTER.settings_config_map}
    assert pod.metadata.namespace == settings.namespace


@pytest.mark.parametrize("stage", STAGES)
def test_docker_mode_runs_the_stage_cli_in_a_container_of_the_project_image_on_the_project_checkout(
        dag: Any, retrain_module: Any, stage: str) -> None:
    settings, project = retrain_module.SETTINGS, str(retrain_module.PROJECT)
    layout = retrain_module.plan_run(_default_params(dag), RUN_ID, "docker")
    operator = dag.get_task(f"docker.{stage}")
    operator.render_template_fields({"ti": PlanXCom(layout), "params": _default_params(dag), "run_id": RUN_ID})
    assert operator.image == (settings.cuda_image if STAGE_TABLE[stage].gpu else settings.cpu_image)
    assert operator.command == layout["argv"][stage]  # after the image's `embedforge` entrypoint
    assert layout["run_dir"].startswith(project + "/")
    assert [(mount["Source"], mount["Target"]) for mount in operator.mounts] == [(project, project)]
    assert operator.working_dir == project and operator.network_mode == "host"
    assert operator.user == f"{os.getuid()}:{os.getgid()}"
    assert operator.environment["EMBEDFORGE_PIPELINE_RUN"] == f"embedforge_retrain/{RUN_ID}"
    assert operator.environment["MLFLOW_TRACKING_URI"] and operator.environment["HF_HUB_OFFLINE"] == "1"


class ContainerApi:
    """The Docker API calls a StageContainer makes, answering that the container exited with `code`."""

    def __init__(self, code: int) -> None:
        self.code, self.removed = code, []

    def inspect_container(self, container: str) -> dict[str, Any]:
        return {"State": {"ExitCode": self.code}}

    def remove_container(self, container: str) -> None:
        self.removed.append(container)


@pytest.mark.parametrize("code", [0, 2])
def test_a_mapped_curate_step_container_runs_its_shards_argv_and_is_removed_after_its_exit_code_is_read(
        dag: Any, retrain_module: Any, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow renders a mapped task without the operator's own render_template_fields, so the argv is taken
    from the plan again when it executes; the container is kept until its exit code is read (a provider setting
    of auto_remove="success" removes a failed one first), then removed."""
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator
    from airflow.sdk.exceptions import AirflowFailException

    layout = retrain_module.plan_run(_default_params(dag) | {"profile": "smoke"}, RUN_ID, "docker")
    operator = retrain_module.StageContainer(task_id="curate_prepare_1", stage=STAGE_TABLE["curate"],
                                             step="prepare", shard=1)
    api, ran = ContainerApi(code), []

    def run(self: Any, context: Any) -> None:
        ran.append(self.command)
        self.container = {"Id": "c1"}
        if code:
            raise DockerContainerFailedException("failed", logs=[])

    monkeypatch.setattr(DockerOperator, "execute", run)
    monkeypatch.setattr(retrain_module.StageContainer, "cli", api, raising=False)
    if code:
        with pytest.raises(AirflowFailException, match="exit 2"):
            operator.execute({"ti": PlanXCom(layout)})
    else:
        assert operator.execute({"ti": PlanXCom(layout)}) is None  # a step has no metrics of its own
    assert ran == [layout["steps"]["prepare"][1]] and api.removed == ["c1"]
    assert operator.auto_remove == "never"


@pytest.mark.parametrize(("code", "retried", "says"), [
    (2, False, "rejected its input or params (exit 2): see the log above; a retry cannot help"),
    (75, True, "infrastructure failure (exit 75: S3, network, MLflow server or disk"),
    (1, True, "crashed with exit code 1"),
    (-9, True, "was killed by signal 9"),
], ids=["usage", "tempfail", "crash", "killed"])
def test_a_stage_that_rejects_its_input_fails_for_good_and_any_other_failure_is_retried(
        retrain_module: Any, code: int, retried: bool, says: str) -> None:
    import re

    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from components.cli import EXIT_TEMPFAIL, EXIT_USAGE

    assert (retrain_module.USAGE_ERROR, retrain_module.TEMPORARY_FAILURE) == (EXIT_USAGE, EXIT_TEMPFAIL)
    with pytest.raises(AirflowException, match=re.escape(says)) as failed:
        retrain_module.stage_failed("curate", code)
    assert isinstance(failed.value, AirflowFailException) is not retried
    assert ("retrying" in str(failed.value)) is retried


@pytest.mark.parametrize(("exit_code", "retried"), [(2, False), (75, True), (1, True)])
def test_kubernetes_mode_fails_a_rejected_input_for_good_and_retries_the_rest(
        dag: Any, exit_code: int, retried: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from kubernetes.client import models as k8s

    operator = dag.get_task("kubernetes.curate")
    terminated = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code))
    remote_pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="embedforge-curate-x", namespace="embedforge"),
                           status=k8s.V1PodStatus(phase="Failed", container_statuses=[k8s.V1ContainerStatus(
                               name=operator.base_container_name, state=terminated, image="i", image_id="i",
                               ready=False, restart_count=0)]))
    for cluster_call in ("is_istio_enabled", "patch_already_checked", "process_pod_deletion", "_read_pod_events"):
        monkeypatch.setattr(operator, cluster_call, lambda *_, **__: False)  # no cluster here to ask
    with pytest.raises(AirflowException) as failed:
        operator.cleanup(remote_pod, remote_pod)
    assert isinstance(failed.value, AirflowFailException) is not retried
