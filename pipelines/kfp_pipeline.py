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
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.artifact_types import MODEL
from components.stages import KNOBS, PIPELINE_INPUTS, STAGES, Port, Stage, image, produced_by
from pipelines.stage_runner import parameter_name

COMPILED = Path(__file__).with_name("embedforge_pipeline.yaml")
COMMON = ("params", "profile", "pipeline_run")  # string parameters every component takes


def kfp_type(port: Port, direction: str) -> str | None:
    """The annotation of a port in a component's signature; None for local side files (plots, checkpoints)."""
    if port.kind is None:
        if direction == "Input":
            return "str"  # a plain input file: a path or URI parameter
        return {"metrics": "Output[Metrics]", "report": "Output[Markdown]"}.get(port.name)
    return f"{direction}[{'Model' if port.kind == MODEL else 'Dataset'}]"


def component_source(stage: Stage) -> str:
    """The component's Python source: its typed signature from the table row, and a body that runs the stage."""
    inputs = [f"{parameter_name(port)}: {kfp_type(port, 'Input')}" for port in stage.inputs]
    strings = [f"{name}: str" for name in (*stage.knobs, *COMMON)]
    outputs = [f"{parameter_name(port)}: {kfp_type(port, 'Output')}" for port in stage.outputs
               if kfp_type(port, "Output")]
    return (f"def {stage.name}({', '.join(inputs + strings + outputs)}):\n"
            f"    {stage.summary!r}\n"
            f"    from pipelines.stage_runner import run\n\n"
            f"    run({stage.name!r}, locals())\n")


def make_component(stage: Stage) -> dsl.base_component.BaseComponent:
    source = component_source(stage)
    filename = f"<embedforge kfp component {stage.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)  # for getsource
    namespace = {"__name__": __name__, "Input": Input, "Output": Output, "Dataset": Dataset, "Model": Model,
                 "Metrics": Metrics, "Markdown": Markdown}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - source rendered from the stage table
    return dsl.component(namespace[stage.name], base_image=image(stage), install_kfp_package=False)


COMPONENTS = {name: make_component(stage) for name, stage in STAGES.items()}
PARAMETERS = {**{artifact: port.path for artifact, port in PIPELINE_INPUTS.items()},
              "params": "params.yaml", "profile": "", **{knob: "" for knob in KNOBS},
              "pipeline_run": dsl.PIPELINE_JOB_NAME_PLACEHOLDER}


def request_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_memory_limit("32G")


def _wire(*values: str) -> None:
    """Each stage's task on its inputs: pipeline inputs from the parameters, artifacts from their producer."""
    arguments = dict(zip(PARAMETERS, values, strict=True))
    tasks: dict[str, dsl.PipelineTask] = {}
    for name, stage in STAGES.items():
        wired = {parameter: arguments[parameter] for parameter in (*stage.knobs, *COMMON)}
        for port in stage.inputs:
            producer = produced_by(port.artifact)
            wired[parameter_name(port)] = (arguments[port.artifact] if producer is None else
                                           tasks[producer.name].outputs[parameter_name(
                                               next(p for p in producer.outputs if p.artifact == port.artifact))])
        task = COMPONENTS[name](**wired)
        tasks[name] = request_gpu(task) if stage.gpu else task


_wire.__signature__ = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=str)
    for name, default in PARAMETERS.items()])
embedforge_pipeline = dsl.pipeline(
    name="embedforge",
    description="Raw text pairs to a quantized Matryoshka student, its indexes and the evidence; the student "
                "registered when it earns it. Knobs left empty keep the value of params.yaml's active profile "
                "(`profile` empty = the file's own); lists are YAML, e.g. student_layers=\"[0, 2, 4]\".",
)(_wire)


def compile_pipeline(output: Path = COMPILED) -> Path:
    compiler.Compiler().compile(embedforge_pipeline, str(output))
    return output


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
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(compile_pipeline(args.output))
        return
    import kfp

    arguments = dict(item.split("=", 1) for item in args.param)
    run = kfp.Client(host=args.host).create_run_from_pipeline_package(
        str(COMPILED), arguments=arguments, experiment_name=args.experiment, enable_caching=True)
    print(f"submitted run {run.run_id}")


if __name__ == "__main__":
    main()
