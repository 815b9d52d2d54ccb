"""Student recipes in and out of domain: distil one student per recipe from the pipeline's teacher, then score
base, teacher and every student on the Debian test split and on each out-of-domain set, with their encode speed.

A recipe is a name and distill params over the active profile's (`--recipe NAME key=value ...`); `--model
NAME=PATH` scores a student already made beside them (the pipeline's own, say). The out-of-domain sets are
`data/raw/ood/*` (FOLDOC and the Jargon File, built by scripts/build_text_snapshots.py); no recipe trains on them.

    python bench/student_recipes.py --out reports/student-recipes.json --model debian-only=models/student \\
        --recipe general-30 general_text_share=0.3 \\
        --recipe general-30-base general_text_share=0.3 general_targets=base
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from components.artifact_types import MODEL
from components.config import load_stage_config
from components.distill import DistillConfig, DistillPaths, distill
from components.evaluate import EvaluateConfig, evaluate_models, models_from_argv

log = logging.getLogger("student_recipes")

IN_DOMAIN = Path("data/beir/debian-test")
OOD_ROOT = Path("data/raw/ood")
DIMS = [384, 64]


def parse_recipes(items: list[list[str]]) -> dict[str, dict[str, Any]]:
    """`NAME key=value ...` -> {NAME: {key: value}} (values as YAML, as `--set` takes them)."""
    recipes = {}
    for name, *overrides in items:
        pairs = [override.split("=", 1) for override in overrides]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"recipe {name!r}: overrides must be key=value, got {overrides}")
        recipes[name] = {key: yaml.safe_load(value) for key, value in pairs}
    return recipes


def score(models: dict[str, str], sets: dict[str, Path]) -> dict[str, dict[str, float]]:
    """nDCG@10 at each of DIMS and docs/s, per model and set (exact float search, evaluate's own scoring)."""
    rows: dict[str, dict[str, float]] = {name: {} for name in models}
    for set_name, directory in sets.items():
        metrics = evaluate_models(models, directory, EvaluateConfig(), dims=DIMS)
        for name in models:
            for dim in DIMS:
                rows[name][f"{set_name}/d{dim}"] = metrics[f"{name}/d{dim}/ndcg@10"]
            rows[name][f"{set_name}/docs_per_s"] = metrics[f"{name}/encode_docs_per_s"]
    return rows


def run(out: Path, recipes: dict[str, dict[str, Any]], work: Path, teacher: Path,
        students: dict[str, str], reference: Path | None = None) -> dict[str, Any]:
    """Distil each recipe's student, then score base, teacher, the given `students` and the new ones; base and
    teacher rows come from `reference` (an earlier results file on the same sets) when given."""
    sets = {"debian": IN_DOMAIN} | {path.name: path for path in sorted(OOD_ROOT.iterdir()) if path.is_dir()}
    models = {"base": MODEL.read_manifest(teacher, verify=False).extra["base_model"], "teacher": str(teacher)}
    reused: dict[str, dict[str, float]] = {}
    if reference is not None:
        earlier = json.loads(reference.read_text())
        if earlier["sets"] != {name: str(path) for name, path in sets.items()}:
            raise SystemExit(f"{reference}: scored other sets ({earlier['sets']}); score base and teacher again")
        reused = {name: earlier["rows"][name] for name in ("base", "teacher")}
        models = {}
    models |= students
    distilled: dict[str, dict[str, float]] = {}
    for name, overrides in recipes.items():
        config = load_stage_config(DistillConfig, "distill", overrides=overrides)
        started = time.perf_counter()
        metrics = distill(config, DistillPaths(teacher=teacher, mined=Path("data/mined"), curated=Path("data/curated"),
                                               output=work / name, checkpoints=work / f"{name}-checkpoints",
                                               general_text=Path("data/raw/general-text/texts.jsonl.gz")))
        distilled[name] = {"distill_seconds": time.perf_counter() - started,
                           "general_texts": metrics["general_texts"], "student_dev_ndcg@10": metrics["student_dev_ndcg@10"]}
        models[name] = str(work / name)
    rows = reused | score(models, sets)
    ood_sets = [name for name in sets if name != "debian"]
    for name, row in rows.items():
        row["ood_mean/d384"] = sum(row[f"{set_name}/d384"] for set_name in ood_sets) / len(ood_sets)
        row |= distilled.get(name, {})
    result = {"recipes": recipes, "sets": {name: str(path) for name, path in sets.items()}, "rows": rows,
              "base_and_teacher_from": str(reference) if reference else None}
    out.write_text(json.dumps(result, indent=2))
    print(table(rows, ood_sets))
    return result


def table(rows: dict[str, dict[str, float]], ood_sets: list[str]) -> str:
    """One line per model: in-domain and each out-of-domain nDCG@10 at 384 (and 64) dims, the out-of-domain mean
    against the base model's, and the encode speed against the teacher's."""
    base_ood, teacher_speed = rows["base"]["ood_mean/d384"], rows["teacher"]["debian/docs_per_s"]
    header = ["model", "Debian 384", "Debian 64", *(f"{name} 384" for name in ood_sets), "OOD mean",
              "vs base", "docs/s vs teacher"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, row in rows.items():
        cells = [name, f"{row['debian/d384']:.4f}", f"{row['debian/d64']:.4f}",
                 *(f"{row[f'{set_name}/d384']:.4f}" for set_name in ood_sets), f"{row['ood_mean/d384']:.4f}",
                 f"{row['ood_mean/d384'] - base_ood:+.4f}", f"{row['debian/docs_per_s'] / teacher_speed:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--recipe", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE ...]",
                        help="a student to distil: its name and its distill params over the profile's")
    parser.add_argument("--model", action="append", metavar="NAME=PATH",
                        help="a student already made, scored beside (e.g. debian-only=models/student)")
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/student-recipes"), help="where students are written")
    parser.add_argument("--reference", type=Path,
                        help="an earlier results file whose base and teacher rows are reused (their quality is "
                             "deterministic; the docs/s ratios then compare across runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args.out, parse_recipes(args.recipe), args.work, args.teacher, models_from_argv(args.model), args.reference)


if __name__ == "__main__":
    main()
