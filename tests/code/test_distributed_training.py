"""Training under `torchrun` (issue #21): the train stage run as the PyTorchJob runs it, on CPU over gloo, and
distill under the same launcher.

Every launch here is the training container's command line in infra/k8s/base/pytorchjob-train.yaml, with the
values the Training Operator and the config map give its variables (NNODES pods of GPUS processes, RANK the
pod's index, the smoke profile) and the shared volume /artifacts a temporary dir, holding the smoke run's
curated and mined pairs (the `dvc repro` the session shares). Settings are cut down with `--set` so that the
file runs in a few minutes on two cores: 96 training pairs, one epoch of 8-pair batches, 32 tokens.

Two nodes of one process each is the base job's shape, and the one where `LOCAL_RANK` is 0 on every node: only
global rank 0 may track and publish. The kill test and distill run one node of two processes. Each rank logs
the rows of its data shard (components/training.py `data_shard_metrics`): that is what proves the ranks train
on distinct halves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.artifacts import read_manifest
from tests.helpers import REPO_ROOT, experiment_runs, run_python

pytestmark = pytest.mark.slow

PYTORCHJOB = REPO_ROOT / "infra" / "k8s" / "base" / "pytorchjob-train.yaml"
TORCHRUN = Path(sys.executable).parent / "torchrun"
BATCH_SIZE = 8
TRAIN_SETTINGS = ("max_train_pairs=96", "epochs=1", f"batch_size={BATCH_SIZE}", "max_seq_length=32",
                  "learning_rate=1e-4", "eval_steps=6", "dev_queries=50", "dev_corpus=57")
NDCG_TOLERANCE = 0.03  # absolute, dev nDCG@10 of two processes against one (see the test's docstring)
SHARD_LINE = re.compile(r"data shard of rank (\d+) of (\d+): (\d+) rows in (\d+) batches per epoch, "
                        r"first rows \[([\d, ]*)\]")
DISTILL_SETTINGS = ("distill_texts=64", "contrastive_pairs=32", f"batch_size={BATCH_SIZE}", "max_seq_length=32",
                    "eval_steps=3", "dev_queries=20", "dev_corpus=50")
DISTILL_PATHS = {"teacher": "models/teacher", "mined": "data/mined", "curated": "data/curated",
                 "output": "models/student", "checkpoints": "checkpoints/student", "metrics": "metrics/distill.json"}
LAUNCH_TIMEOUT_S = 300  # for all nodes of one launch (each took 20 to 50 s on two busy cores)


def pytorchjob_command() -> list[str]:
    """The training container's command and args in the PyTorchJob (Master; test_infra checks that every
    replica of every overlay runs the same)."""
    job = yaml.safe_load(PYTORCHJOB.read_text())
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return [*container["command"], *container["args"]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Volume:
    """A stand-in for the job's /artifacts: the smoke run's inputs, and the stage's outputs once it ran."""

    root: Path

    @classmethod
    def with_smoke_inputs(cls, root: Path, smoke: Path, *, teacher: bool = False) -> Volume:
        """The smoke run's curated and mined pairs (and its teacher, for distill) linked into `root`."""
        (root / "data").symlink_to(smoke / "data", target_is_directory=True)
        (root / "models").mkdir()
        if teacher:
            (root / "models" / "teacher").symlink_to(smoke / "models" / "teacher", target_is_directory=True)
        return cls(root)

    def path(self, artifact_path: str) -> Path:
        return self.root / artifact_path.removeprefix("/artifacts/")

    def metrics(self, stage: str) -> dict[str, float]:
        return json.loads(self.path(f"metrics/{stage}.json").read_text())

    def stage_runs(self, stage: str) -> list[object]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        return experiment_runs(client, f"tags.`embedforge.stage` = '{stage}'")

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        """Offline, tracking to this volume's own store, one OpenMP thread per process: the nodes here share the
        same cores (torchrun sets OMP_NUM_THREADS=1 itself only for several processes on one node)."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "MLFLOW_TRACKING_URI": self.tracking_uri, "OMP_NUM_THREADS": "1"}
        env.pop("EMBEDFORGE_PIPELINE_RUN", None)
        return env


def job_command(volume: Volume, *, nnodes: int, gpus: int, node_rank: int, port: int,
                stage: Sequence[str] | None = None, settings: Sequence[str] = TRAIN_SETTINGS) -> list[str]:
    """The PyTorchJob's command line as pod `node_rank` of `nnodes` pods of `gpus` processes runs it (with this
    venv's torchrun), plus `settings` as `--set`s; `stage` (module and flags) in place of the job's train stage."""
    values = {"NNODES": nnodes, "GPUS": gpus, "RANK": node_rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
              "EMBEDFORGE_PROFILE": "smoke"}
    words = [re.sub(r"\$\((\w+)\)", lambda match: str(values[match[1]]), word) for word in pytorchjob_command()]
    words = [str(volume.path(word)) if word.startswith("/artifacts/") else word for word in words]
    module = words.index("-m") + 1
    assert words[0] == "torchrun" and words[module] == "components.train"
    return [str(TORCHRUN), *words[1:module], *(words[module:] if stage is None else stage),
            *(f"--set={setting}" for setting in settings)]


@dataclass(frozen=True)
class Launch:
    exit_codes: list[int]  # one torchrun per node
    output: str  # every node's torchrun and its processes, stdout and stderr
    seconds: float
    killed_after: str | None = None  # the checkpoint that was complete when a rank was killed

    def shards(self) -> dict[int, tuple[int, int, int, list[int]]]:
        """Each rank's log line about its data shard: rank -> (world size, rows, batches, first rows)."""
        lines = [match.groups() for match in SHARD_LINE.finditer(self.output)]
        shards = {int(rank): (int(world), int(rows), int(batches), [int(row) for row in first.split(", ")])
                  for rank, world, rows, batches, first in lines}
        assert len(shards) == len(lines), f"a rank logged its shard twice: {lines}"
        return shards


