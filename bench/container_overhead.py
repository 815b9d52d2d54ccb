"""What does running a stage in a container cost? The fixed cost per stage run, container vs this venv, medians.

Each stage is started the way the orchestrators start it, and stopped once its CLI is up (`<stage> --help`: the
interpreter, the stage module and its parser; heavy libraries load lazily, when the work starts, the same either
way): in this venv as a subprocess (dvc's and the Airflow `local` mode's way) and in a fresh container of the
image (`podman run --rm`: create, start, remove; the `docker` modes' and kfp.local's way). Runs alternate venv, container, venv, ... so a slow spell of the shared machine hits both; the
medians and their difference (the container's overhead per stage run) are printed. The stage's own work is the
same code on the same CPU either way.

    python bench/container_overhead.py                     # every stage, 5 repeats, localhost/embedforge-cpu:0.1.0
    python bench/container_overhead.py --stage curate --repeats 9 --image localhost/embedforge-cpu:0.1.0
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from components.stages import IMAGES, STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image", default=f"localhost/{IMAGES['cpu']}", help="the image (podman's local name)")
    parser.add_argument("--stage", action="append", choices=list(STAGES), help="stage to time (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO_ROOT / "containers" / "containers.conf"))}
    print(f"image {args.image}, {args.repeats} alternating repeats per stage, {os.cpu_count()} cores\n")
    print("| stage | venv subprocess s (median) | container s (median) | overhead s | ratio |")
    print("|---|---|---|---|---|")
    for stage in args.stage or list(STAGES):
        venv, container = [], []
        for _ in range(args.repeats):
            venv.append(timed([sys.executable, "-m", "components.cli", stage, "--help"], env))
            container.append(timed(["podman", "run", "--rm", args.image, stage, "--help"], env))
        local, boxed = statistics.median(venv), statistics.median(container)
        print(f"| {stage} | {local:.2f} | {boxed:.2f} | {boxed - local:+.2f} | {boxed / local:.2f} |")


if __name__ == "__main__":
    main()
