"""The embedforge pipeline for Kubeflow Pipelines v2: one containerized Python component per stage.

(No `from __future__ import annotations` here: KFP reads the artifact annotations at decoration time.)

Components and wiring come from the stage table (`components/stages.py`): each row becomes a component whose
typed inputs and outputs are the row's ports (`Input[Dataset]`, `Output[Model]`, `Output[Metrics]`,
`Output[Markdown]` for the report) and whose body is one call to `pipelines.stage_runner.run`, which runs the
stage's own CLI on the artifact paths. KFP ships a component's source code, not its module, so each component
is rendered from the table as source. Components run on the project images built from `containers/` (the GPU
stages on the CUDA image, with a GPU request); caching is on, so a re-run with the same inputs reuses each
task's outputs.

    python -m pipelines.kfp_pipeline compile                      # writes pipelines/embedforge_pipeline.yaml
    python -m pipelines.kfp_pipeline submit --host http://KFP:8888 -p profile=smoke
"""


import argparse
import inspect
import linecache
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, List  # noqa: UP035 - KFP reads `List[...]` in rendered component signatures

from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.artifact_types import MODEL
from components.cluster import RUN_ID_LABEL, ClusterSettings, cluster_settings
from components.config import load_params
from components.stages import (
    CURATE_STEPS,
    IMAGES,
    KNOBS,
    PIPELINE_INPUTS,
    STAGES,
    STEP_OUTPUT,
    Port,
    Stage,
    produced_by,
)
from components.tracking import PIPELINE_RUN_ENV, tracking_uri
from pipelines.stage_runner import MARKDOWN_VIEWS, parameter_name

COMPILED = Path(__file__).with_name("embedforge_pipeline.yaml")
COMMON = ("params", "profile")  # string parameters every component takes


def kfp_type(port: Port, direction: str) -> str | None:
    """The annotation of a port in a component's signature; None for local side files (plots, checkpoints)."""
    if port.kind is None:
        if direction == "Input":
            return "str"  # a plain input file: a path or URI parameter
        return {"metrics": "Output[Metrics]", **dict.fromkeys(MARKDOWN_VIEWS, "Output[Markdown]")}.get(port.name)
    return f"{direction}[{'Model' if port.kind == MODEL else 'Dataset'}]"


def _function(name: str, signature: list[str], doc: str, body: str, returns: str = "") -> str:
    return (f"def {name}({', '.join(signature)}){f' -> {returns}' if returns else ''}:\n    {doc!r}\n"
            f"    from pipelines.stage_runner import {body}\n")


# the curate merge also takes what its fanned-out steps made (see `curate_fan_out`)
MERGE_INPUTS = ["plan: Input[Dataset]", "clustered: Input[Dataset]", "near_duplicates: Input[List[Dataset]]"]


def component_source(stage: Stage) -> str:
    """The component's Python source: its typed signature from the table row, and a body that runs the stage."""
    inputs = [f"{parameter_name(port)}: {kfp_type(port, 'Input')}" for port in stage.inputs]
    inputs += MERGE_INPUTS if stage.name == "curate" else []
    strings = [f"{name}: str" for name in (*stage.knobs, *COMMON)]
    outputs = [f"{parameter_name(port)}: {kfp_type(port, 'Output')}" for port in stage.outputs
               if kfp_type(port, "Output")]
    return _function(stage.name, inputs + strings + outputs, stage.summary,
                     f"run\n\n    run({stage.name!r}, locals())")


def step_source(step: str) -> str:
    """A curate shard step's component: its shard (per-shard steps), its input (a list where the input step
    fanned out), curate's knobs and its one output."""
    source, per_shard = CURATE_STEPS[step]
    inputs = ["shard: int"] if per_shard else []
    if source == "raw":
        inputs.append("raw_pairs: str")
    else:
        inputs.append(f"{STEP_OUTPUT[source]}: Input[{'List[Dataset]' if CURATE_STEPS[source][1] else 'Dataset'}]")
    strings = [f"{name}: str" for name in (*STAGES["curate"].knobs, *COMMON)]
    return _function(f"curate_{step}", [*inputs, *strings, f"{STEP_OUTPUT[step]}: Output[Dataset]"],
                     f"curate step {step}", f"run_step\n\n    run_step({step!r}, locals())")


