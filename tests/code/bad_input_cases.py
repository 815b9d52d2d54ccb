"""The bad-input table of issue #7, and the harness that runs one case through a real stage CLI.

Every case is one broken input (a raw pair file for `curate`, a BEIR directory for `evaluate`, or the params)
next to otherwise valid inputs. `run_case` runs the stage in-process through `components.cli.main`, in a fresh
working directory, and reports what a user would see: the exit code, the error message, whether anything
crashed, and whether any output was written or changed. A clean rejection is exit code 2 with a message that
names the input (file and line, or the params key) and says what was expected, and no output touched.

Shared by `tests/code/test_bad_input.py` (one test per case and variant) and `bench/reliability.py` (the
figures), so both always try the same list.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import re
import shutil
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from components import artifacts
from components.cli import main as cli_main

Stage = Literal["curate", "evaluate"]

# --- valid inputs -------------------------------------------------------------------------------------------

TOPICS = ("audio", "video", "network", "database", "compiler", "editor", "python", "fonts", "games", "kernel",
          "printing", "mail", "crypto", "science", "webserver")


def _pair(topic: str, part: int) -> dict[str, str]:
    return {"id": f"{topic}-{part}", "query": f"{topic} tools, part {part}",
            "positive": f"This package provides {topic} utilities for Debian systems; part {part} ships the "
                        f"{['core', 'extra'][part]} {topic} plugins.",
            "package": f"{topic}-{part}", "source": f"src-{topic}"}


VALID_PAIRS = [_pair(topic, part) for topic in TOPICS for part in range(2)]  # 30 pairs, 15 sources
PAIR_LINES = [json.dumps(row).encode() for row in VALID_PAIRS]
CORPUS_LINES = [json.dumps({"_id": f"d{i}", "title": "", "text": row["positive"]}).encode()
                for i, row in enumerate(VALID_PAIRS[:6], start=1)]
QUERY_LINES = [json.dumps({"_id": f"q{i}", "text": row["query"]}).encode()
               for i, row in enumerate(VALID_PAIRS[:3], start=1)]
QRELS_LINES = [b"query-id\tcorpus-id\tscore", b"q1\td1\t1", b"q2\td2\t1", b"q3\td3\t1"]


def valid_params(model: Path) -> dict[str, object]:
    """Params for a tiny, fast run of both stages on the tiny model; a case overrides one key."""
    return {
        "profile": "default",
        "curate": {"embed_model": str(model), "embed_dtype": "float32", "embed_max_seq_length": 64,
                   "n_clusters": 3, "kmeans_iterations": 5,
                   "split_fractions": {"train": 0.6, "dev": 0.2, "test": 0.2}},
        "evaluate": {"batch_size": 8, "top_k": 10},
        "profiles": {"smoke": {"curate": {"n_clusters": 2}}},
    }


def _lines(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _pairs_with(bad: bytes, at: int = 3) -> bytes:
    """The valid pair file with `bad` as line `at`: the reader must not stop at the first good lines."""
    return _lines([*PAIR_LINES[: at - 1], bad, *PAIR_LINES[at - 1:]])


def _row(**fields: object) -> bytes:
    return json.dumps({"query": "mail server tools", "positive": VALID_PAIRS[0]["positive"]} | fields).encode()


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _beir_with(name: str, bad: bytes, at: int = 2) -> dict[str, bytes | None]:
    lines = {"corpus.jsonl": CORPUS_LINES, "queries.jsonl": QUERY_LINES, "qrels/test.tsv": QRELS_LINES}[name]
    return {name: _lines([*lines[: at - 1], bad, *lines[at - 1:]])}


# --- the table ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BadInput:
    """One broken input. `where` is what the error must name (`{pairs}`, `{beir}`, `{params}` are filled with
    the real paths), `expected` a regex for what the message must say was expected, after `where`."""

    id: str
    stage: Stage
    where: str
    expected: str
    pairs: bytes | Callable[[], bytes] | None = None  # content of the raw pair file (curate); None: the valid one
    pairs_name: str = "pairs.jsonl"
    write_pairs: bool = True  # False: the input file does not exist
    beir: Mapping[str, bytes | None] = field(default_factory=dict)  # BEIR file -> content, None: removed
    params: Mapping[str, object] = field(default_factory=dict)  # overrides of the stage's valid params section
    params_text: str | None = None  # the whole params file, as given (replaces the valid one)
    write_params: bool = True  # False: the params file does not exist
    argv: tuple[str, ...] = ()

    @property
    def input_kind(self) -> str:
        return "params" if self.params or self.params_text is not None or not self.write_params or self.argv else (
            "beir" if self.beir else "raw_pairs")


GZ = "pairs.jsonl.gz"
LINE_LIMIT = 1 << 20

CASES: list[BadInput] = [
    # raw pair files (curate --input)
    BadInput("truncated-gzip", "curate", "{pairs}: ", r"truncated or corrupt compressed file",
             pairs=lambda: gzip.compress(_lines(PAIR_LINES))[:200], pairs_name=GZ),
    BadInput("gz-name-but-not-gzip", "curate", "{pairs}: ", r"truncated or corrupt compressed file",
             pairs=_lines(PAIR_LINES), pairs_name=GZ),
    BadInput("malformed-json-line", "curate", "{pairs}:3: ", r"malformed JSON",
             pairs=_pairs_with(b'{"query": "mail tools", "positive": ')),
    BadInput("malformed-json-line-in-gzip", "curate", "{pairs}:3: ", r"malformed JSON",
             pairs=lambda: gzip.compress(_pairs_with(b"{oops")), pairs_name=GZ),
    BadInput("line-is-a-list-not-an-object", "curate", "{pairs}:3: ", r"expected a JSON object .* got list",
             pairs=_pairs_with(b'["mail tools", "a mail transfer agent"]')),
    BadInput("query-is-a-number", "curate", "{pairs}:3: ", r"field 'query' must be a string, got int",
             pairs=_pairs_with(_row(query=42))),
    BadInput("positive-is-a-list", "curate", "{pairs}:3: ", r"field 'positive' must be a string, got list",
             pairs=_pairs_with(_row(positive=["a", "b"]))),
    BadInput("id-is-a-number", "curate", "{pairs}:3: ", r"field 'id' must be a string, got int",
             pairs=_pairs_with(_row(id=7))),
    BadInput("missing-positive", "curate", "{pairs}:3: ", r"missing required field\(s\) \['positive'\]",
             pairs=_pairs_with(b'{"query": "mail server tools"}')),
    BadInput("missing-both-texts", "curate", "{pairs}:3: ", r"missing required field\(s\) \['query', 'positive'\]",
             pairs=_pairs_with(b'{"id": "x"}')),
    BadInput("extra-field", "curate", "{pairs}:3: ", r"unknown field\(s\) \['score'\]; allowed are",
             pairs=_pairs_with(_row(score=0.9))),
    BadInput("empty-query", "curate", "{pairs}:3: ", r"field 'query' is empty",
             pairs=_pairs_with(_row(query=""))),
    BadInput("whitespace-only-positive", "curate", "{pairs}:3: ", r"field 'positive' is empty",
             pairs=_pairs_with(_row(positive=" \t\n\u00a0 "))),
    BadInput("invisible-only-query", "curate", "{pairs}:3: ", r"field 'query' is empty .*invisible",
             pairs=_pairs_with(_row(query="\u200b\u00ad\ufeff\u2060"))),
    BadInput("control-characters-only-positive", "curate", "{pairs}:3: ", r"field 'positive' is empty .*control",
             pairs=_pairs_with(_row(positive="\u0000\u0007\u001b\u007f"))),
    BadInput("raw-control-character-inside-a-string", "curate", "{pairs}:3: ",
             r"malformed JSON \(Invalid control character",
             pairs=_pairs_with(b'{"query": "mail\x01tools", "positive": "A mail transfer agent for Debian."}')),
    BadInput("invalid-utf8", "curate", "{pairs}:3: ", r"not valid UTF-8 \(byte \d+\); re-encode the file as UTF-8",
             pairs=_pairs_with(b'{"query": "caf\xe9 menu", "positive": "A caf\xe9 menu planner for Debian."}')),
    BadInput("lone-surrogate-escape", "curate", "{pairs}:3: ", r"lone surrogate",
             pairs=_pairs_with(b'{"query": "mail \\ud800 tools", "positive": "A mail transfer agent for Debian."}')),
    BadInput("huge-line", "curate", "{pairs}:3: ", rf"line longer than {LINE_LIMIT} bytes",
             pairs=lambda: _pairs_with(_row(query="x" * (2 * LINE_LIMIT)))),
    BadInput("huge-file-without-newlines", "curate", "{pairs}:1: ", rf"line longer than {LINE_LIMIT} bytes",
             pairs=lambda: b"{" * (3 * LINE_LIMIT)),
    BadInput("nesting-too-deep", "curate", "{pairs}:3: ", r"unreadable JSON",
             pairs=_pairs_with(b"[" * 100_000)),
    BadInput("duplicate-id", "curate", "{pairs}:3: ", r"duplicate id 'audio-0', already used by line 1",
             pairs=_pairs_with(PAIR_LINES[0])),
    BadInput("empty-file", "curate", "{pairs}: ", r"no rows; the input must hold at least one", pairs=b""),
    BadInput("only-blank-lines", "curate", "{pairs}: ", r"no rows", pairs=b"\n \n\t\n"),
    BadInput("input-file-missing", "curate", "{pairs}: ", r"input file not found", write_pairs=False),
    BadInput("unsupported-extension", "curate", "{pairs}: ", r"unsupported format; give a \.jsonl",
             pairs=b"query,positive\n", pairs_name="pairs.csv"),
    BadInput("parquet-not-parquet", "curate", "{pairs}: ", r"not a readable Parquet file",
             pairs=b"PAR1 not really", pairs_name="pairs.parquet"),
    BadInput("parquet-query-column-of-numbers", "curate", "{pairs}: row 0: ", r"field 'query' must be a string, got int",
             pairs=lambda: _parquet(pd.DataFrame({"query": [1, 2, 3], "positive": [VALID_PAIRS[0]["positive"]] * 3})),
             pairs_name="pairs.parquet"),
    BadInput("parquet-duplicate-id", "curate", "{pairs}: row 2: ", r"duplicate id 'a', already used by row 0",
             pairs=lambda: _parquet(pd.DataFrame({"id": ["a", "b", "a"], "query": ["mail tools"] * 3,
                                                  "positive": [VALID_PAIRS[0]["positive"]] * 3})),
             pairs_name="pairs.parquet"),
    # BEIR directories (evaluate --beir)
    BadInput("beir-corpus-missing", "evaluate", "{beir}/corpus.jsonl: ", r"missing; a BEIR directory needs",
             beir={"corpus.jsonl": None}),
    BadInput("beir-queries-missing", "evaluate", "{beir}/queries.jsonl: ", r"missing; a BEIR directory needs",
             beir={"queries.jsonl": None}),
    BadInput("beir-qrels-missing", "evaluate", "{beir}/qrels/test.tsv: ", r"missing qrels file for split 'test'",
             beir={"qrels/test.tsv": None}),
    BadInput("qrels-unknown-query", "evaluate", "{beir}/qrels/test.tsv:2: ", r"query id 'q404' is not in queries",
             beir=_beir_with("qrels/test.tsv", b"q404\td1\t1")),
    BadInput("qrels-unknown-document", "evaluate", "{beir}/qrels/test.tsv:3: ", r"corpus id 'd404' is not in corpus",
             beir=_beir_with("qrels/test.tsv", b"q1\td404\t1", at=3)),
    BadInput("qrels-two-columns", "evaluate", "{beir}/qrels/test.tsv:2: ", r"expected 3 tab-separated columns",
             beir=_beir_with("qrels/test.tsv", b"q1\td1")),
    BadInput("qrels-score-not-an-integer", "evaluate", "{beir}/qrels/test.tsv:2: ", r"score 'high' is not an integer",
             beir=_beir_with("qrels/test.tsv", b"q1\td4\thigh")),
    BadInput("qrels-duplicate-judgement", "evaluate", "{beir}/qrels/test.tsv:5: ",
             r"query 'q1' and corpus id 'd1' are already judged on line 2",
             beir=_beir_with("qrels/test.tsv", b"q1\td1\t0", at=5)),
    BadInput("qrels-invalid-utf8", "evaluate", "{beir}/qrels/test.tsv:2: ", r"not valid UTF-8",
             beir=_beir_with("qrels/test.tsv", b"q1\td\xe9\t1")),
    BadInput("qrels-only-a-header", "evaluate", "{beir}/qrels/test.tsv: ", r"no judgements",
             beir={"qrels/test.tsv": _lines(QRELS_LINES[:1])}),
    BadInput("corpus-malformed-line", "evaluate", "{beir}/corpus.jsonl:2: ", r"malformed JSON",
             beir=_beir_with("corpus.jsonl", b'{"_id": "d9", "text": ')),
    BadInput("corpus-numeric-id", "evaluate", "{beir}/corpus.jsonl:2: ", r"expected an object with a string '_id'",
             beir=_beir_with("corpus.jsonl", b'{"_id": 9, "text": "numeric id"}')),
    BadInput("corpus-duplicate-id", "evaluate", "{beir}/corpus.jsonl:2: ", r"duplicate id 'd1'",
             beir=_beir_with("corpus.jsonl", b'{"_id": "d1", "text": "the same id again"}')),
    BadInput("corpus-empty-text", "evaluate", "{beir}/corpus.jsonl:2: ", r"empty text for id 'd9'",
             beir=_beir_with("corpus.jsonl", b'{"_id": "d9", "title": "", "text": " \\u200b "}')),
    BadInput("corpus-text-is-a-number", "evaluate", "{beir}/corpus.jsonl:2: ", r"field 'text' must be a string, got int",
             beir=_beir_with("corpus.jsonl", b'{"_id": "d9", "title": "", "text": 42}')),
    BadInput("corpus-huge-line", "evaluate", "{beir}/corpus.jsonl:2: ", rf"line longer than {LINE_LIMIT} bytes",
             beir=_beir_with("corpus.jsonl", b'{"_id": "d9", "text": "' + b"x" * (2 * LINE_LIMIT) + b'"}')),
    BadInput("queries-invalid-utf8", "evaluate", "{beir}/queries.jsonl:2: ", r"not valid UTF-8",
             beir=_beir_with("queries.jsonl", b'{"_id": "q9", "text": "caf\xe9"}')),
    BadInput("queries-duplicate-id", "evaluate", "{beir}/queries.jsonl:3: ", r"duplicate id 'q1'",
             beir=_beir_with("queries.jsonl", b'{"_id": "q1", "text": "again"}', at=3)),
    BadInput("queries-blank-line", "evaluate", "{beir}/queries.jsonl:2: ", r"malformed JSON",
             beir=_beir_with("queries.jsonl", b"")),
    # params (params.yaml, --profile, --set)
    BadInput("param-out-of-range", "curate", "{params}:curate.eps: ", r"less than 1 \(got 2\)", params={"eps": 2}),
    BadInput("param-zero-batch", "curate", "{params}:curate.embed_batch_size: ", r"greater than or equal to 1",
             params={"embed_batch_size": 0}),
    BadInput("param-wrong-type-int", "curate", "{params}:curate.n_clusters: ", r"valid integer.*\(got 'many'\)",
             params={"n_clusters": "many"}),
    BadInput("param-wrong-type-bool", "curate", "{params}:curate.semantic_dedup: ", r"valid boolean",
             params={"semantic_dedup": "sometimes"}),
    BadInput("param-unknown-choice", "curate", "{params}:curate.keep: ", r"farthest_from_centroid",
             params={"keep": "random"}),
    BadInput("param-fractions-not-summing-to-one", "curate", "{params}:curate: ", r"sum to 1",
             params={"split_fractions": {"train": 0.8, "dev": 0.1, "test": 0.2}}),
    BadInput("param-unknown-key", "curate", "{params}:curate.epz: ", r"Extra inputs are not permitted",
             params={"epz": 0.1}),
    BadInput("param-evaluate-top-k-too-small", "evaluate", "{params}:evaluate.top_k: ", r"greater than or equal to 10",
             params={"top_k": 5}),
    BadInput("param-evaluate-unknown-dtype", "evaluate", "{params}:evaluate.dtype: ", r"'float32' or 'bfloat16'",
             params={"dtype": "float16"}),
    BadInput("unknown-profile-on-the-command-line", "curate", "{params}: ",
             r"profile 'nope' is not defined; known profiles: default, smoke", argv=("--profile", "nope")),
    BadInput("unknown-profile-in-the-file", "curate", "{params}: ", r"profile 'staging' is not defined",
             params_text="profile: staging\ncurate: {}\n"),
    BadInput("set-out-of-range", "curate", "{params}:curate.eps: ", r"greater than 0", argv=("--set", "eps=-1")),
    BadInput("set-without-value", "curate", "--set 'eps': ", r"expected KEY=VALUE", argv=("--set", "eps")),
    BadInput("section-not-a-mapping", "curate", "{params}: curate: ", r"expected a mapping .* got list",
             params_text="curate: [1, 2]\n"),
    BadInput("profile-section-not-a-mapping", "curate", "{params}: profiles.smoke: ", r"expected a mapping",
             params_text="curate: {}\nprofiles: {smoke: 3}\n", argv=("--profile", "smoke")),
    BadInput("params-not-yaml", "curate", "{params}: ", r"not valid YAML", params_text="curate: [1, 2\n"),
    BadInput("params-invalid-utf8", "curate", "{params}: ", r"not valid UTF-8", params_text="curate: {eps: \udce9}\n"),
    BadInput("params-file-missing", "curate", "{params}: ", r"params file not found", write_params=False),
]


# --- running a case -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workspace:
    """One run's working directory: inputs under `in/`, every output under `out/`."""

    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def argv(self, stage: Stage, pairs_name: str, model: Path) -> list[str]:
        common = ["--params", str(self.inputs / "params.yaml"), "--no-tracking"]
        if stage == "curate":
            return ["curate", *common, "--input", str(self.inputs / pairs_name), "--output", str(self.out / "curated"),
                    "--embeddings", str(self.out / "embeddings"), "--beir", str(self.out / "beir"),
                    "--metrics", str(self.out / "curate.json"), "--plot", str(self.out / "drops.csv")]
        return ["evaluate", *common, "--model", f"tiny={model}", "--beir", str(self.inputs / "beir"),
                "--metrics", str(self.out / "evaluate.json")]