def training_processes(agents: set[int]) -> dict[int, int]:
    """Global rank -> pid of the training processes that the torchrun processes `agents` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0") if parent in agents else []
        except (OSError, IndexError, ValueError):
            continue
        rank = [item.split("=", 1)[1] for item in environ if item.startswith("RANK=")]
        if rank:
            found[int(rank[0])] = int(entry.name)
    return found


def launch(commands: list[list[str]], volume: Volume, *, kill_rank: int | None = None,
           checkpoints: Path | None = None) -> Launch:
    """Start one torchrun per command (the nodes) and wait for all; with `kill_rank`, SIGKILL that rank's
    process as soon as a checkpoint is complete in `checkpoints` (its trainer_state.json is written last)."""
    logs = [volume.root / f"node-{index}-{time.monotonic_ns()}.log" for index in range(len(commands))]
    started = time.perf_counter()
    nodes = [subprocess.Popen(command, cwd=REPO_ROOT, env=volume.env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
             for command, log in zip(commands, logs, strict=True)]
    deadline = started + LAUNCH_TIMEOUT_S
    killed_after = None
    try:
        if kill_rank is not None and checkpoints is not None:
            while not (done := sorted(checkpoints.glob("checkpoint-*/trainer_state.json"))):
                assert all(node.poll() is None for node in nodes), "training ended before it wrote a checkpoint"
                assert time.perf_counter() < deadline, "no checkpoint written"
                time.sleep(0.05)
            os.kill(training_processes({node.pid for node in nodes})[kill_rank], signal.SIGKILL)
            killed_after = done[-1].parent.name
        exit_codes = [node.wait(timeout=max(1.0, deadline - time.perf_counter())) for node in nodes]
    finally:
        for node in nodes:  # after a failure: SIGTERM, which torchrun passes on to its processes
            if node.poll() is None:
                node.terminate()
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
    output = "\n".join(log.read_text(errors="replace") for log in logs)
    return Launch(exit_codes, output, time.perf_counter() - started, killed_after)


def assert_tracked_and_published_once(run: Launch, volume: Volume, stage: str, output: str) -> None:
    """One MLflow run for the stage, finished; one model published, verified by its manifest; no checkpoints."""
    (tracked,) = volume.stage_runs(stage)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.metrics["ranks"] == 2
    assert run.output.count("MLflow: stage run") == 1
    read_manifest(volume.path(f"models/{output}"), kind="sentence_transformer", schema_version=1)
    assert not [path.name for path in volume.path("models").iterdir() if path.name.startswith(".")]
    assert not volume.path(f"checkpoints/{output}").exists()  # removed once the model is published


def assert_each_rank_trained_on_its_own_half(run: Launch, metrics: dict[str, float], rows: int,
                                             uneven: bool = False) -> None:
    """Each of the two ranks logged its shard: half the rows each, different rows; none on both ranks. With
    `uneven` batches (the no-duplicates sampler held rows back), fewer than one batch of rows is repeated to
    even out the ranks, and fewer than one batch is left out."""
    shards = run.shards()
    assert set(shards) == {0, 1}
    assert {world for world, *_ in shards.values()} == {2}
    assert [shards[rank][1] for rank in (0, 1)] == [rows // 2, rows // 2]
    assert [shards[rank][2] for rank in (0, 1)] == [rows // 2 // BATCH_SIZE] * 2
    assert shards[0][3] != shards[1][3]
    if uneven:
        assert metrics["shard_rows_overlap"] < BATCH_SIZE and metrics["shard_rows_union"] > rows - BATCH_SIZE
    else:
        assert metrics["shard_rows_overlap"] == 0 and metrics["shard_rows_union"] == rows


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, dvc_smoke_artifacts: Path) -> tuple[Launch, Volume]:
    """The base job's shape: two nodes (pods) of one process each."""
    volume = Volume.with_smoke_inputs(tmp_path_factory.mktemp("two-nodes"), dvc_smoke_artifacts)
    port = free_port()
    run = launch([job_command(volume, nnodes=2, gpus=1, node_rank=rank, port=port) for rank in (0, 1)], volume)
    assert run.exit_codes == [0, 0], run.output[-6000:]
    return run, volume


