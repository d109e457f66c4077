"""Time the quickstart end to end: plan, run, collect, fit and report of sweeps/quickstart.yaml.

    python benchmarks/quickstart.py [--install] [--keep DIR]

Runs each step as the `isoflop` command a user would type, on fresh folders (a temporary runs root
and results folder, so `run` really trains), and prints the wall time of each step and the total.
--install first times `make install` (the virtual environment, torch from its pinned wheel and
the package). The issue's target: at most 5 minutes in all on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweeps" / "quickstart.yaml"


def steps(runs: Path, results: Path) -> list[tuple[str, list[str]]]:
    isoflop = [sys.executable, "-m", "isoflop"]
    return [
        ("plan", [*isoflop, "plan", str(SWEEP)]),
        ("run", [*isoflop, "run", str(SWEEP), "--runs-dir", str(runs)]),
        ("collect", [*isoflop, "collect", str(SWEEP), "--runs-dir", str(runs), "--out", str(results)]),
        ("fit", [*isoflop, "fit", str(results)]),
        ("report", [*isoflop, "report", str(results)]),
    ]


def timed(name: str, command: list[str]) -> float:
    print(f"$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    seconds = time.perf_counter() - start
    print(f"[{name}: {seconds:.1f} s]", flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="also time `make install` first")
    parser.add_argument("--keep", type=Path, default=None, help="keep runs and results in this folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="isoflop-quickstart-"))
    runs, results = work / "runs", work / "results" / "quickstart"
    timings = {}
    try:
        if args.install:
            timings["install"] = timed("install", ["make", "install"])
        for name, command in steps(runs, results):
            timings[name] = timed(name, command)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(f"{name:>8}: {seconds:6.1f} s" for name, seconds in timings.items()))
    print(f"{'total':>8}: {sum(timings.values()):6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
