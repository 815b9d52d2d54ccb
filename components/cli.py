"""Command-line plumbing shared by every stage, and the `embedforge <stage>` dispatcher.

Each stage module owns its argv parsing in `main(argv)`; this module gives them the common flags, logging,
tracking, the metrics file and one place that turns expected failures into a clear message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from components.artifacts import ArtifactError
from components.config import PARAMS_FILE, ConfigError, ConfigT, load_stage_config, parse_overrides
from components.data import DataError
from components.validation import ValidationFailed

log = logging.getLogger("embedforge")

STAGES = ("curate", "mine", "train", "distill", "quantize", "index", "evaluate", "register")
EXPECTED_ERRORS = (ConfigError, DataError, ArtifactError, ValidationFailed, FileNotFoundError)


def stage_parser(stage: str, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"embedforge {stage}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file with one section per stage")
    parser.add_argument("--profile", default=None, help="params profile to apply (default: the file's `profile` key)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"override one `{stage}` param after the profile (value as YAML; repeatable)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store.db.utils", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Libraries' advice meant for their developers, not for users of a pipeline (filtered by message, not blanket).
    warnings.filterwarnings("ignore", message=".*`resume_download` is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="great_expectations")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_stage_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, model: type[ConfigT], stage: str
) -> tuple[argparse.Namespace, ConfigT]:
    """Parse argv, configure logging, and validate the stage's config before any work starts."""
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return args, load_stage_config(model, stage, args.params, args.profile, parse_overrides(args.overrides))


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def flatten(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: nested params as MLflow params."""
    items = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class StageOutcome:
    """What a stage reports back: flat metrics, the fingerprint of its input data, small artifacts to log."""

    metrics: dict[str, float]
    data_fingerprint: str
    json_artifacts: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    pipeline_tags: dict[str, str] = field(default_factory=dict)


def run_stage(
    stage: str,
    args: argparse.Namespace,
    config: BaseModel,
    work: Callable[[], StageOutcome],
    metrics_path: Path | None,
) -> StageOutcome:
    """Run `work` inside the stage's nested MLflow run (unless --no-tracking) and write its metrics file."""
    from components import tracking

    if args.no_tracking:
        outcome = work()
    else:
        with tracking.stage_run(stage, flatten(config), params_path=args.params):
            outcome = work()
            tracking.record_outcome(
                outcome.metrics, outcome.data_fingerprint, outcome.json_artifacts, outcome.files, outcome.pipeline_tags
            )
    if metrics_path is not None:
        write_json_atomic(metrics_path, outcome.metrics)
    return outcome


def guarded(entry: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], int]:
    """Wrap a stage main: expected failures print one clear error and exit 2, without a traceback."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            entry(argv)
        except EXPECTED_ERRORS as exc:
            log.error("%s", exc)
            return 2
        return 0

    wrapper.__doc__ = entry.__doc__
    return wrapper


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(f"usage: embedforge {{{','.join(STAGES)}}} [--help] ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"components.{argv[0]}")
    return guarded(module.main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