SHARDS_SOURCE = _function("curate_shards", [f"{name}: str" for name in (*STAGES["curate"].knobs, *COMMON)],
                          "the shard numbers curate fans out over (curate.shards)",
                          "shard_numbers\n\n    return shard_numbers(locals())", returns="List[int]")


def make_component(name: str, source: str, base_image: str) -> dsl.base_component.BaseComponent:
    filename = f"<embedforge kfp component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)  # for getsource
    namespace = {"__name__": __name__, "Input": Input, "Output": Output, "Dataset": Dataset, "Model": Model,
                 "Metrics": Metrics, "Markdown": Markdown, "List": List}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - source rendered from the stage table
    return dsl.component(namespace[name], base_image=base_image, install_kfp_package=False)


PARAMETERS = {**{artifact: port.path for artifact, port in PIPELINE_INPUTS.items()},
              "params": "params.yaml", "profile": "", **{knob: "" for knob in KNOBS}}


def on_cluster(task: dsl.PipelineTask, stage: Stage, cluster: ClusterSettings) -> dsl.PipelineTask:
    """What the task's pod gets on Kubernetes (params.yaml `kubernetes`, shared with the Airflow DAG): requests and
    limits (a GPU for train and distill, on GPU nodes), `/dev/shm`, a timeout, retries with backoff, the
    settings and credentials as environment from the ConfigMap and Secret, and this run's id (the pod label
    Kubeflow sets) as the MLflow parent key, outside the task's parameters so that it never enters a cache key."""
    from kfp import kubernetes

    pod = cluster.pod(stage.gpu)
    task.set_cpu_request(pod.cpu_request).set_cpu_limit(pod.cpu_limit)
    task.set_memory_request(pod.memory_request).set_memory_limit(pod.memory_limit)
    if pod.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(pod.gpus)
    task.set_retry(num_retries=cluster.retries, backoff_duration=f"{cluster.retry_delay_seconds}s",
                   backoff_factor=2, backoff_max_duration=f"{cluster.max_retry_delay_seconds}s")
    kubernetes.use_config_map_as_env(task, cluster.settings_config_map, {key: key for key in cluster.config_map_keys})
    kubernetes.use_secret_as_env(task, cluster.credentials_secret, {key: key for key in cluster.secret_keys},
                                 optional=True)
    kubernetes.use_field_path_as_env(task, PIPELINE_RUN_ENV, f"metadata.labels['{RUN_ID_LABEL}']")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=cluster.shm_size)
    kubernetes.set_timeout(task, pod.timeout_seconds)
    if stage.gpu:
        for label, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in cluster.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration.model_dump())
    return task


