"""Reliability report (issue #7 item 5): bad inputs rejected cleanly, faults survived, artifacts corrupted.

Runs every case of the bad-input table (`tests/code/bad_input_cases.py`, the same list the tests run) through
the real stage CLI twice: into empty outputs, and over outputs a valid run already published. Then injects
the faults of `tests/code/faults.py`: SIGKILL of curate while it publishes, and a full disk while it writes a
data file and a manifest. Needs no pipeline outputs: everything runs on tiny inputs and a tiny random model
built in a temporary directory. Exits 1 when any artifact was corrupted or half written, or anything crashed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the case table and the tiny model live in tests/

from tests.code.bad_input_cases import CASES, CaseResult, quiet_logging, run_case, valid_run  # noqa: E402
from tests.code.faults import FaultResult, disk_full_while_publishing, kill_while_publishing  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402


def _bad_input_runs(root: Path, model: Path) -> list[CaseResult]:
    previous = {}
    for stage in ("curate", "evaluate"):
        outcome, out = valid_run(root / f"valid-{stage}", model, stage)
        if outcome.exit_code != 0:
            raise SystemExit(f"the valid {stage} run failed; fix that first:\n{outcome.crash or outcome.console[-3000:]}")
        previous[stage] = out
    results = []
    for number, case in enumerate(CASES):
        results.append(run_case(case, root / f"fresh-{number}", model))
        results.append(run_case(case, root / f"existing-{number}", model, baseline=previous[case.stage]))
    return results


def _row(label: str, value: object) -> str:
    return f"| {label} | {value} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and every failure here")
    parser.add_argument("--no-kill", action="store_true", help="skip the SIGKILL injection (a subprocess, ~10 s)")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embedforge-reliability-") as tmp, quiet_logging():
        root = Path(tmp)
        model = build_tiny_model(root / "model", layers=2)
        runs = _bad_input_runs(root / "bad-input", model)
        faults: list[FaultResult] = [disk_full_while_publishing(root / "full-data", model, "data-file"),
                                     disk_full_while_publishing(root / "full-manifest", model, "manifest")]
        if not args.no_kill:
            faults.insert(0, kill_while_publishing(root / "kill", model))
    seconds = time.perf_counter() - started

    crashed = [run for run in runs if run.crashed]
    accepted = [run for run in runs if run.outcome.exit_code == 0]
    unclear = [run for run in runs if not run.crashed and run.outcome.exit_code not in (0, None)
               and not run.rejected_cleanly and not run.corrupted]
    corrupted = [run for run in runs if run.corrupted]
    clean = [run for run in runs if run.rejected_cleanly]
    kinds = {kind: [run for run in runs if run.case.input_kind == kind] for kind in ("raw_pairs", "beir", "params")}
    figures = {
        "bad_input_cases": len(CASES),
        "bad_input_runs": len(runs),
        "rejected_cleanly": len(clean),
        "crashed": len(crashed),
        "accepted_silently": len(accepted),
        "rejected_without_a_clear_message": len(unclear),
        "artifacts_corrupted_or_half_written": len(corrupted) + sum(fault.corrupted for fault in faults),
        "fault_injections": len(faults),
        "fault_injections_survived": sum(fault.survived for fault in faults),
        "seconds": round(seconds, 1),
    }
    print("## Bad input (exit 2, message naming the file and line or the params key, nothing written)\n")
    print("| input | cases | runs | rejected cleanly |\n|---|---:|---:|---:|")
    for kind, kind_runs in kinds.items():
        print(f"| {kind} | {len(kind_runs) // 2} | {len(kind_runs)} | {sum(run.rejected_cleanly for run in kind_runs)} |")
    print("\n## Faults\n")
    print("| fault | exit | hit mid-publish | previous intact | all verified | re-run | survived |\n"
          "|---|---:|---|---|---|---:|---|")
    for fault in faults:
        print(f"| {fault.name} | {fault.exit_code} | {fault.hit_mid_publish} | {fault.previous_intact} | "
              f"{fault.all_verified} | {fault.rerun_exit_code} | {fault.survived} |")
    print("\n## Figures\n\n| figure | value |\n|---|---:|")
    print("\n".join(_row(name.replace("_", " "), value) for name, value in figures.items()))
    failures = [{"case": run.case.id, "variant": run.variant, "exit": run.outcome.exit_code, "message": run.message,
                 "must_name": run.where, "crash": (run.outcome.crash or "")[-1500:], "changed": run.outputs_changed,
                 "leftovers": run.leftovers, "stray": run.stray_files}
                for run in runs if not run.rejected_cleanly]
    for failure in failures:
        print(f"\nNOT CLEAN: {json.dumps(failure)}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "failures": failures,
                                         "faults": [fault.__dict__ | {"survived": fault.survived} for fault in faults]},
                                        indent=1, default=str) + "\n")
    if crashed or figures["artifacts_corrupted_or_half_written"] or figures["fault_injections_survived"] < len(faults):
        sys.exit(1)


if __name__ == "__main__":
    main()