def write_inputs(workspace: Workspace, model: Path, case: BadInput | None = None) -> None:
    """Valid inputs for both stages, with the one broken input of `case` (if any) in place."""
    inputs = workspace.inputs
    (inputs / "beir" / "qrels").mkdir(parents=True, exist_ok=True)
    pairs = _lines(PAIR_LINES) if case is None or case.pairs is None else case.pairs
    if case is None or case.write_pairs:
        (inputs / (case.pairs_name if case else "pairs.jsonl")).write_bytes(pairs() if callable(pairs) else pairs)
    beir: dict[str, bytes | None] = {"corpus.jsonl": _lines(CORPUS_LINES), "queries.jsonl": _lines(QUERY_LINES),
                                     "qrels/test.tsv": _lines(QRELS_LINES)} | dict(case.beir if case else {})
    for name, content in beir.items():
        if content is not None:
            (inputs / "beir" / name).write_bytes(content)
    params = valid_params(model)
    if case is not None and case.params:
        params[case.stage] = {**params[case.stage], **case.params}  # type: ignore[dict-item]
    if case is None or case.write_params:
        text = json.dumps(params, indent=1) if case is None or case.params_text is None else case.params_text
        (inputs / "params.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int | None  # None: it crashed
    errors: list[str]  # messages the stage logged at ERROR
    crash: str | None  # the traceback of an exception the CLI let through
    console: str  # everything printed to stdout and stderr


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_stage(workspace: Workspace, stage: Stage, model: Path, pairs_name: str = "pairs.jsonl",
              extra_argv: tuple[str, ...] = ()) -> RunOutcome:
    """Run `embedforge <stage>` in-process from inside the workspace, as a user would from a shell."""
    collect = _Collect()
    logger = logging.getLogger("embedforge")
    logger.addHandler(collect)
    console = io.StringIO()
    exit_code: int | None = None
    crash = None
    try:
        with contextlib.chdir(workspace.root), contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            try:
                exit_code = cli_main([*workspace.argv(stage, pairs_name, model), *extra_argv])
            except SystemExit as exc:  # argparse
                exit_code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001 - a crash is what this harness is here to count
                crash = traceback.format_exc()
    finally:
        logger.removeHandler(collect)
    return RunOutcome(exit_code, collect.messages, crash, console.getvalue())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes); empty when `root` does not exist."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def fingerprints(out: Path) -> dict[str, str]:
    """Artifact dir -> fingerprint, for every artifact under `out`, each verified against its manifest."""
    result = {}
    for manifest_path in sorted(out.rglob(artifacts.MANIFEST)):
        manifest = json.loads(manifest_path.read_text())
        verified = artifacts.read_manifest(manifest_path.parent, kind=manifest["kind"],
                                           schema_version=manifest["schema_version"])
        result[manifest_path.parent.relative_to(out).as_posix()] = verified.fingerprint
    return result


