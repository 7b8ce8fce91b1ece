"""SPEED's ablation at laptop scale: `speed study CONFIG`, timed, with its table and conditions.

Runs the study of a config (default: configs/study.yaml with the tiny overrides of
configs/study-tiny.txt, a few minutes on 2 cores, so that `make bench` stays short) in a run folder
(default: a fresh temporary one; pass --run-dir to resume a study), then prints the conditions, the
wall time and the study's table (RUN/study/table.md) as `speed study` wrote it.

    python bench/ablation.py                                  # tiny: teacher vs untuned, N=8
    python bench/ablation.py configs/study.yaml --run-dir runs/study -o study.num_examples=1000
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "study-tiny.txt"


def tiny_overrides() -> list[str]:
    """The overrides of configs/study-tiny.txt (comment lines left out)."""
    lines = TINY.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="config with a study section (default: the tiny study)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", help="run folder (default: a fresh temporary one)")
    args = p.parse_args()

    overrides = list(args.override)
    config = args.config
    if config is None:
        config = str(ROOT / "configs" / "study.yaml")
        overrides = [*tiny_overrides(), *overrides]
    run_dir = (
        Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="speed-bench-study-")) / "run"
    )
    cmd = [sys.executable, "-m", "speed.cli", "study", config, "-o", f"run.dir={run_dir}"]
    for o in overrides:
        cmd += ["-o", o]
    print(
        f"conditions: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, config {config}, overrides {overrides or 'none'}"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        print(f"study FAILED after {wall:.0f} s (exit {proc.returncode})")
        return 1
    print(f"study: {wall:.0f} s wall, run folder {run_dir}")
    print((run_dir / "study" / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
