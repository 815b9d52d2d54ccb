"""Serve: `embedforge serve` driven by concurrent HTTP clients, on the run's test corpus and on 1M vectors.

Why: a search box needs single-query latency end to end (HTTP, encode, search, rescoring, passage text) and a
throughput figure for sizing; issue #24's goal is p99 <= 10 ms at 1M vectors on 2 cores.

Each corpus is served by a real `embedforge serve` process, started from artifacts exactly as a user starts it;
clients are threads of this process, each with its own keep-alive connection, sending one query per request
(`POST /search`, k=10) from the run's real test queries, after a warm-up. Reported per client count: requests/s,
p50 and p99 latency (ms) as the client measured it, and the server's start-up time.

- `test corpus`: the default run's model, operating point and indexes (`data/...`, `models/student`);
- `1M synthesised`: the run's student vectors of the test corpus plus perturbed copies up to `--size` (marked:
  the same growth as bench/index_scaling.py, passages tagged with their variant), written as quantize, index,
  BEIR and evaluation artifacts in a scratch folder and served at the run's operating point settings (its
  index type, dims and rescoring) and, beside it, with a binary IVF index. Quality is not measured there
  (synthesised documents have no judgements); bench/scale.py measures recall at 1M.

    python bench/serve.py [--clients 1 4 16] [--requests 200] [--size 1000000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench's corpus growth
from index_scaling import grow  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.artifact_types import (  # noqa: E402
    BEIR,
    INDEXES,
    QUANTIZED,
    Provenance,
    binary_codes,
    int8_codes,
    read_evaluation,
    read_quantized,
    write_beir_artifact,
    write_evaluation,
    write_quantized_model,
)
from components.data import BeirDataset, read_beir  # noqa: E402
from components.embed import truncate  # noqa: E402
from components.index import IndexConfig, build_indexes  # noqa: E402
from tests.servers import running_serve  # noqa: E402


def drive(port: int, queries: list[str], clients: int, per_client: int) -> dict[str, float]:
    """`clients` threads, each sending `per_client` single-query searches on its own connection."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for number in range(per_client):
            body = json.dumps({"queries": [queries[(offset + number) % len(queries)]], "k": 10})
            sent = time.perf_counter()
            connection.request("POST", "/search", body=body, headers={"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append((time.perf_counter() - sent) * 1000)
            if response.status != 200:
                raise RuntimeError(f"/search answered {response.status}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(index * 7919,)) for index in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}


def measure(label: str, arguments: list[str], queries: list[str], args: argparse.Namespace,
            scratch: Path) -> list[dict[str, Any]]:
    """One `embedforge serve` process (the tests' launcher: a free port, stopped after), driven at each client
    count; its log goes to a folder of its own in `scratch`."""
    workdir = scratch / label.replace(" ", "_").replace(",", "")
    workdir.mkdir()
    rows = []
    started = time.perf_counter()
    with running_serve(arguments, workdir, {}) as url:
        startup = time.perf_counter() - started
        port = int(url.rsplit(":", 1)[1])
        drive(port, queries, 1, 20)  # warm-up: first requests pay for lazy imports and page faults
        for clients in args.clients:
            row = {"corpus": label, "startup_s": startup, **drive(port, queries, clients, args.requests)}
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            rows.append(row)
    return rows


def synthesised_artifacts(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path, Path]:
    """quantize, index, BEIR and evaluation artifacts of `size` documents grown from the run's student vectors;
    the operating point keeps the run's settings (model, dims, rescoring)."""
    real = read_quantized(args.quantized)
    evaluation = read_evaluation(args.evaluation)
    point = evaluation.operating_point
    model, dim = point["chosen"]["model"], int(point["chosen"]["dim"])
    dataset = read_beir(args.beir)
    vectors = grow(real.float32(model, real.models[model]["dim"]), args.size, seed=1)
    doc_ids = [doc_id if copy == 0 else f"{doc_id}~v{copy}" for copy in range(-(-args.size // len(real.doc_ids)))
               for doc_id in real.doc_ids][:args.size]
    corpus = {doc_id: dataset.corpus[doc_id.split("~")[0]] + ("" if "~" not in doc_id else
                                                              f" [synthesised variant {doc_id.split('~v')[1]}]")
              for doc_id in doc_ids}
    beir = scratch / "beir"
    write_beir_artifact(beir, BeirDataset(corpus, dataset.queries, dataset.qrels),
                        Provenance("bench/serve.py", "synthesised", {"grown_from": real.manifest.fingerprint}))
    calibration = json.loads(real.calibration_path(model).read_text())
    ranges = real.ranges(model, dim)
    prefix = truncate(vectors, dim)
    quantized = scratch / "quantized"
    record = dict(real.models[model], dims=[dim])
    with QUANTIZED.publish(quantized, Provenance("bench/serve.py", "synthesised", {
            "beir": BEIR.read_manifest(beir).fingerprint,
            f"model:{model}": real.manifest.inputs[f"model:{model}"]})) as (tmp, meta):
        (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
        write_quantized_model(tmp / model, vectors, {dim: (int8_codes(prefix, ranges), binary_codes(prefix))},
                              calibration={**calibration, "dims": {str(dim): calibration["dims"][str(dim)]}})
        meta["counts"] = {"documents": len(doc_ids), "models": 1}
        meta["extra"] = {"models": {model: record}, "dtype": "float32"}
    index = scratch / "index"
    build_indexes(IndexConfig(types=[point["chosen"]["index"], "binary_ivf"], models=[model]), quantized, index)
    return quantized, index, beir


def with_index(point: dict[str, Any], index: str, path: Path, inputs: dict[str, str]) -> Path:
    """The operating point record with another index type: what serve loads from an evaluation artifact."""
    chosen = dict(point["chosen"], index=index, ndcg_at_10=float("nan"))
    write_evaluation(path, [], {**point, "chosen": chosen, "reason": "bench/serve.py: synthesised corpus, "
                                "quality not measured"}, Provenance("bench/serve.py", "synthesised", inputs))
    return path


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k])
                                       for k in header) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="models/student", help="model served (the run's student)")
    parser.add_argument("--evaluation", type=Path, default=Path("data/evaluation"))
    parser.add_argument("--index", type=Path, default=Path("data/index"))
    parser.add_argument("--quantized", type=Path, default=Path("data/quantized"))
    parser.add_argument("--beir", type=Path, default=Path("data/beir/debian-test"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--size", type=int, default=1_000_000, help="synthesised corpus size (0: skip)")
    args = parser.parse_args()
    for name in ("evaluation", "index", "quantized", "beir"):  # the service runs in a scratch folder of its own
        setattr(args, name, getattr(args, name).resolve())
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())

    queries = list(read_beir(args.beir).queries.values())
    print(f"machine: {os.cpu_count()} cores; queries: {len(queries)} real test queries, one per request\n",
          flush=True)
    paths = ["--model", args.model, "--index", str(args.index), "--quantized", str(args.quantized),
             "--beir", str(args.beir)]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
        scratch = Path(folder)
        rows = measure("test corpus", [*paths, "--evaluation", str(args.evaluation)], queries, args, scratch)
        if args.size:
            built = time.perf_counter()
            quantized, index, beir = synthesised_artifacts(args, scratch)
            print(f"synthesised {args.size} documents in {time.perf_counter() - built:.0f}s", flush=True)
            point = read_evaluation(args.evaluation).operating_point
            inputs = {"beir": BEIR.read_manifest(beir).fingerprint, "index": INDEXES.read_manifest(index).fingerprint}
            synthesised = ["--model", args.model, "--index", str(index), "--quantized", str(quantized),
                           "--beir", str(beir)]
            for kind in dict.fromkeys([point["chosen"]["index"], "binary_ivf"]):
                evaluation = with_index(point, kind, scratch / f"evaluation-{kind}", inputs)
                label = f"{args.size} synthesised, {kind}{' + rescore' if point['chosen']['rescored'] else ''}"
                rows += measure(label, [*synthesised, "--evaluation", str(evaluation)], queries, args, scratch)
    print(f"\n## embedforge serve, single-query POST /search (k=10), latency as the clients saw it\n\n"
          f"{markdown(rows)}")


if __name__ == "__main__":
    main()
