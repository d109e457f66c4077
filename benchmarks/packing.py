"""Sweep throughput when small runs share one GPU: one at a time against N at once, with and
without CUDA MPS, measured side by side in one invocation.

    python benchmarks/packing.py [SWEEP] [--runs 12] [--workers 1,4,8,12] [--device cuda]

Trains the first --runs runs of the sweep (default sweeps/recall.yaml) from scratch once per
setting, each time in a fresh runs folder, through `isoflop run` as a user would, and prints wall
time, runs per minute and the speed-up over one worker. ISOFLOP_MPS=off turns MPS off for a
setting (isoflop/orchestrator/mps.py); MPS is only tried where it can matter (workers > GPUs).
On a machine without a GPU it still runs (CPU processes), which is how the tests check it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ISOFLOP = [sys.executable, "-m", "isoflop"]


def first_runs(sweep: Path, n: int) -> list[str]:
    plan = subprocess.run([*ISOFLOP, "plan", str(sweep), "--json"], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return [run["run_id"] for run in json.loads(plan.stdout)["runs"][:n]]


def timed_sweep(sweep: Path, run_ids: list[str], workers: int, mps: bool) -> float:
    """Wall seconds to train run_ids from scratch with `workers` at once."""
    env = os.environ | {"ISOFLOP_MPS": "auto" if mps else "off"}
    with tempfile.TemporaryDirectory(prefix="isoflop-packing-") as runs_dir:
        command = [*ISOFLOP, "run", str(sweep), "--runs-dir", runs_dir, "--workers", str(workers),
                   "--only", "run_id=" + ",".join(run_ids)]
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, nargs="?", default=REPO / "sweeps" / "recall.yaml")
    parser.add_argument("--runs", type=int, default=12, help="runs trained per setting (default 12)")
    parser.add_argument("--workers", default="1,4,8,12",
                        help="comma-separated worker counts (default 1,4,8,12)")
    parser.add_argument("--no-mps", action="store_true", help="skip the MPS settings")
    args = parser.parse_args(argv)
    run_ids = first_runs(args.sweep, args.runs)
    counts = [int(w) for w in args.workers.split(",")]
    settings = [(w, False) for w in counts]
    settings += [] if args.no_mps else [(w, True) for w in counts if w > 1]
    rows = []
    for workers, mps in settings:
        seconds = timed_sweep(args.sweep, run_ids, workers, mps)
        rows.append((workers, mps, seconds))
        print(f"  {workers:>2} workers, MPS {'auto' if mps else 'off '}: {seconds:7.1f} s", flush=True)
    one = next((s for w, m, s in rows if w == 1), None)
    print(f"\n{args.sweep.name}: {len(run_ids)} runs per setting")
    print(f"{'workers':>7} {'MPS':>4} {'wall s':>8} {'runs/min':>9} {'speed-up':>9}")
    for workers, mps, seconds in rows:
        speedup = f"{one / seconds:8.2f}x" if one else "      -"
        print(f"{workers:>7} {'auto' if mps else 'off':>4} {seconds:8.1f} "
              f"{60 * len(run_ids) / seconds:9.1f} {speedup:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
