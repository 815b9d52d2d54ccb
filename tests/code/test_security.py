"""Security (issue #7 item 4): no unsafe deserialisation or remote code in the project's own source, and no
credentials from the environment in MLflow params or logs."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from components.cli import STAGES
from components.config import StageConfig
from tests.helpers import REPO_ROOT, run_python

SCANNED = ("components", "pipelines", "dags")

# A call is unsafe when its dotted name ends with one of these; the value says what makes it unsafe.
ALWAYS_UNSAFE = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
                 "cloudpickle.load", "cloudpickle.loads", "pandas.read_pickle", "pd.read_pickle", "marshal.loads",
                 "shelve.open", "torch.package.PackageImporter"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: what` for every unsafe load in `source`: pickle-family loads, `torch.load` without
    `weights_only=True`, `numpy.load(..., allow_pickle=True)`, `yaml.load` without a safe loader, and
    `trust_remote_code` set to anything but the constant False."""
    findings = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name in ALWAYS_UNSAFE or any(name.endswith("." + unsafe) for unsafe in ALWAYS_UNSAFE):
            findings.append(f"{where}: {name}() unpickles")
        if name.endswith("torch.load") and not _is_constant(_keyword(node, "weights_only"), True):
            findings.append(f"{where}: torch.load without weights_only=True")
        if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and not _is_constant(
                _keyword(node, "allow_pickle"), False) and _keyword(node, "allow_pickle") is not None:
            findings.append(f"{where}: numpy load with allow_pickle not False")
        if name in ("yaml.load", "yaml.load_all") and "Safe" not in ast.unparse(_keyword(node, "Loader") or
                                                                                 ast.Constant(None)):
            findings.append(f"{where}: {name} without a safe Loader")
        remote = _keyword(node, "trust_remote_code")
        if remote is not None and not _is_constant(remote, False):
            findings.append(f"{where}: trust_remote_code={ast.unparse(remote)}")
    return findings


@pytest.mark.parametrize(
    ("snippet", "flagged"),
    [
        ("import pickle\npickle.load(open('m.pkl', 'rb'))", True),
        ("import pickle\npickle.loads(blob)", True),
        ("import joblib\njoblib.load('model.joblib')", True),
        ("import pandas as pd\npd.read_pickle('frame.pkl')", True),
        ("import torch\ntorch.load('state.pt')", True),
        ("import torch\ntorch.load('state.pt', weights_only=False)", True),
        ("import torch\ntorch.load('state.pt', map_location='cpu', weights_only=True)", False),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", True),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=flag)", True),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=False)", False),
        ("import numpy as np\nnp.load('a.npy')", False),  # numpy's default is allow_pickle=False
        ("import yaml\nyaml.load(text)", True),
        ("import yaml\nyaml.load(text, Loader=yaml.SafeLoader)", False),
        ("import yaml\nyaml.safe_load(text)", False),
        ("SentenceTransformer(path, trust_remote_code=True)", True),
        ("AutoModel.from_pretrained(path, trust_remote_code=config.remote)", True),
        ("SentenceTransformer(path, trust_remote_code=False)", False),
        ("SentenceTransformer(path)", False),
        ("import json\njson.load(handle)", False),
    ],
)
def test_the_scanner_flags_unsafe_loads_and_passes_safe_ones(snippet: str, flagged: bool) -> None:
    assert bool(unsafe_loads(snippet)) is flagged, unsafe_loads(snippet)


def _project_sources() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (REPO_ROOT / folder).rglob("*.py"))


def test_project_source_has_no_unsafe_load_and_no_remote_code() -> None:
    sources = _project_sources()
    assert len(sources) >= 15 and any(path.name == "embed.py" for path in sources)
    findings = [finding for path in sources
                for finding in unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))]
    assert findings == []


def test_models_are_loaded_in_one_place_with_remote_code_off_and_offline() -> None:
    """Every stage loads models through `embed.load_model`, which passes trust_remote_code=False."""
    direct = [f"{path.relative_to(REPO_ROOT)}:{number}" for path in _project_sources() if path.name != "embed.py"
              for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
              if re.search(r"\bSentenceTransformer\(|\.from_pretrained\(", line)]
    assert direct == []
    from components.embed import load_model

    source = inspect.getsource(load_model)
    assert "trust_remote_code=False" in source and "local_files_only=True" in source