def leftovers(out: Path) -> list[str]:
    """Temporary or retired directories a publish left behind."""
    return sorted(path.name for path in out.glob(".*") if re.search(r"\.(tmp|old)-", path.name)) if out.exists() else []


@dataclass(frozen=True)
class CaseResult:
    case: BadInput
    variant: Literal["fresh", "existing"]
    outcome: RunOutcome
    where: str  # `case.where` with the real paths
    outputs_changed: list[str]  # files written, changed or removed under out/
    stray_files: list[str]  # files written outside in/ and out/
    leftovers: list[str]

    @property
    def message(self) -> str:
        return self.outcome.errors[0] if self.outcome.errors else ""

    @property
    def names_the_input(self) -> bool:
        return self.where in self.message

    @property
    def says_what_was_expected(self) -> bool:
        return re.search(re.escape(self.where) + ".*" + self.case.expected, self.message, re.DOTALL) is not None

    @property
    def crashed(self) -> bool:
        return self.outcome.crash is not None or "Traceback" in self.outcome.console

    @property
    def corrupted(self) -> bool:
        """Any output written, changed or half-written: must never happen."""
        return bool(self.outputs_changed or self.stray_files or self.leftovers)

    @property
    def rejected_cleanly(self) -> bool:
        return (self.outcome.exit_code == 2 and not self.crashed and self.names_the_input
                and self.says_what_was_expected and not self.corrupted)


