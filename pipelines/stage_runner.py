"""What every Kubeflow component body does: run one stage's CLI in-process on its artifact paths, report metrics.

Kept out of the component functions so that each body stays one call (KFP ships a component's source, not its
module); the stage logic stays in `components/`, the command line comes from the stage table.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from components.stages import STAGES, Port, command_line


def parameter_name(port: Port) -> str:
    """A port's name in a component's signature: its artifact, or `metrics` / `report` for those outputs."""
    return port.name if port.name in ("metrics", "report") else port.artifact


def run(stage: str, values: dict[str, Any]) -> dict[str, float]:
    """`embedforge <stage>` on the component's arguments (`locals()` of its body: artifacts, knobs, params,
    profile, pipeline_run); empty knobs keep params.yaml's values.

    Side files that are no KFP artifact (plots, checkpoints) go beside the stage's first output artifact. Fails
    the task (an exception KFP reports) when the stage exits non-zero; the stage has already logged why.
    """
    from components.cli import guarded

    row = STAGES[stage]
    if values["pipeline_run"]:  # one MLflow parent run for all tasks of this pipeline run
        os.environ["EMBEDFORGE_PIPELINE_RUN"] = values["pipeline_run"]
    metrics_file = Path(tempfile.mkdtemp(prefix=f"embedforge-{stage}-")) / "metrics.json"
    beside = next((values[port.artifact].path for port in row.outputs if port.kind is not None), None)
    locations: dict[str, str] = {}
    for port in row.ports:
        value = values.get(parameter_name(port))
        if port.name == "metrics":
            locations[port.artifact] = str(metrics_file)
        elif value is not None:
            locations[port.artifact] = value if isinstance(value, str) else value.path
        elif beside is not None:
            locations[port.artifact] = f"{beside}.{Path(port.path).name}"
    argv = command_line(stage, locations, params=values["params"], profile=values["profile"],
                        knobs={knob: values[knob] for knob in row.knobs})
    code = guarded(importlib.import_module(row.module).main)(argv[1:])
    if code != 0:
        raise RuntimeError(f"embedforge {stage} failed (exit {code}); its error is in the log above")
    metrics = json.loads(metrics_file.read_text())
    for key, value in metrics.items():
        values["metrics"].log_metric(key, float(value))
    return metrics
