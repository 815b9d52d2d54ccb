"""What every Kubeflow component body does: run one stage's CLI in-process on its artifact paths, report metrics.

Kept out of the component functions so that each body stays one call (KFP ships a component's source, not its
module); the stage logic stays in `components/`, the command line comes from the stage table. What the KFP UI
shows is made here: the stage's headline metrics as its `Metrics` artifact, and its report and plots as
self-contained Markdown artifacts (images inlined, CSV data as tables), since a backend uploads only artifacts.
"""

from __future__ import annotations

import base64
import csv
import importlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from components.stages import (
    CURATE_STEPS,
    STAGES,
    STEP_OUTPUT,
    Port,
    command_line,
    curate_shards,
    merge_flags,
    step_command_line,
)

log = logging.getLogger("embedforge")


MARKDOWN_VIEWS = ("report", "plot", "plots")  # side outputs shown in the KFP UI as Markdown artifacts
TABLE_ROWS = 50  # rows of a plot's CSV data shown in its Markdown view
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+\.png)\)")  # a Markdown image link to a local PNG


def parameter_name(port: Port) -> str:
    """A port's name in a component's signature: its artifact, or `metrics` / `report` for those outputs."""
    return port.name if port.name in ("metrics", "report") else port.artifact


def inline_png(name: str, image: Path) -> str:
    return f"![{name}](data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()})"


def csv_table(path: Path) -> str:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body[:TABLE_ROWS]]
    if len(body) > TABLE_ROWS:
        lines.append(f"\n({len(body) - TABLE_ROWS} more rows in the stage's local output)")
    return "\n".join(lines)


def markdown_view(path: Path) -> str:
    """A side output as one self-contained Markdown document: a report with its PNG links inlined, or a plot
    (a PNG, a CSV, or a folder of them) as images and tables."""
    if path.suffix == ".md":
        return IMAGE_LINK.sub(lambda link: inline_png(link[1], path.parent / link[2])
                              if (path.parent / link[2]).is_file() else link[0], path.read_text())
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    views = {".png": lambda file: inline_png(file.stem, file), ".csv": csv_table}
    return "\n\n".join(f"### {file.stem}\n\n{views[file.suffix](file)}" for file in files if file.suffix in views)


def _run_cli(what: str, argv: list[str]) -> None:
    """`embedforge <argv>` in this process; a failure exits with the stage's own code (see `run`)."""
    from components.cli import guarded

    code = guarded(importlib.import_module(STAGES[argv[0]].module).main)(argv[1:])
    if code != 0:
        log.error("embedforge %s failed (exit %d); its error is in the log above", what, code)
        raise SystemExit(code)


def run_step(step: str, values: dict[str, Any]) -> None:
    """One curate shard step on the component's arguments: `embedforge curate step <step> ...`."""
    source, _ = CURATE_STEPS[step]
    given = values["raw_pairs"] if source == "raw" else values[STEP_OUTPUT[source]]
    inputs = [given] if isinstance(given, str) else [item.path for item in (given if isinstance(given, list)
                                                                             else [given])]
    argv = step_command_line(step, values.get("shard"), inputs, values[STEP_OUTPUT[step]].path,
                             params=values["params"], profile=values["profile"],
                             knobs={knob: values[knob] for knob in STAGES["curate"].knobs})
    _run_cli(f"curate step {step}", argv)


def shard_numbers(values: dict[str, Any]) -> list[int]:
    """The shards curate's steps fan out over, for the params file, profile and knobs the curate tasks get."""
    return curate_shards(Path(values["params"]), values["profile"],
                         {knob: values[knob] for knob in STAGES["curate"].knobs})


def run(stage: str, values: dict[str, Any]) -> dict[str, float]:
    """`embedforge <stage>` on the component's arguments (`locals()` of its body: artifacts, knobs, params,
    profile); empty knobs keep params.yaml's values. The run's MLflow parent key comes from the environment
    (`EMBEDFORGE_PIPELINE_RUN`: the run's pod label on a cluster, the runner's environment locally), never from a
    parameter, so it stays out of the task's cache key.

    The report and plots are written to a scratch folder and published as Markdown views (`markdown_view`);
    checkpoints go beside the stage's first output artifact. When the stage fails, the task's process (`python -m kfp.dsl.executor_main`, which lets `SystemExit` through)
    exits with the stage's own code: 2 for a rejected input or param (permanent), 75 for S3, network, MLflow
    server or disk (transient). kfp.local and a plain container see that status; a Kubeflow Pipelines backend's
    launcher, which wraps the process, reports any failure as its own exit 1. The stage has already logged why;
    a bug's traceback propagates (exit 1).
    """
    row = STAGES[stage]
    scratch = Path(tempfile.mkdtemp(prefix=f"embedforge-{stage}-"))
    metrics_file = scratch / "metrics.json"
    beside = next((values[port.artifact].path for port in row.outputs if port.kind is not None), None)
    locations: dict[str, str] = {}
    for port in row.ports:
        value = values.get(parameter_name(port))
        if port.name == "metrics":
            locations[port.artifact] = str(metrics_file)
        elif port.name in MARKDOWN_VIEWS:
            locations[port.artifact] = str(scratch / port.name / Path(port.path).name)
        elif value is not None:
            locations[port.artifact] = value if isinstance(value, str) else value.path
        elif beside is not None:
            locations[port.artifact] = f"{beside}.{Path(port.path).name}"
    argv = command_line(stage, locations, params=values["params"], profile=values["profile"],
                        knobs={knob: values[knob] for knob in row.knobs})
    if "plan" in values:  # curate: merge what its fanned-out shard steps made
        argv += merge_flags(values["plan"].path, values["clustered"].path,
                            [found.path for found in values["near_duplicates"]])
    _run_cli(stage, argv)
    for port in row.outputs:
        if port.name in MARKDOWN_VIEWS and Path(locations[port.artifact]).exists():
            Path(values[parameter_name(port)].path).write_text(markdown_view(Path(locations[port.artifact])))
    metrics = json.loads(metrics_file.read_text())  # the stage's headline (components.stages.Stage.headline)
    for key, value in metrics.items():
        values["metrics"].log_metric(key, float(value))
    return metrics