def run_case(case: BadInput, root: Path, model: Path, baseline: Path | None = None) -> CaseResult:
    """Run one case in a fresh workspace under `root`; with `baseline` (a previous valid run's `out/`), the
    outputs already hold published artifacts, which must come out byte-identical."""
    workspace = Workspace(root)
    write_inputs(workspace, model, case)
    if baseline is not None:
        shutil.copytree(baseline, workspace.out)
    before = snapshot(workspace.out)
    outcome = run_stage(workspace, case.stage, model, case.pairs_name, case.argv)
    after = snapshot(workspace.out)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    stray = sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                   if path.is_file() and path.relative_to(root).parts[0] not in ("in", "out"))
    where = case.where.format(pairs=workspace.inputs / case.pairs_name, beir=workspace.inputs / "beir",
                              params=workspace.inputs / "params.yaml")
    return CaseResult(case, "existing" if baseline is not None else "fresh", outcome, where, changed, stray,
                      leftovers(workspace.out))


def valid_run(root: Path, model: Path, stage: Stage) -> tuple[RunOutcome, Path]:
    """The control: the same harness on valid inputs must succeed and publish; returns its `out/`."""
    workspace = Workspace(root)
    write_inputs(workspace, model)
    return run_stage(workspace, stage, model), workspace.out


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """For scripts: keep the stages' INFO lines off the terminal while still letting errors reach `run_stage`."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    saved = (root.level, list(root.handlers))
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