# --- credentials ---

CREDENTIAL_NAME = re.compile(r"secret|password|passwd|token|credential|access_key|api_key|session_key", re.I)


def _stage_configs() -> dict[str, type[StageConfig]]:
    configs = {}
    for stage in STAGES:
        module = importlib.import_module(f"components.{stage}")
        found = [value for value in vars(module).values() if inspect.isclass(value) and issubclass(value, StageConfig)
                 and value is not StageConfig and value.__module__ == module.__name__]
        assert len(found) == 1, (stage, found)
        configs[stage] = found[0]
    return configs


def test_no_stage_param_can_hold_a_credential() -> None:
    """MLflow params are the stage config flattened (`cli.run_stage`), so credentials can only come from env."""
    configs = _stage_configs()
    named = [f"{stage}.{field}" for stage, model in configs.items() for field in model.model_fields
             if CREDENTIAL_NAME.search(field)]
    assert named == []


@pytest.mark.slow
def test_env_credentials_reach_neither_mlflow_params_nor_tags_nor_the_console(tmp_path: Path,
                                                                              tiny_model_dir: Path) -> None:
    secret, key_id = "s3cr3t-value-never-logged", "AKIAEMBEDFORGETESTKEY"
    from tests.code.bad_input_cases import CORPUS_LINES, QRELS_LINES, QUERY_LINES

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    for name, lines in (("corpus.jsonl", CORPUS_LINES), ("queries.jsonl", QUERY_LINES), ("qrels/test.tsv", QRELS_LINES)):
        (beir / name).write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "params.yaml").write_text("evaluate: {batch_size: 8, top_k: 10}\n")
    env = {"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_TRACKING_PASSWORD": secret}
    done = run_python(["-m", "components.evaluate", "--params", "params.yaml", "--model",
                       f"tiny={tiny_model_dir}", "--beir", str(beir), "--metrics", "m.json", "-v"],
                      cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        params = db.execute("select key, value from params").fetchall()
        tags = db.execute("select key, value from tags").fetchall()
    assert ("top_k", "10") in params  # the run was tracked, with the config's params
    logged = json.dumps([params, tags])
    assert secret not in logged and key_id not in logged
    assert secret not in done.stdout + done.stderr and key_id not in done.stdout + done.stderr


SECRET_PATTERNS = (
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # a credential-named key set to a long token of letters and digits (not a placeholder, a name or a path)
    re.compile(r"(?i)(secret|password|token)[\w-]*[\"']?\s*[:=]\s*[\"']?(?!\$\{|placeholder|change-me)"
               r"(?=[\w/+=-]*\d)(?=[\w/+=-]*[A-Za-z])[A-Za-z0-9+_=-][\w/+=-]{19,}"),
)


def committed_secrets(text: str, name: str) -> list[str]:
    return [f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)[:12]}..."
            for pattern in SECRET_PATTERNS for match in pattern.finditer(text)]


@pytest.mark.parametrize(
    ("text", "found"),
    [("aws_access_key_id = AKIAABCDEFGHIJKLMNOP", True), ("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY", True),
     ("-----BEGIN OPENSSH PRIVATE KEY-----", True), ("AWS_SECRET_ACCESS_KEY: placeholder-secret-access-key", False),
     ("POSTGRES_PASSWORD=change-me-postgres-password", False), ("password: ${POSTGRES_PASSWORD:?set it}", False),
     ("credentials_secret: embedforge-credentials", False), ("PASSWORDS_FILE: /opt/airflow/auth/passwords", False),
     ("MLFLOW_TRACKING_TOKEN=ghp_0123456789abcdefABCDEF0123456789abcd", True)],
)
def test_the_secret_scanner_finds_keys_and_passes_placeholders(text: str, found: bool) -> None:
    assert bool(committed_secrets(text, "f")) is found


def test_no_credentials_are_committed_outside_the_tests() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    findings = []
    for name in tracked.splitlines():
        path = REPO_ROOT / name
        if name.startswith("tests/") or not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        findings += committed_secrets(text, name)
    assert findings == []
