"""infra/: the compose stack and the Kubernetes manifests, checked statically (no Docker engine, no cluster here).

Kubernetes: every manifest parses; the kustomizations are rendered here (base resources, overlay patches: JSON 6902
and strategic-merge on maps) since there is no kustomize binary; core kinds are validated against the bundled
Kubernetes schemas (kubernetes-validate, strict); the PyTorchJob, a CRD with no bundled schema, is checked field by
field. Compose: parsed and checked for images, healthchecks, dependencies, volumes, ports and secrets, and its
services cross-checked against infra/README.md.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from components.stages import IMAGES
from tests.helpers import REPO_ROOT, run_python

INFRA = REPO_ROOT / "infra"
K8S = INFRA / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
COMPOSE = INFRA / "compose.yaml"
KUBERNETES_VERSION = "1.33.0"
CLUSTER_SCOPED = {"Namespace"}
ONE_SHOT_SERVICES = {"minio-create-buckets", "airflow-init"}
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
AIRFLOW_SETTINGS = PARAMS.get("airflow") or {}

Resource = dict[str, Any]


def load_yaml_documents(path: Path) -> list[Any]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def resource_key(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to maps (the only shape the overlays' merge patches use)."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = merge_patch(target.get(key), value) if key in target else copy.deepcopy(value)
        return merged
    return copy.deepcopy(patch)


def render(directory: Path) -> dict[tuple[str, str], Resource]:
    """A kustomization's resources, by (kind, name), with namespace and patches applied."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources: dict[tuple[str, str], Resource] = {}
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory / 'kustomization.yaml'} lists {entry}, which does not exist"
        documents = list(render(path).values()) if path.is_dir() else load_yaml_documents(path)
        for resource in documents:
            assert resource_key(resource) not in resources, f"duplicate {resource_key(resource)}"
            resources[resource_key(resource)] = resource
    if "namespace" in kustomization:
        for resource in resources.values():
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    for patch in kustomization.get("patches", []):
        document = yaml.safe_load((directory / patch["path"]).read_text())
        if "target" in patch:  # JSON 6902
            target = patch["target"]
            key = (target["kind"], target["name"])
            assert key in resources, f"{patch['path']} targets {key}, which is not a resource"
            assert resources[key]["apiVersion"] == f"{target['group']}/{target['version']}"
            resources[key] = jsonpatch.apply_patch(resources[key], document)
        else:  # strategic merge: the patch names its target
            key = resource_key(document)
            assert key in resources, f"{patch['path']} patches {key}, which is not a resource"
            resources[key] = merge_patch(resources[key], document)
    return resources


def rendered(overlay: str) -> dict[tuple[str, str], Resource]:
    return render(K8S / "overlays" / overlay)


def replica_specs(resources: dict[tuple[str, str], Resource]) -> dict[str, Resource]:
    return resources[("PyTorchJob", "embedforge-train")]["spec"]["pytorchReplicaSpecs"]


def training_container(replica: Resource) -> Resource:
    (container,) = replica["template"]["spec"]["containers"]
    return container


