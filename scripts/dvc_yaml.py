"""Write `dvc.yaml` from the stage table: the local orchestrator's stages, derived rather than hand-kept.

Each stage's command passes every port of its row at its table path; its deps are its input paths plus its
code, the import closure of `components/<stage>.py` inside the project (what `python -m components.<stage>`
runs, so DVC re-runs a stage when any module it uses changes); its params are its own section plus the active
profile's override of it. Outputs, metrics and plots come from the ports' `dvc` roles.

    python scripts/dvc_yaml.py           # rewrite dvc.yaml
    python scripts/dvc_yaml.py --check   # exit 1 when dvc.yaml differs from what the table gives (CI runs this)
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.stages import STAGES, Port, Stage  # noqa: E402

DVC_YAML = ROOT / "dvc.yaml"
HEADER = """\
# Generated from the stage table (components/stages.py) by `python scripts/dvc_yaml.py`: edit the table, not this
# file (a test fails when they differ). Each stage runs its CLI; `dvc repro` re-runs what changed: its inputs,
# its code (the stage module's import closure), its params section or the active profile's override of it.
# Outputs are not `persist`ed: DVC removes them before a stage runs (`dvc checkout` restores the last good ones
# after a failure), and its run-cache restores them for params already run instead of re-computing.
"""
# How `dvc plots show` draws each plot file (presentation only; which files are plots comes from the table).
PLOT_VIEWS: dict[str, dict[str, Any]] = {
    "plots/curate_drops.csv": {"template": "bar_horizontal", "x": "count", "y": "reason",
                               "title": "Pairs dropped by each curation rule"},
    "plots/ndcg_vs_dim.csv": {"template": "linear", "x": "dim", "y": ["base", "teacher", "student"],
                              "title": "nDCG@10 on the Debian test split vs embedding dims (exact float search)"},
    "plots/ndcg_vs_dim_by_precision.csv": {
        "template": "linear", "x": "dim", "y": ["float_flat", "int8_flat", "binary_flat", "binary_flat_rescore"],
        "title": "Student nDCG@10 vs dims, per precision (flat indexes)"},
    "plots/ndcg_vs_bytes.csv": {"template": "scatter", "x": "bytes_per_vector", "y": "ndcg@10",
                                "title": "nDCG@10 vs index bytes per vector (every model, dim, precision, index)"},
    "plots/mine_scores.png": {},
}


def module_path(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def project_imports(path: Path) -> set[str]:
    """Modules of the `components` package that a file imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "components":
            if node.module == "components":  # `from components import storage`
                found |= {f"components.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "components"}
    return {module for module in found if module_path(module).is_file()}


def import_closure(module: str) -> set[str]:
    """`module` and every project module it imports, directly or through others."""
    seen: set[str] = set()
    pending = [module, "components"]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        path = module_path(current) if current != "components" else ROOT / "components" / "__init__.py"
        pending.extend(project_imports(path))
    return seen


def code_deps(stage: Stage) -> list[str]:
    paths = {(ROOT / "components" / "__init__.py") if module == "components" else module_path(module)
             for module in import_closure(stage.module)}
    return sorted(path.relative_to(ROOT).as_posix() for path in paths)


def _declared(port: Port) -> list[tuple[str, str]]:
    """(dvc section, path) of what DVC tracks of an output port."""
    if port.dvc == "none":
        return []
    return list(port.dvc_paths) or [(port.dvc, port.path)]


def dvc_stage(stage: Stage) -> dict[str, Any]:
    cmd = " ".join([f"python -m {stage.module} --params params.yaml",
                    *(f"{port.flag} {port.path}" for port in stage.ports)])
    entry: dict[str, Any] = {
        "cmd": cmd,
        "deps": [*dict.fromkeys(port.path for port in stage.inputs), *code_deps(stage)],
        "params": ["profile", stage.name, f"profiles.${{profile}}.{stage.name}"],
    }
    sections: dict[str, list[Any]] = {"outs": [], "metrics": [], "plots": []}
    for port in stage.outputs:
        for role, path in _declared(port):
            if role == "out":
                sections["outs"].append(path)
            else:
                sections["outs" if role == "uncached" else role].append({path: {"cache": False}})
    entry |= {section: paths for section, paths in sections.items() if paths}
    return entry


def render() -> str:
    document = {"stages": {name: dvc_stage(stage) for name, stage in STAGES.items()},
                "plots": [{path: view} if view else path for path, view in PLOT_VIEWS.items()]}
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not what the table gives")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if DVC_YAML.read_text() != text:
            print("dvc.yaml differs from the stage table: run `python scripts/dvc_yaml.py` and commit it",
                  file=sys.stderr)
            return 1
        return 0
    DVC_YAML.write_text(text)
    print(DVC_YAML)
    return 0


if __name__ == "__main__":
    sys.exit(main())
