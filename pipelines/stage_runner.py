"""What every Kubeflow component body does: run one stage's CLI in-process on artifact paths, report its metrics.

`stage_argv` is the one place where an adapter's knobs become a stage's command line (Kubeflow and Airflow).

Kept out of the component functions so that each body stays one call (KFP ships a component's source, not its
module); the stage logic itself stays in `components/`.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def stage_argv(args: list[str], *, params: str, profile: str, overrides: dict[str, Any], metrics_file: str) -> list[str]:
    """A stage's argv after its artifact flags: params file, profile, `--set key=value` for each non-empty override.

    Shared by every orchestrator adapter, so a knob means the same thing under Kubeflow and Airflow.
    """
    argv = [*args, "--params", params, "--metrics", metrics_file]
    if profile:
        argv += ["--profile", profile]
    for key, value in overrides.items():
        if value != "" and value is not None:
            argv += ["--set", f"{key}={value}"]
    return argv


def run(stage: str, args: list[str], *, params: str, profile: str, overrides: dict[str, Any], pipeline_run: str,
        metrics: Any | None = None) -> dict[str, float]:
    """`embedforge <stage> ARGS --params .. --profile .. --set k=v ...`; empty-string overrides keep params.yaml.

    Fails the task (an exception KFP reports) when the stage exits non-zero; the stage has already logged why.
    """
    from components.cli import guarded

    if pipeline_run:  # one MLflow parent run for all tasks of this pipeline run
        os.environ["EMBEDFORGE_PIPELINE_RUN"] = pipeline_run
    metrics_file = Path(tempfile.mkdtemp(prefix=f"embedforge-{stage}-")) / "metrics.json"
    argv = stage_argv(args, params=params, profile=profile, overrides=overrides, metrics_file=str(metrics_file))
    code = guarded(importlib.import_module(f"components.{stage}").main)(argv)
    if code != 0:
        raise RuntimeError(f"embedforge {stage} failed (exit {code}); its error is in the log above")
    values = json.loads(metrics_file.read_text())
    if metrics is not None:
        for key, value in values.items():
            metrics.log_metric(key, float(value))
    return values
