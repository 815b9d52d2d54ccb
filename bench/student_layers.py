"""Which teacher layers should a student keep? Dev nDCG@10 of every layer subset, before any distillation.

The distill stage initialises its student from a subset of the teacher's transformer layers
(`distill.layers`). Training has to repair whatever the cut breaks, and a CPU budget buys few steps, so the
subset that loses least on its own is the cheapest start. This script builds every subset of the requested
size with the stage's own `make_student`, scores each on the stage's own dev evaluator (the same queries,
corpus and sequence length as `distill`) and prints them best first, with the teacher for reference.

    python bench/student_layers.py                     # 3 of the teacher's layers, models/teacher
    python bench/student_layers.py --size 2 --dev-queries 200 --dev-corpus 800 --json student_layers.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import pandas as pd

from components.distill import DistillConfig, make_student
from components.embed import load_model
from components.training import dev_evaluator

METRIC = "dev_cosine_ndcg@10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher", help="teacher model directory")
    parser.add_argument("--curated", type=Path, default=Path("data/curated"), help="curated pairs (dev split)")
    parser.add_argument("--size", type=int, default=3, help="layers the student keeps")
    parser.add_argument("--dev-queries", type=int, default=DistillConfig().dev_queries, help="dev queries scored")
    parser.add_argument("--dev-corpus", type=int, default=DistillConfig().dev_corpus, help="dev passages searched")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    config = DistillConfig(dev_queries=args.dev_queries, dev_corpus=args.dev_corpus)  # the stage's length, seed
    evaluator = dev_evaluator(pd.read_parquet(args.curated / "pairs.parquet"), queries=config.dev_queries,
                              corpus=config.dev_corpus, seed=config.seed)
    teacher = load_model(args.teacher, max_seq_length=config.max_seq_length)
    depth = teacher[0].auto_model.config.num_hidden_layers
    teacher_score = evaluator(teacher)[METRIC]
    rows = []
    for layers in itertools.combinations(range(depth), args.size):
        started = time.perf_counter()
        score = evaluator(make_student(teacher, list(layers)))[METRIC]
        rows.append({"layers": list(layers), "ndcg@10": score, "of_teacher": score / teacher_score,
                     "seconds": time.perf_counter() - started})
    rows.sort(key=lambda row: row["ndcg@10"], reverse=True)
    print(f"\nDev nDCG@10 of {args.size}-of-{depth}-layer students cut from {args.teacher}, untrained "
          f"(teacher {teacher_score:.4f}; {config.dev_queries} queries, {config.dev_corpus} passages, "
          f"{config.max_seq_length} tokens)\n")
    print("| layers | nDCG@10 | x teacher |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['layers']} | {row['ndcg@10']:.4f} | {row['of_teacher']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"teacher": teacher_score, "students": rows}, indent=2))


if __name__ == "__main__":
    main()
