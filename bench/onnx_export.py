"""ONNX export: the student as ONNX with int8 weights against the float student (quality) and teacher (speed).

Why: CPU serving of one query is bound by reading the weights (bench/serve.py); `embedforge export` writes the
transformer with int8 weights for ONNX Runtime. This measures, in one run, what that costs and buys:

- quality: nDCG@10 on the test split (exact float search, `evaluate.evaluate_models`) of the float student and
  its int8 ONNX export at every Matryoshka dim, and their ratio (issue #24's goal: >= 0.99);
- speed: passages/s encoding test passages in batches of 64, and single-query latency p50/p99, of the float
  teacher, the float student and the int8 student, interleaved repeats (a slow spell hits all alike); ratios to
  the float teacher (goal: >= 3x).

    python bench/onnx_export.py [--teacher models/teacher] [--student models/student] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.data import read_beir
from components.embed import load_model, resolve_model_path
from components.evaluate import EvaluateConfig, evaluate_models
from components.export import check_metrics, export_onnx, onnx_record


def passages_per_s(model: Any, passages: list[str]) -> float:
    started = time.perf_counter()
    model.encode(passages, batch_size=64, show_progress_bar=False)
    return len(passages) / (time.perf_counter() - started)


def query_latency_ms(model: Any, queries: list[str]) -> list[float]:
    timings = []
    for query in queries:
        started = time.perf_counter()
        model.encode([query], show_progress_bar=False)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in header) + " |"
              for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher", help="float teacher (speed reference)")
    parser.add_argument("--student", default="models/student",
                        help="float student, exported here; or a student distill published with its export")
    parser.add_argument("--beir", type=Path, default=Path("data/beir/debian-test"), help="test split")
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64], help="Matryoshka dims scored")
    parser.add_argument("--passages", type=int, default=1000, help="passages per throughput pass")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per pass")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="onnx-export-") as folder:
        exported, float_student = Path(folder) / "student-onnx", args.student
        record = onnx_record(resolve_model_path(args.student))
        if record is not None and "source" not in record:  # distill's onnx_int8: the float model is beside it
            exported, float_student = resolve_model_path(args.student), str(Path(folder) / "student-float")
            shutil.copytree(exported, float_student, ignore=shutil.ignore_patterns("onnx", "manifest.json"))
            print(f"export (distill's): {check_metrics(record)}\n", flush=True)
        else:
            print(f"export: {export_onnx(args.student, exported)}\n", flush=True)
        quality = evaluate_models({"student": float_student, "student_onnx_int8": str(exported)}, args.beir,
                                  EvaluateConfig(), dims=args.dims)
        rows = [{"dim": dim, "float student": quality[f"student/d{dim}/ndcg@10"],
                 "int8 ONNX student": quality[f"student_onnx_int8/d{dim}/ndcg@10"],
                 "ratio": quality[f"student_onnx_int8/d{dim}/ndcg@10"] / quality[f"student/d{dim}/ndcg@10"]}
                for dim in args.dims]
        print(f"## nDCG@10 on {args.beir} (exact float search)\n\n{markdown(rows)}\n", flush=True)

        dataset = read_beir(args.beir)
        passages = list(dataset.corpus.values())[:args.passages]
        queries = list(dataset.queries.values())[:args.queries]
        models = {"float teacher": load_model(args.teacher), "float student": load_model(float_student),
                  "int8 ONNX student": load_model(str(exported))}
        for model in models.values():
            model.encode(passages[:64], batch_size=64, show_progress_bar=False)  # warm-up
        speed: dict[str, list[float]] = {name: [] for name in models}
        latency: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                speed[name].append(passages_per_s(model, passages))
                latency[name] += query_latency_ms(model, queries)
    reference = statistics.median(speed["float teacher"])
    reference_p50 = float(np.percentile(latency["float teacher"], 50))
    table = [{"model": name, "passages/s (median)": statistics.median(speed[name]),
              "x teacher": statistics.median(speed[name]) / reference,
              "query p50 ms": float(np.percentile(latency[name], 50)),
              "query p99 ms": float(np.percentile(latency[name], 99)),
              "p50 x teacher": reference_p50 / float(np.percentile(latency[name], 50))} for name in models]
    print(f"## encode speed ({args.repeats} interleaved passes, {len(passages)} passages in batches of 64, "
          f"{len(queries)} single queries)\n\n{markdown(table)}")


if __name__ == "__main__":
    main()