def test_two_nodes_train_the_teacher_on_distinct_halves_and_only_global_rank_zero_tracks_and_publishes(
    two_nodes: tuple[Launch, Volume],
) -> None:
    run, volume = two_nodes
    metrics = volume.metrics("train")
    assert metrics["train_pairs"] == 96
    assert metrics["steps"] == 96 // (2 * BATCH_SIZE)  # each step: one batch on each rank
    assert_tracked_and_published_once(run, volume, "train", "teacher")
    assert_each_rank_trained_on_its_own_half(run, metrics, rows=96)


def test_two_processes_reach_the_dev_ndcg_of_one_process_on_the_same_inputs(
    two_nodes: tuple[Launch, Volume], tmp_path: Path, dvc_smoke_artifacts: Path
) -> None:
    """Same inputs, seed and settings, but not the same optimisation: two ranks average the gradients of two
    8-pair batches per step (half as many steps of twice the pairs), and each rank's in-batch negatives are its
    own 8 pairs. So the results are not expected to be equal, only as good: within NDCG_TOLERANCE = 0.03
    absolute. On the 50 dev queries, one query whose positive falls from rank 1 to rank 2 moves nDCG@10 by
    0.0074; the two differ by 0.011 here (0.9565 and 0.9679 from the base model's 0.9391), and 0.03 leaves
    room for about four such queries on another CPU (bf16 where native). It is about what the training gains,
    so that the distributed run gained at all is checked on its own."""
    distributed, volume = two_nodes
    single = Volume.with_smoke_inputs(tmp_path, dvc_smoke_artifacts)
    command = job_command(single, nnodes=1, gpus=1, node_rank=0, port=0)
    started = time.perf_counter()
    result = run_python(command[command.index("-m"):], env=single.env(), timeout=LAUNCH_TIMEOUT_S)  # no torchrun
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-6000:]
    one, two = single.metrics("train"), volume.metrics("train")
    print(f"\n1 process: {seconds:.1f}s wall, dev nDCG@10 {one['dev_ndcg@10_before']:.4f} -> "
          f"{one['dev_ndcg@10_best']:.4f} ({one['steps']:.0f} steps)\n2 processes (2 nodes): {distributed.seconds:.1f}s "
          f"wall, dev nDCG@10 {two['dev_ndcg@10_before']:.4f} -> {two['dev_ndcg@10_best']:.4f} ({two['steps']:.0f} steps)")
    assert one["dev_ndcg@10_before"] == pytest.approx(two["dev_ndcg@10_before"], abs=1e-6)  # the same base, dev set
    assert two["dev_ndcg@10_best"] > two["dev_ndcg@10_before"]
    assert two["dev_ndcg@10_best"] == pytest.approx(one["dev_ndcg@10_best"], abs=NDCG_TOLERANCE)
    assert len(single.stage_runs("train")) == 1


