"""Command-line plumbing shared by every stage, and the `embedforge <stage>` dispatcher.

Each stage module owns its argv parsing in `main(argv)`; this module gives them the common flags, logging,
tracking, the metrics file and one place (`guarded`, with the `FAILURES` table) that turns expected failures
into a clear message and an exit code an orchestrator can act on: `EXIT_USAGE` (2) for a bad input, param,
artifact or failed validation, which no retry can fix, and `EXIT_TEMPFAIL` (75, BSD sysexits' EX_TEMPFAIL) for
an infrastructure failure (S3, the network, the MLflow server, a full or read-only disk) that a retry may get past.
Anything else is a bug: its traceback is shown and the interpreter exits 1.

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
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel

from components import storage, tracking
from components.artifacts import MANIFEST, ArtifactError, read_manifest
from components.config import PARAMS_FILE, ConfigError, ConfigT, load_stage_config, parse_overrides
from components.data import DataError
from components.stages import STAGES, Port
from components.validation import ValidationFailed

log = logging.getLogger("embedforge")

EXIT_USAGE = 2  # bad input, params, artifact or validation: permanent, retrying cannot help
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: S3, network, MLflow server, disk full or read-only: transient, a retry may help
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # disk full, quota exceeded, read-only file system


def _out_of_space(exc: BaseException) -> TypeGuard[OSError]:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def _network_failure(exc: BaseException | None) -> bool:
    """A connection refused, reset or timed out, or S3 unavailable, anywhere in the exception's chain: MLflow's
    client wraps the socket error in an MlflowException, boto3 a ClientError in an S3UploadFailedError."""
    requests = sys.modules.get("requests")  # loaded by MLflow's client; no requests error exists without it
    lost: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    if requests is not None:
        lost += (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, lost) or storage.transient(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return False


# How `guarded` reads a failure, first match wins: (exception types, or a predicate on the exception; exit code;
# what failed). Transient rows come before the permanent ones they specialise (StorageUnavailable is a
# StorageError); the chain search for a network error comes last, so a permanent error keeps its code.
FAILURES: tuple[tuple[tuple[type[BaseException], ...] | Callable[[BaseException], bool], int, str], ...] = (
    ((storage.StorageUnavailable,), EXIT_TEMPFAIL, "S3 unreachable, timing out or overloaded"),
    ((tracking.TrackingUnavailable,), EXIT_TEMPFAIL, "the MLflow tracking server is unavailable"),
    (_out_of_space, EXIT_TEMPFAIL, "disk full, quota exceeded or file system read-only"),
    ((ConfigError,), EXIT_USAGE, "bad params"),
    ((DataError,), EXIT_USAGE, "bad input data"),
    ((ArtifactError,), EXIT_USAGE, "missing, wrong or corrupt input artifact"),
    ((ValidationFailed,), EXIT_USAGE, "the data failed validation"),
    ((FileNotFoundError,), EXIT_USAGE, "missing input file"),
    ((storage.StorageError,), EXIT_USAGE, "S3 location malformed, missing or refused"),
    (_network_failure, EXIT_TEMPFAIL, "a network connection failed or timed out"),
)
RETRY_ADVICE = {EXIT_USAGE: "permanent, a retry cannot help: fix it, then run again",
                EXIT_TEMPFAIL: "transient, retrying later can help"}


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
        parser.add_argument(port.flag, dest=port.name, type=_port_type(port, port in row.inputs), default=port.path,
                            help=port.help)
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
            with tracking.stage_run(stage, flatten(config), params_path=args.params,
                                    final=stage == list(STAGES)[-1]):
                outcome = work()
                staging.upload()
                tracking.record_outcome(outcome.metrics, outcome.data_fingerprint, outcome.json_artifacts,
                                        outcome.files, outcome.pipeline_tags)
                tracking.log_datasets(artifact_datasets(stage, args))
    finally:
        staging.cleanup()
    if metrics_path is not None:
        write_json_atomic(metrics_path, STAGES[stage].headline_metrics(outcome.metrics))
    return outcome


def artifact_datasets(stage: str, args: argparse.Namespace) -> list[tracking.ArtifactDataset]:
    """The stage's input and output artifacts that have a manifest, where they were given (an s3:// URI stays
    one) and their fingerprints: what its MLflow run records as datasets."""
    row = STAGES[stage]
    found = []
    for port in row.ports:
        local = getattr(args, port.name, None)
        if port.kind is None or local is None or not (Path(local) / MANIFEST).is_file():
            continue
        manifest = read_manifest(local, kind=port.kind.kind, schema_version=port.kind.schema_version, verify=False)
        given = args.given.get(port.name, str(local))
        uri = given if storage.is_s3(given) else str(Path(given).resolve())
        found.append(tracking.ArtifactDataset(port.artifact, uri, manifest.fingerprint,
                                              "input" if port in row.inputs else "output"))
    return found


def classify(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and what failed, from the first `FAILURES` row that matches; None for a bug."""
    for matches, code, reason in FAILURES:
        if isinstance(exc, matches) if isinstance(matches, tuple) else matches(exc):
            return code, reason
    return None


def describe(exc: BaseException) -> str:
    """The error line's text: the exception's own message, or for a full or read-only disk which file and that
    nothing was published."""
    if _out_of_space(exc):
        return (f"{exc.filename or 'writing the outputs'}: {exc.strerror or os.strerror(exc.errno or 0)}; nothing "
                f"was published (outputs are as they were before this run) - free space or choose another output "
                f"location")
    return str(exc) or type(exc).__name__


def guarded(entry: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], int]:
    """Wrap a stage main: an expected failure (see `FAILURES`) logs one clear error line, saying whether a retry
    can help, and returns its exit code (`EXIT_USAGE` or `EXIT_TEMPFAIL`) without a traceback; a bug propagates
    (traceback, exit 1)."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            entry(argv)
        except Exception as exc:
            found = classify(exc)
            if found is None:
                raise
            code, reason = found
            log.error("%s [exit %d, %s: %s]", describe(exc), code, reason, RETRY_ADVICE[code])
            return code
        return 0

    wrapper.__doc__ = entry.__doc__
    return wrapper


TOOLS = ("search", "serve", "export")  # use what a run made: not stages of the pipeline


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*STAGES, *TOOLS):
        print(f"usage: embedforge {{{','.join((*STAGES, *TOOLS))}}} [--help] ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    module = importlib.import_module(f"components.{argv[0]}")
    return guarded(module.main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