def build_pipeline(images: Mapping[str, str] = IMAGES, cluster: ClusterSettings | None = None) -> Callable[..., Any]:
    """The pipeline with each stage's component on `images[kind]` (the table's images by default; a local run
    may put the GPU stages on the CPU image) and, for a cluster, each task's pod settings (`on_cluster`)."""
    components = {name: make_component(name, component_source(stage), images["cuda" if stage.gpu else "cpu"])
                  for name, stage in STAGES.items()}
    steps = {step: make_component(f"curate_{step}", step_source(step), images["cpu"]) for step in CURATE_STEPS}
    shard_numbers = make_component("curate_shards", SHARDS_SOURCE, images["cpu"])
    curate = STAGES["curate"]

    def placed(task: dsl.PipelineTask, stage: Stage = curate) -> dsl.PipelineTask:
        return task if cluster is None else on_cluster(task, stage, cluster)

    def curate_fan_out(arguments: dict[str, str]) -> dict[str, Any]:
        """curate's shard steps: `ParallelFor` over the shards for the per-shard steps, `dsl.Collected` into the
        steps that take every shard's output; returns the merge's extra inputs."""
        common = {name: arguments[name] for name in (*curate.knobs, *COMMON)}
        shards = placed(shard_numbers(**common)).output
        made: dict[str, Any] = {}
        for step, (source, per_shard) in CURATE_STEPS.items():
            inputs = {"raw_pairs": arguments["raw_pairs"]} if source == "raw" else {STEP_OUTPUT[source]: made[source]}
            if per_shard:
                with dsl.ParallelFor(shards) as shard:
                    task = placed(steps[step](shard=shard, **inputs, **common))
                made[step] = dsl.Collected(task.outputs[STEP_OUTPUT[step]])
            else:
                made[step] = placed(steps[step](**inputs, **common)).outputs[STEP_OUTPUT[step]]
        return {STEP_OUTPUT[step]: made[step] for step in ("plan", "cluster", "dedup")}

    def _wire(*values: str) -> None:
        """Each stage's task on its inputs: pipeline inputs from the parameters, artifacts from their producer."""
        arguments = dict(zip(PARAMETERS, values, strict=True))
        tasks: dict[str, dsl.PipelineTask] = {}
        for name, stage in STAGES.items():
            wired = {parameter: arguments[parameter] for parameter in (*stage.knobs, *COMMON)}
            if name == "curate":
                wired |= curate_fan_out(arguments)
            for port in stage.inputs:
                producer = produced_by(port.artifact)
                wired[parameter_name(port)] = (arguments[port.artifact] if producer is None else
                                               tasks[producer.name].outputs[parameter_name(
                                                   next(p for p in producer.outputs if p.artifact == port.artifact))])
            task = components[name](**wired)
            tasks[name] = placed(task, stage)

    _wire.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=str)
        for name, default in PARAMETERS.items()])
    return dsl.pipeline(
        name="embedforge",
        description="Raw text pairs to a quantized Matryoshka student, its indexes and the evidence; the student "
                    "registered when it earns it. Knobs left empty keep the value of params.yaml's active profile "
                    "(`profile` empty = the file's own); lists are YAML, e.g. student_layers=\"[0, 2, 4]\".",
    )(_wire)


PARAMS_PATH = Path(__file__).resolve().parents[1] / "params.yaml"
embedforge_pipeline = build_pipeline(IMAGES, cluster_settings(load_params(PARAMS_PATH), PARAMS_PATH))


def docker_runner(environment: dict[str, str], inputs: list[Path], *, user: str | None = None) -> Any:
    """kfp.local's DockerRunner as embedforge's images need it: the image's `embedforge` entrypoint cleared (KFP
    gives the full command), the host network (a tracking or S3 server on 127.0.0.1), the run's environment
    (tracking URI, run key, offline hub; S3 settings passed through), and the container running as the invoking
    user (default), so that what it writes on the bind-mounted pipeline root belongs to them. Local input files
    are mounted read-only at their own paths (kfp.local mounts only the pipeline root)."""
    from docker.types import Mount
    from kfp import local

    environment = environment | {key: value for key, value in os.environ.items()
                                 if key.startswith(("AWS_", "MLFLOW_S3_"))}
    mounts = [Mount(target=str(path), source=str(path), type="bind", read_only=True) for path in inputs]
    return local.DockerRunner(entrypoint=[""], network_mode="host", environment=environment, mounts=mounts,
                              user=user or f"{os.getuid()}:{os.getgid()}")


def compile_pipeline(output: Path = COMPILED) -> Path:
    compiler.Compiler().compile(embedforge_pipeline, str(output))
    return output


def check_docker_image(image: str) -> None:
    """Fail with what to do when the Docker API is not reachable or does not have the image (kfp.local would
    try to pull it from a registry)."""
    import docker

    host = os.environ.get("DOCKER_HOST", "the default socket")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise SystemExit(f"kfp run-local: no Docker API at {host} ({exc}). Start Docker, or podman's: "
                         "`podman system service --time=0 unix:///run/podman.sock &` and "
                         "`export DOCKER_HOST=unix:///run/podman.sock`") from None
    if not any(image in (listed.tags or []) for listed in client.images.list()):
        raise SystemExit(f"kfp run-local: image {image} is not on the engine at {host}: build it with "
                         "`bash containers/build.sh` (podman names it localhost/NAME:TAG) or pass --image")