def env_value(container: Resource, name: str) -> str:
    (value,) = [entry["value"] for entry in container["env"] if entry["name"] == name]
    return value


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def variable_references(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", text))


def env_file_keys(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


# --- Kubernetes: parse, render, validate ----------------------------------------------------------------------


def test_every_manifest_parses_as_yaml() -> None:
    paths = sorted(K8S.rglob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        assert load_yaml_documents(path), f"{path} is empty"


def test_the_base_kustomization_lists_every_file_in_base() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    present = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_the_example_secret_is_outside_every_kustomization_and_holds_placeholders_only() -> None:
    example = K8S / "secret-credentials.example.yaml"
    (secret,) = load_yaml_documents(example)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "embedforge-credentials"
    assert all(value.startswith("placeholder-") for value in secret["stringData"].values())
    for overlay in ["base", *OVERLAYS]:
        assert ("Secret", "embedforge-credentials") not in render(BASE if overlay == "base" else K8S / "overlays" /
                                                                    overlay)
    assert not any(document.get("kind") == "Secret" for path in BASE.glob("*.yaml")
                   for document in load_yaml_documents(path))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_the_base_with_its_patches_applied_to_existing_resources(overlay: str) -> None:
    resources = rendered(overlay)
    assert set(resources) == set(render(BASE))
    assert all(resource["metadata"].get("namespace") == "embedforge" for key, resource in resources.items()
               if key[0] not in CLUSTER_SCOPED)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_core_kinds_validate_strictly_against_the_kubernetes_schemas(overlay: str) -> None:
    resources = render(BASE) if overlay == "base" else rendered(overlay)
    core = [resource for resource in resources.values() if resource["apiVersion"] in ("v1", "batch/v1")]
    assert {resource["kind"] for resource in core} == {"Namespace", "PersistentVolumeClaim", "ConfigMap", "Job"}
    for resource in core:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_schema_validation_can_fail() -> None:
    job = copy.deepcopy(render(BASE)[("Job", "embedforge-kfp-submit")])
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_the_settings_config_map_holds_the_tracking_uri_and_s3_endpoint_and_no_credentials() -> None:
    data = render(BASE)[("ConfigMap", "embedforge-settings")]["data"]
    assert data["MLFLOW_TRACKING_URI"].startswith("http://")
    assert data["MLFLOW_S3_ENDPOINT_URL"].startswith("http://")
    assert data["KFP_HOST"].startswith("http://")
    assert not any(re.search("SECRET|PASSWORD|TOKEN|ACCESS_KEY", key) for key in data)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_the_profile_every_overlay_runs_is_defined_in_params_yaml(overlay: str) -> None:
    resources = render(BASE) if overlay == "base" else rendered(overlay)
    profile = resources[("ConfigMap", "embedforge-settings")]["data"]["EMBEDFORGE_PROFILE"]
    assert profile == "default" or profile in PARAMS["profiles"]


def test_the_names_match_what_the_airflow_dag_mounts_and_reads() -> None:
    resources = render(BASE)
    expected = {"namespace": "embedforge", "artifacts_claim": "embedforge-artifacts",
                "kubernetes_artifact_root": "/artifacts"}
    for key, value in expected.items():
        assert AIRFLOW_SETTINGS.get(key, value) == value, f"params.yaml airflow.{key}"
    cluster = PARAMS["kubernetes"]
    assert (cluster["settings_config_map"], cluster["credentials_secret"]) == \
        ("embedforge-settings", "embedforge-credentials")
    assert set(cluster["config_map_keys"]) <= set(resources[("ConfigMap", "embedforge-settings")]["data"])
    assert ("Namespace", "embedforge") in resources
    assert ("PersistentVolumeClaim", "embedforge-artifacts") in resources
    assert ("ConfigMap", "embedforge-settings") in resources


def test_the_kfp_submit_job_runs_the_pipeline_adapter_on_the_cpu_image_as_non_root() -> None:
    job = render(BASE)[("Job", "embedforge-kfp-submit")]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGES["cpu"]
    assert container["command"] == ["python", "-m", "pipelines.kfp_pipeline"]
    assert container["args"] == ["submit", "--host", "$(KFP_HOST)", "-p", "profile=$(EMBEDFORGE_PROFILE)"]
    assert {"configMapRef": {"name": "embedforge-settings"}} in container["envFrom"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001


def test_the_kfp_submit_command_is_one_the_pipeline_adapter_accepts() -> None:
    result = run_python(["-m", "pipelines.kfp_pipeline", "submit", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "--param" in result.stdout


# --- the PyTorchJob --------------------------------------------------------------------------------------------


def test_the_pytorchjob_is_a_training_operator_v1_job_with_master_and_worker() -> None:
    job = render(BASE)[("PyTorchJob", "embedforge-train")]
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["metadata"]["namespace"] == "embedforge"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1
    for spec in specs.values():
        assert spec["restartPolicy"] in ("OnFailure", "Never", "ExitCode", "Always")


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_replica_runs_torchrun_on_the_train_stage_in_a_container_named_pytorch(overlay: str) -> None:
    resources = render(BASE) if overlay == "base" else rendered(overlay)
    for role, replica in replica_specs(resources).items():
        container = training_container(replica)
        assert container["name"] == "pytorch", "the Training Operator requires the container name `pytorch`"
        assert container["image"] == IMAGES["cuda"]
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert "--nproc_per_node=$(GPUS)" in args and "--nnodes=$(NNODES)" in args
        assert "--node_rank=$(RANK)" in args and "--master_addr=$(MASTER_ADDR)" in args
        module = args.index("-m")
        assert args[module + 1] == "components.train"
        assert replica["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, role


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_replica_runs_the_command_line_the_distributed_training_tests_run(overlay: str) -> None:
    """tests/code/test_distributed_training.py launches the base Master's command line (its variables filled in
    for two pods of one process, and one pod of two): the Workers and the overlays must run that same line."""
    from tests.code.test_distributed_training import pytorchjob_command

    resources = render(BASE) if overlay == "base" else rendered(overlay)
    for role, replica in replica_specs(resources).items():
        container = training_container(replica)
        assert [*container["command"], *container["args"]] == pytorchjob_command(), role
        # With torchrun's static rendezvous an in-place restart of several pods hangs (seen on CPU): a failed
        # process must fail its pod, for the operator to restart the pods and the stage to resume.
        assert not [arg for arg in container["args"] if arg.startswith(("--max-restarts", "--max_restarts"))]


def test_the_train_command_uses_only_flags_the_train_stage_has() -> None:
    container = training_container(replica_specs(render(BASE))["Master"])
    args = container["args"]
    stage_flags = [word for word in args[args.index("components.train") + 1:] if word.startswith("--")]
    assert {"--params", "--mined", "--curated", "--output", "--checkpoints"} <= set(stage_flags)
    result = run_python(["-m", "components.train", "--help"])
    assert result.returncode == 0, result.stderr
    for flag in stage_flags:
        assert re.search(rf"\s{re.escape(flag)}\b", result.stdout), f"components.train has no {flag}"
    for path in args[args.index("components.train") + 1:]:
        if path.startswith("/"):
            assert path.startswith("/artifacts/"), f"{path} is not on the shared volume"


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_gpu_limits_match_the_processes_per_node_and_nnodes_matches_the_pods(overlay: str) -> None:
    resources = render(BASE) if overlay == "base" else rendered(overlay)
    specs = replica_specs(resources)
    pods = sum(spec["replicas"] for spec in specs.values())
    for spec in specs.values():
        container = training_container(spec)
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(env_value(container, "GPUS")) == gpus >= 1
        assert container["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus
        assert int(env_value(container, "NNODES")) == pods


def test_the_overlays_size_the_training_as_documented() -> None:
    dev = replica_specs(rendered("dev"))
    assert set(dev) == {"Master"}
    assert training_container(dev["Master"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    cluster = replica_specs(rendered("gpu-cluster"))
    assert sum(spec["replicas"] for spec in cluster.values()) == 2
    assert {training_container(spec)["resources"]["limits"]["nvidia.com/gpu"] for spec in cluster.values()} == {8}


def test_the_training_replicas_mount_the_artifacts_claim_and_read_credentials_from_the_secret() -> None:
    for replica in replica_specs(render(BASE)).values():
        pod = replica["template"]["spec"]
        container = training_container(replica)
        claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]
                  if "persistentVolumeClaim" in volume}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert claims[mounts["/artifacts"]] == "embedforge-artifacts"
        secret_refs = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in container["env"]
                       if "valueFrom" in entry}
        assert {ref["name"] for ref in secret_refs.values()} == {"embedforge-credentials"}
        assert set(secret_refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert all("value" not in entry for entry in container["env"] if entry["name"] in secret_refs)


def test_the_pod_templates_of_the_pytorchjob_are_valid_kubernetes_pod_specs() -> None:
    for replica in replica_specs(rendered("gpu-cluster")).values():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check", **replica["template"]["metadata"]},
               "spec": replica["template"]["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


# --- compose ---------------------------------------------------------------------------------------------------


def test_the_compose_stack_has_the_team_services() -> None:
    assert set(services()) == {"postgres", "minio", "minio-create-buckets", "mlflow", "airflow-init",
                               "airflow-api-server", "airflow-scheduler", "airflow-dag-processor"}


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in services().items():
        assert "image" in service or "build" in service, name


def test_images_are_pinned_to_a_tag() -> None:
    for name, service in services().items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_every_long_running_service_has_a_healthcheck_and_one_shot_services_do_not_restart() -> None:
    for name, service in services().items():
        if name in ONE_SHOT_SERVICES:
            assert service["restart"] == "no", name
        else:
            test = service["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_every_dependency_exists_and_waits_for_health_or_completion() -> None:
    stack = services()
    for name, service in stack.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in stack, f"{name} depends on unknown {dependency}"
            expected = ("service_completed_successfully" if dependency in ONE_SHOT_SERVICES else "service_healthy")
            assert condition == {"condition": expected}, f"{name} -> {dependency}"
            if expected == "service_healthy":
                assert "healthcheck" in stack[dependency]


def test_the_services_start_in_a_sensible_order() -> None:
    stack = services()
    assert set(stack["mlflow"]["depends_on"]) >= {"postgres", "minio-create-buckets"}
    assert "minio" in stack["minio-create-buckets"]["depends_on"]
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor"):
        assert "airflow-init" in stack[name]["depends_on"]
    assert "postgres" in stack["airflow-init"]["depends_on"]


def test_named_volumes_are_declared_and_data_services_persist_to_them() -> None:
    declared = set(compose()["volumes"])
    used: set[str] = set()
    for service in services().values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
    assert any(volume.startswith("postgres-data:") for volume in services()["postgres"]["volumes"])
    assert any(volume.startswith("minio-data:") for volume in services()["minio"]["volumes"])


def test_bind_mounts_point_at_files_in_the_repository() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name} mounts {source}, which does not exist"
    build = services()["mlflow"]["build"]
    assert (INFRA / build["context"] / "Dockerfile").is_file()


def test_published_ports_are_bound_to_localhost_only() -> None:
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
            published += 1
    assert published >= 3


def test_secrets_come_only_from_the_env_file() -> None:
    secret_name = re.compile(r"PASSWORD|SECRET|FERNET|_KEY$|ACCESS_KEY|TOKEN|SQL_ALCHEMY_CONN|BACKEND_STORE_URI")
    for name, service in services().items():
        for key, value in (service.get("environment") or {}).items():
            if secret_name.search(key) and not key.endswith("_FILE"):
                assert "${" in str(value), f"{name}: {key} is written in the compose file"
    for key in variable_references(COMPOSE.read_text()):
        assert key in env_file_keys(INFRA / ".env.example"), f"{key} is missing from infra/.env.example"


def test_the_env_example_holds_placeholders_and_the_real_env_file_is_ignored() -> None:
    example = env_file_keys(INFRA / ".env.example")
    for key, value in example.items():
        if re.search("PASSWORD|SECRET|KEY", key):
            assert value.startswith("change-me-"), key
    assert set(example) == variable_references(COMPOSE.read_text())
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "infra/.env must be ignored by git"


def test_mlflow_serves_artifacts_from_s3_with_a_postgres_backend_store() -> None:
    mlflow = services()["mlflow"]
    command = [*mlflow["entrypoint"], *mlflow["command"]]
    assert command[:2] == ["mlflow", "server"]
    assert "--artifacts-destination=s3://mlflow-artifacts" in command
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    buckets = services()["minio-create-buckets"]["command"][0]
    assert "stack/mlflow-artifacts" in buckets


def test_mlflow_server_accepts_the_flags_and_environment_compose_gives_it() -> None:
    result = run_python(["-m", "mlflow", "server", "--help"])
    assert result.returncode == 0, result.stderr
    for argument in services()["mlflow"]["command"][1:]:
        flag = argument.split("=", 1)[0]
        assert flag in result.stdout, f"mlflow server has no {flag}"
    source = (Path(sys.executable).parents[1] / "lib" / "python3.11" / "site-packages" / "mlflow" / "cli" /
              "__init__.py")
    assert 'envvar="MLFLOW_BACKEND_STORE_URI"' in source.read_text()


def test_airflow_runs_its_three_version_3_services_on_one_shared_configuration() -> None:
    stack = services()
    commands = {name: stack[name]["entrypoint"] + stack[name]["command"] for name in
                ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor")}
    assert commands["airflow-api-server"][:2] == ["airflow", "api-server"]
    assert commands["airflow-scheduler"] == ["airflow", "scheduler"]
    assert commands["airflow-dag-processor"] == ["airflow", "dag-processor"]
    assert "airflow db migrate" in stack["airflow-init"]["command"][0]
    environments = [stack[name]["environment"] for name in (*commands, "airflow-init")]
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        assert len({environment[key] for environment in environments}) == 1, key
    assert environments[0]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
    assert environments[0]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "../dags:/app/dags:ro" in stack["airflow-scheduler"]["volumes"]


def test_the_stack_image_extends_the_cpu_image_and_passes_hadolint() -> None:
    dockerfile = INFRA / "stack" / "Dockerfile"
    assert f"ARG BASE_IMAGE={IMAGES['cpu']}" in dockerfile.read_text()
    assert services()["mlflow"]["build"]["args"]["BASE_IMAGE"] == IMAGES["cpu"]
    locked = dict(line.split("==") for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    for line in (INFRA / "stack" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", line), f"unpinned: {line}"
            name, version = line.split("==")
            assert locked.get(name, version) == version, f"{line}: requirements.lock pins {locked[name]}"
    assert "apache-airflow" in (INFRA / "stack" / "requirements.txt").read_text(), "the CPU image has no Airflow"
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_documents_exactly_the_compose_services() -> None:
    readme = (INFRA / "README.md").read_text()
    table = readme.split("<!-- services -->")[1]
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.MULTILINE))
    assert documented == set(services())
    assert "docker compose -f infra/compose.yaml --env-file infra/.env up -d" in readme
    for overlay in OVERLAYS:
        assert f"kubectl apply -k infra/k8s/overlays/{overlay}" in readme


def test_no_public_host_name_is_written_in_infra() -> None:
    """URLs in infra/ name only services of the stack or the cluster, never a registry or download host."""
    allowed = re.compile(r"^(localhost|127\.0\.0\.1|minio|mlflow|postgres|airflow-api-server|"
                         r"[a-z0-9-]+\.[a-z0-9-]+\.svc\.cluster\.local)(:\d+)?$")
    for path in INFRA.rglob("*"):
        if path.is_file():
            for host in re.findall(r"https?://([^/\s'\"`]+)", path.read_text()):
                assert allowed.match(host) or host.startswith(("$", "<")), f"{path}: {host}"