def test_a_rank_killed_mid_training_fails_the_job_and_the_restarted_job_resumes_from_the_last_checkpoint(
    tmp_path: Path, dvc_smoke_artifacts: Path
) -> None:
    """One node of two processes; the job's torchrun restarts nothing in place (with a static rendezvous a group
    of several nodes cannot re-form in place), so the killed rank fails it, and the Training Operator restarts
    the pod (restartPolicy OnFailure): the same command again, which resumes from the last checkpoint."""
    volume = Volume.with_smoke_inputs(tmp_path, dvc_smoke_artifacts)
    settings = (*TRAIN_SETTINGS, "eval_steps=2")  # checkpoints at steps 2, 4 and 6 (the last)
    checkpoints = volume.path("checkpoints/teacher")

    killed = launch([job_command(volume, nnodes=1, gpus=2, node_rank=0, port=free_port(), settings=settings)],
                    volume, kill_rank=1, checkpoints=checkpoints)
    assert killed.exit_codes != [0], "torchrun must fail when one of its processes is killed"
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", killed.output), killed.output[-3000:]
    assert not volume.path("models/teacher").exists()  # nothing published by the killed job
    assert not volume.path("metrics/train.json").exists()

    restarted = launch([job_command(volume, nnodes=1, gpus=2, node_rank=0, port=free_port(), settings=settings)],
                       volume)
    assert restarted.exit_codes == [0], restarted.output[-6000:]
    resumed_from = {int(step) for step in re.findall(r"resuming from \S+/checkpoint-(\d+)", restarted.output)}
    assert len(resumed_from) == 1, restarted.output[-3000:]  # every rank, from the same checkpoint
    (step,) = resumed_from
    assert int(killed.killed_after.removeprefix("checkpoint-")) <= step < 6
    metrics = volume.metrics("train")
    assert metrics["resumed"] == 1.0
    assert metrics["steps"] == 6
    finished = [run for run in volume.stage_runs("train") if run.info.status == "FINISHED"]
    assert len(finished) == 1
    read_manifest(volume.path("models/teacher"), kind="sentence_transformer", schema_version=1)


def test_distill_under_torchrun_trains_on_distinct_halves_and_only_global_rank_zero_tracks_and_publishes(
    tmp_path: Path, dvc_smoke_artifacts: Path
) -> None:
    """distill runs under the job's launcher as train does (one node of two processes, the smoke teacher)."""
    volume = Volume.with_smoke_inputs(tmp_path, dvc_smoke_artifacts, teacher=True)
    stage = ["components.distill", "--params", "params.yaml", "--profile", "smoke",
             *(word for name in ("teacher", "mined", "curated", "output", "checkpoints", "metrics")
               for word in (f"--{name}", str(volume.path(DISTILL_PATHS[name]))))]
    run = launch([job_command(volume, nnodes=1, gpus=2, node_rank=0, port=free_port(), stage=stage,
                              settings=DISTILL_SETTINGS)], volume)
    assert run.exit_codes == [0], run.output[-6000:]
    metrics = volume.metrics("distill")
    assert_tracked_and_published_once(run, volume, "distill", "student")
    # 64 texts to imitate and 32 contrastive triplets, in 8-row batches of one kind each. The no-duplicates
    # sampler holds back a triplet whose text is already in its batch (a hard negative can be another triplet's
    # positive), which makes the batches uneven when the sampled triplets share a text.
    triplets = pd.read_parquet(volume.path("data/mined") / "pairs.parquet").sample(n=32, random_state=42)
    shared = pd.concat([triplets[column] for column in ("query", "positive", "negative_1")]).duplicated().any()
    assert_each_rank_trained_on_its_own_half(run, metrics, rows=96, uneven=bool(shared))
