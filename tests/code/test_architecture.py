"""The shape between stages is declared once: stages never import each other, the table's flow is consistent, and
what is derived from it (dvc.yaml) is current. Adapters depend on the core only, never on each other."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from components.stages import IMAGE_VERSION, STAGES, produced_by
from tests.helpers import REPO_ROOT, run_python


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_module_imports_another_stage_module(stage: str) -> None:
    imported = _imported_modules(REPO_ROOT / "components" / f"{stage}.py")
    others = {f"components.{name}" for name in STAGES if name != stage}
    assert not imported & others, f"{stage} imports {sorted(imported & others)}: move the shared part to a " \
                                  f"shared module (artifact_types, training, embed, ...)"


@pytest.mark.parametrize(("adapter", "other"), [("dags", "pipelines"), ("pipelines", "dags")])
def test_no_adapter_imports_another(adapter: str, other: str) -> None:
    for path in (REPO_ROOT / adapter).glob("*.py"):
        assert not {name for name in _imported_modules(path) if name.split(".")[0] == other}, path


def test_every_input_artifact_is_made_earlier_in_the_pipeline_with_the_kind_its_reader_expects() -> None:
    order = list(STAGES)
    for stage in STAGES.values():
        for port in stage.inputs:
            producer = produced_by(port.artifact)
            if producer is None:
                assert port.kind is None, f"{stage.name} --{port.name}: nothing produces {port.artifact!r}"
                continue
            made = next(out for out in producer.outputs if out.artifact == port.artifact)
            assert made.kind == port.kind, f"{stage.name} --{port.name} reads {port.kind} but gets {made.kind}"
            assert order.index(producer.name) < order.index(stage.name), (stage.name, port.artifact)


def test_every_output_artifact_has_one_producer_and_one_path() -> None:
    outputs = [port for stage in STAGES.values() for port in stage.outputs]
    assert len({port.artifact for port in outputs}) == len(outputs)
    assert len({port.path for port in outputs}) == len(outputs)


def test_dvc_yaml_is_what_the_stage_table_gives() -> None:
    """Commands, deps (inputs plus each stage module's import closure), params, outs, metrics and plots."""
    result = run_python(["scripts/dvc_yaml.py", "--check"])
    assert result.returncode == 0, result.stderr


def test_a_stage_depends_on_every_project_module_it_imports_even_inside_functions(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dvc_yaml", REPO_ROOT / "scripts" / "dvc_yaml.py")
    dvc_yaml = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dvc_yaml)
    deps = dvc_yaml.code_deps(STAGES["index"])
    # index builds int8 indexes with the codec in artifact_types, and its CLI runs through cli.py and config.py
    assert {"components/index.py", "components/artifact_types.py", "components/cli.py",
            "components/config.py"} <= set(deps)
    assert "components/quantize.py" not in deps and "components/train.py" not in deps


def test_the_images_carry_the_package_version() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert IMAGE_VERSION == pyproject["project"]["version"]


def test_the_readme_diagram_is_the_stage_table_flow() -> None:
    """Each line `inputs ─► stage ─► outputs` of the README's architecture diagram names the table's artifacts."""
    readme = (REPO_ROOT / "README.md").read_text()
    lines = {line.split(" ─► ")[1]: line for line in readme.splitlines() if line.count(" ─► ") == 2}
    for name, stage in STAGES.items():
        inputs, _, outputs = lines[name].split(" ─► ")
        assert inputs.split(", ") == list(dict.fromkeys(port.artifact for port in stage.inputs)), name
        made = [port.artifact for port in stage.outputs if port.kind is not None]
        assert outputs.split(", ") == (made or ["the MLflow registry"]), name


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO_ROOT / "bench").glob("*.py")))
def test_every_benchmark_imports_what_it_uses_from_where_it_now_lives(script: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", REPO_ROOT / "bench" / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # main() runs only under __main__
