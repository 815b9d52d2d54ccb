"""The compiled Kubeflow pipeline, read as a cluster runs it (static: no cluster here).

Every pod gets the tracking URI, the S3 endpoint and credentials from the ConfigMap and Secret, its run's id from
the pod label Kubeflow sets, its resources, `/dev/shm`, a timeout and retries (params.yaml `kubernetes`); the GPU
stages land on GPU nodes. Cache keys depend only on a task's real inputs: two submissions of the same inputs hit
the cache, a changed input or param misses it from the task that reads it on.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
import yaml

from components.cluster import RUN_ID_LABEL, cluster_settings
from components.config import load_params
from components.stages import STAGES
from pipelines.kfp_pipeline import COMPILED, PARAMS_PATH, PIPELINE_RUN_ENV

SPEC, PLATFORM = yaml.safe_load_all(COMPILED.read_text())
CLUSTER = cluster_settings(load_params(PARAMS_PATH), PARAMS_PATH)
RUN_PLACEHOLDER = re.compile(r"\{\{\$\.pipeline_(job|task)_[a-z_]+\}\}")  # values that differ per submission


def executor(stage: str) -> dict[str, Any]:
    return PLATFORM["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{stage}"]


def submitted(values: dict[str, Any], job: str) -> dict[str, Any]:
    """What the backend resolves at submission: the run's own placeholders replaced by this job's values."""
    return {name: RUN_PLACEHOLDER.sub(f"{job}-resolved", value) if isinstance(value, str) else value
            for name, value in values.items()}


def cache_keys(arguments: dict[str, str], job: str) -> dict[str, str]:
    """Each root task's cache key as KFP's backend forms it: the executor's image, command and args, the task's
    resolved input parameters, its input artifacts (a cached producer hands on the same artifacts, so they stand
    for the producer's key) and its output definitions. Env from ConfigMaps, Secrets or field paths is no part.
    A `ParallelFor` group (curate's shard steps) stands for its inner task, the loop item left symbolic."""
    defaults = {name: definition.get("defaultValue")
                for name, definition in SPEC["root"]["inputDefinitions"]["parameters"].items()}
    pipeline_inputs = submitted(defaults | arguments, job)
    tasks = SPEC["root"]["dag"]["tasks"]
    keys: dict[str, str] = {}

    def material(task: dict[str, Any], channels: dict[str, str]) -> dict[str, Any]:
        parameters, artifacts = {}, {}
        for parameter, source in task["inputs"].get("parameters", {}).items():
            if "componentInputParameter" in source:
                name = source["componentInputParameter"].removeprefix("pipelinechannel--")
                parameters[parameter] = channels.get(name, pipeline_inputs.get(name))
            elif "taskOutputParameter" in source:
                parameters[parameter] = keys[source["taskOutputParameter"]["producerTask"]]
            else:
                parameters[parameter] = submitted({"value": source["runtimeValue"]["constant"]}, job)["value"]
        for artifact, source in task["inputs"].get("artifacts", {}).items():
            if "componentInputArtifact" in source:
                artifacts[artifact] = channels[source["componentInputArtifact"]]
            else:
                artifacts[artifact] = (f"{keys[source['taskOutputArtifact']['producerTask']]}/"
                                       f"{source['taskOutputArtifact']['outputArtifactKey']}")
        component = SPEC["components"][task["componentRef"]["name"]]
        if "dag" in component:  # a loop: its one inner task, with the loop's inputs as channels
            outer = material({"inputs": task["inputs"], "componentRef": {"name": "comp-curate-shards"}}, {})
            loop = {name.removeprefix("pipelinechannel--"): value for name, value in outer["parameters"].items()}
            loop |= {f"{name}-loop-item": "loop-item" for name in list(loop)} | outer["artifacts"]
            (inner,) = component["dag"]["tasks"].values()
            return material(inner, loop)
        container = SPEC["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        return {"image": container["image"], "command": container["command"], "args": container["args"],
                "parameters": parameters, "artifacts": artifacts, "outputs": component.get("outputDefinitions")}

    while len(keys) < len(tasks):
        for name, task in tasks.items():
            if name not in keys and set(task.get("dependentTasks", [])) <= set(keys):
                keys[name] = hashlib.sha256(json.dumps(material(task, {}), sort_keys=True).encode()).hexdigest()
    return keys


def downstream_of(stage: str) -> set[str]:
    """The stage and every stage that reads, directly or not, what it writes."""
    found = {stage}
    for name, row in STAGES.items():
        if any(port.artifact in {out.artifact for done in found for out in STAGES[done].outputs}
               for port in row.inputs):
            found.add(name)
    return found


def test_two_submissions_of_the_same_inputs_have_the_same_cache_key_for_every_task() -> None:
    arguments = {"profile": "smoke"}
    assert cache_keys(arguments, "run-monday") == cache_keys(arguments, "run-tuesday")


def test_no_task_input_takes_a_value_that_differs_per_run() -> None:
    for name, task in SPEC["root"]["dag"]["tasks"].items():
        assert not RUN_PLACEHOLDER.search(json.dumps(task["inputs"])), name
    defaults = json.dumps(SPEC["root"]["inputDefinitions"]["parameters"])
    assert not RUN_PLACEHOLDER.search(defaults)


@pytest.mark.parametrize(("argument", "value", "first_stage"), [
    ("eps", "0.1", "curate"),
    ("raw_pairs", "s3://bucket/other/pairs.jsonl.gz", "curate"),
    ("num_negatives", "3", "mine"),
    ("profile", "medium", "curate"),
])
def test_a_changed_input_or_param_misses_the_cache_from_the_task_that_reads_it_on(argument: str, value: str,
                                                                                   first_stage: str) -> None:
    before = cache_keys({"profile": "smoke"}, "run-a")
    after = cache_keys({"profile": "smoke", argument: value}, "run-a")
    changed = {name for name in STAGES if before[name] != after[name]}
    assert changed == downstream_of(first_stage)


@pytest.mark.parametrize("stage", STAGES)
def test_every_pod_gets_tracking_and_s3_settings_from_the_config_map_and_credentials_from_the_secret(
        stage: str) -> None:
    spec = executor(stage)
    (config_map,) = spec["configMapAsEnv"]
    assert config_map["configMapName"] == CLUSTER.settings_config_map
    assert {item["envVar"] for item in config_map["keyToEnv"]} >= {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
                                                                   "AWS_ENDPOINT_URL_S3"}
    (secret,) = spec["secretAsEnv"]
    assert secret["secretName"] == CLUSTER.credentials_secret and secret["optional"] is True
    assert {item["envVar"] for item in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_pod_finds_its_run_by_the_run_label_not_by_a_parameter(stage: str) -> None:
    assert executor(stage)["fieldPathAsEnv"] == [{"fieldPath": f"metadata.labels['{RUN_ID_LABEL}']",
                                                   "name": PIPELINE_RUN_ENV}]
    assert "pipeline_run" not in SPEC["root"]["dag"]["tasks"][stage]["inputs"].get("parameters", {})


@pytest.mark.parametrize("stage", STAGES)
def test_every_pod_has_its_resources_shared_memory_timeout_and_retries_from_params(stage: str) -> None:
    gpu = STAGES[stage].gpu
    pod = CLUSTER.pod(gpu)
    resources = SPEC["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == (pod.cpu_request, pod.cpu_limit)
    assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == \
        (pod.memory_request, pod.memory_limit)
    assert ("accelerator" in resources) is gpu
    spec = executor(stage)
    assert spec["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": CLUSTER.shm_size,
                                       "volumeName": "dshm"}]
    assert int(spec["activeDeadlineSeconds"]) == pod.timeout_seconds
    retry = SPEC["root"]["dag"]["tasks"][stage]["retryPolicy"]
    assert retry["maxRetryCount"] == CLUSTER.retries and retry["backoffFactor"] == 2.0


@pytest.mark.parametrize("stage", STAGES)
def test_only_the_gpu_stages_are_placed_on_gpu_nodes(stage: str) -> None:
    spec, gpu = executor(stage), STAGES[stage].gpu
    assert spec.get("nodeSelector", {}).get("labels", {}) == (CLUSTER.gpu_node_selector if gpu else {})
    assert [toleration["key"] for toleration in spec.get("tolerations", [])] == \
        ([toleration.key for toleration in CLUSTER.gpu_tolerations] if gpu else [])


def test_curates_fanned_out_steps_share_its_cache_fate() -> None:
    """A curate knob misses the cache for every shard step (ParallelFor groups included); a later stage's knob
    for none of them."""
    steps = {name for name in SPEC["root"]["dag"]["tasks"] if name not in STAGES}
    assert len(steps) == 6  # curate-shards, the prepare/embed/dedup loops, curate-plan, curate-cluster
    before = cache_keys({"profile": "smoke"}, "run-a")
    eps = cache_keys({"profile": "smoke", "eps": "0.1"}, "run-a")
    negatives = cache_keys({"profile": "smoke", "num_negatives": "3"}, "run-a")
    assert {name for name in steps if before[name] != eps[name]} == steps
    assert {name for name in steps if before[name] != negatives[name]} == set()
