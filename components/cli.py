"""Command-line plumbing shared by every stage, and the `embedforge <stage>` dispatcher.

Each stage module owns its argv parsing in `main(argv)`; this module gives them the common flags, logging,
tracking, the metrics file and one place that turns expected failures into a clear message and exit code 2.

Path arguments that may be `s3://` URIs are declared with the argparse types below (`artifact_in`, `file_in`,
`artifact_out`); `parse_stage_args` turns them into local paths (downloading inputs) and checks every
input artifact's manifest (kind, schema version, content) before any work, so a stage's entry function only
ever sees local, verified `Path`s, and `run_stage` uploads the outputs once the work has succeeded.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from components import storage, tracking
from components.artifacts import MANIFEST, ArtifactError, read_manifest
from components.config import PARAMS_FILE, ConfigError, ConfigT, load_stage_config, parse_overrides
from components.data import DataError
from components.stages import STAGES, Port
from components.validation import ValidationFailed

log = logging.getLogger("embedforge")

EXPECTED_ERRORS = (ConfigError, DataError, ArtifactError, ValidationFailed, FileNotFoundError,
                   storage.StorageError, tracking.TrackingUnavailable)
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # disk full, quota exceeded, read-only file system


@dataclass(frozen=True)
class Location:
    """A path argument as given (a local path or an `s3://` URI) and how the stage uses it."""

    given: str
    role: Literal["artifact_in", "file_in", "artifact_out"]
    kind: tuple[str, int] | None = None  # an input artifact's expected manifest kind and schema version
    manifest_optional: bool = False  # a plain directory without a manifest is accepted too


def _location(text: str, role: Literal["artifact_in", "file_in", "artifact_out"], **checks: Any) -> Location:
    if storage.is_s3(text):
        try:
            storage.S3Uri.parse(text)
        except storage.StorageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return Location(text, role, **checks)


def artifact_in(kind: str, schema_version: int, *, manifest_optional: bool = False) -> Callable[[str], Location]:
    """argparse type for an input artifact directory of `kind`, local or `s3://bucket/prefix` (fetched).

    `prepare_stage` checks its manifest (kind, schema version, every file's sha256) before the stage starts,
    so a wrong or tampered input is refused in seconds, by every stage in the same words. With
    `manifest_optional`, a local directory without a manifest (a BEIR set from elsewhere, say) is let through
    for the stage's own reader to check.
    """
    def parse(text: str) -> Location:
        return _location(text, "artifact_in", kind=(kind, schema_version), manifest_optional=manifest_optional)

    parse.__name__ = f"{kind} artifact"  # argparse names the type in its error messages
    return parse


def file_in(text: str) -> Location:
    """argparse type: an input file, local or `s3://bucket/key` (fetched)."""
    return _location(text, "file_in")


def artifact_out(text: str) -> Location:
    """argparse type: an output artifact directory, local or `s3://bucket/prefix` (uploaded, manifest last)."""
    return _location(text, "artifact_out")


def local_path(text: str) -> Path:
    """argparse type: a path that must be local (metrics, plots, reports, checkpoints)."""
    if storage.is_s3(text):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a local path (s3:// is for artifacts and input files)")
    return Path(text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the params list in the epilog keeps its lines."""


def _port_type(port: Port, is_input: bool) -> Callable[[str], Any]:
    if port.kind is None:
        return file_in if is_input else local_path
    if is_input:
        return artifact_in(port.kind.kind, port.kind.schema_version, manifest_optional=port.manifest_optional)
    return artifact_out


def params_help(stage: str, model: type[BaseModel]) -> str:
    """Each param of the stage's section with its default and description, from its config class."""
    lines = [f"params (section `{stage}` of the params file, then the profile's overrides, then --set):"]
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = default.value if isinstance(default, Enum) else default
        lines.append(f"  {name} = {json.dumps(shown)}: {info.description or ''}".rstrip(": "))
    return "\n".join(lines)


def stage_parser(stage: str, model: type[BaseModel]) -> argparse.ArgumentParser:
    """The stage's parser: its input and output paths from the stage table, the common flags, and its params
    (with defaults and descriptions) in the help's epilog."""
    row = STAGES[stage]
    parser = argparse.ArgumentParser(
        prog=f"embedforge {stage}",
        description=f"{stage}: {row.summary}",
        epilog=params_help(stage, model) + "\n\nArtifact directories and input files may be s3://BUCKET/PREFIX "
               "URIs (credentials and endpoint from the AWS environment or profile: AWS_PROFILE, AWS_ENDPOINT_URL, "
               "...); metrics, plots, reports and checkpoints are local paths.",
        formatter_class=_HelpFormatter,
    )
    for port in row.ports:  # argparse passes string defaults through the type too
        parser.add_argument(port.flag, type=_port_type(port, port in row.inputs), default=port.path, help=port.help)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file with one section per stage")
    parser.add_argument("--profile", default=None, help="params profile to apply (default: the file's `profile` key)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"override one `{stage}` param after the profile (value as YAML; a.b=VALUE sets one "
                             f"key of a mapping; repeatable)")
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
    parser: argparse.ArgumentParser, argv: list[str] | None, model: type[ConfigT], stage: str,
    args: argparse.Namespace | None = None,
) -> tuple[argparse.Namespace, ConfigT]:
    """Parse argv (unless already parsed into `args`), configure logging, and validate the stage's config and
    inputs before any work starts."""
    args = parser.parse_args(argv) if args is None else args
    configure_logging(args.verbose)
    config = load_stage_config(model, stage, args.params, args.profile, parse_overrides(args.overrides))
    prepare_stage(args)
    return args, config


def prepare_stage(args: argparse.Namespace) -> None:
    """Check the tracking server answers, then turn every `Location` argument into a local `Path`.

    Inputs on S3 are fetched into the local cache; every input artifact's manifest is checked; S3 outputs get
    a temporary local path and are recorded in `args.staging` for `run_stage` to upload. Runs before any work,
    so a dead server or a missing, wrong or tampered input fails in seconds.
    """
    if not args.no_tracking:
        tracking.check_server()
    staging = storage.Staging()
    args.given = {}  # every path argument as given (an s3:// URI stays one): what a stage records as a reference
    for name, value in list(vars(args).items()):
        if not isinstance(value, Location):
            continue
        args.given[name] = value.given
        if not storage.is_s3(value.given):
            local = Path(value.given)
        elif value.role == "artifact_in":
            local = storage.fetch_artifact(value.given)
        elif value.role == "file_in":
            local = storage.fetch_file(value.given)
        else:
            local = staging.output_path(value.given)
        if value.kind is not None and ((local / MANIFEST).exists() or not value.manifest_optional):
            kind, schema_version = value.kind
            read_manifest(local, kind=kind, schema_version=schema_version)
        setattr(args, name, local)
    args.staging = staging


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
    """Run `work` inside the stage's nested MLflow run (unless --no-tracking), then upload its S3 outputs
    (recorded by `prepare_stage`) and write its metrics file. A failed upload fails the stage run."""
    staging: storage.Staging = getattr(args, "staging", None) or storage.Staging()
    try:
        if args.no_tracking:
            outcome = work()
            staging.upload()
        else:
            with tracking.stage_run(stage, flatten(config), params_path=args.params):
                outcome = work()
                staging.upload()
                tracking.record_outcome(outcome.metrics, outcome.data_fingerprint, outcome.json_artifacts,
                                        outcome.files, outcome.pipeline_tags)
    finally:
        staging.cleanup()
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
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            log.error("%s: %s; nothing was published (outputs are as they were before this run) - free space or "
                      "choose another output location, then re-run", exc.filename or "writing the outputs",
                      exc.strerror or os.strerror(exc.errno))
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