def run_locally(runner: str, pipeline_root: Path, image: str, tracking: str | None, pipeline_run: str,
                arguments: dict[str, str]) -> None:
    """The whole pipeline under kfp.local: in containers of one image (docker) or in this Python (subprocess).
    `pipeline_run` keys the MLflow parent run, as a cluster run's id does."""
    from kfp import local

    environment = {"MLFLOW_TRACKING_URI": tracking or tracking_uri(), PIPELINE_RUN_ENV: pipeline_run,
                   "HF_HUB_OFFLINE": "1"}
    inputs: list[Path] = []
    for name in (*PIPELINE_INPUTS, "params"):  # local input files by absolute path, the same in a container
        value = arguments.get(name, PARAMETERS[name])
        if "://" not in value:
            inputs.append(Path(value).resolve())
            arguments[name] = str(inputs[-1])
    if runner == "docker":
        check_docker_image(image)
        pipeline = build_pipeline({"cpu": image, "cuda": image})
        local.init(runner=docker_runner(environment, inputs), pipeline_root=str(pipeline_root.resolve()))
    else:
        os.environ.update(environment)
        pipeline = build_pipeline(IMAGES)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root.resolve()))
    pipeline_root.mkdir(parents=True, exist_ok=True)
    earlier_runs = set(pipeline_root.iterdir())
    failure = ""
    try:
        pipeline(**arguments)
    except (RuntimeError, ValueError) as exc:  # a task failed, or a later one found its outputs missing
        failure = f" ({exc})"
    # A task is done when its executor wrote executor_output.json. Checked here because kfp.local's DockerRunner
    # takes a container that was removed before its exit status was read (podman removes at once) for a success.
    runs = set(pipeline_root.iterdir()) - earlier_runs
    unfinished = [name for name in STAGES if not any((run / name / "executor_output.json").is_file() for run in runs)]
    if unfinished:
        raise SystemExit(f"kfp run-local: task {unfinished[0]} failed (its log is above){failure}; "
                         f"not completed: {', '.join(unfinished)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.kfp_pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_command = commands.add_parser("compile", help="write the pipeline's IR YAML")
    compile_command.add_argument("--output", type=Path, default=COMPILED)
    submit = commands.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, help="the KFP API endpoint, e.g. http://127.0.0.1:8888")
    submit.add_argument("--experiment", default="embedforge")
    submit.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter (repeatable), e.g. -p profile=smoke -p eps=0.1")
    local_run = commands.add_parser("run-local", help="run the whole pipeline here with kfp.local")
    local_run.add_argument("--runner", choices=("docker", "subprocess"), default="docker",
                           help="docker: every task in a container on the Docker API at DOCKER_HOST (Docker, or "
                                "podman's socket); subprocess: every task in this Python")
    local_run.add_argument("--pipeline-root", type=Path, required=True, help="where the tasks write their artifacts")
    local_run.add_argument("--image", default=IMAGES["cpu"],
                           help="docker: the image every stage runs on (GPU stages too, without a GPU request); "
                                "podman lists local builds as localhost/NAME:TAG")
    local_run.add_argument("--tracking-uri", default=None,
                           help="MLflow tracking URI for the tasks (default: MLFLOW_TRACKING_URI or the local store); "
                                "a container sees only the pipeline root and the host network")
    local_run.add_argument("--pipeline-run", default=f"kfp-local-{time.strftime('%Y%m%d-%H%M%S')}",
                           help="the run's key: its MLflow parent run is tagged with it")
    local_run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                           help="pipeline parameter (repeatable), e.g. -p profile=smoke")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(compile_pipeline(args.output))
        return
    if args.command == "run-local":
        run_locally(args.runner, args.pipeline_root, args.image, args.tracking_uri, args.pipeline_run,
                    dict(item.split("=", 1) for item in args.param))
        return
    import kfp

    arguments = dict(item.split("=", 1) for item in args.param)
    run = kfp.Client(host=args.host).create_run_from_pipeline_package(
        str(COMPILED), arguments=arguments, experiment_name=args.experiment, enable_caching=True)
    print(f"submitted run {run.run_id}")


if __name__ == "__main__":
    main()
