"""Wall time and peak memory of the quickstart pipeline (`speed run configs/quickstart.yaml`).

Runs the pipeline in a fresh run directory as a child process and prints its wall time, the time of
each stage (from the manifests) and the peak resident memory of the largest process it ran (the
pipeline, or the llama.cpp server it started). The baseline evaluation is cached per machine
($SPEED_CACHE/eval), so pass --cold to time a first run on a new machine.

    python bench/quickstart.py [--config configs/quickstart.yaml] [-o key=value ...] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("-o", "--override", action="append", default=[])
    p.add_argument("--cold", action="store_true", help="use an empty SPEED_CACHE/eval (no cached baseline)")
    args = p.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="speed-bench-quickstart-")) / "run"
    env = dict(os.environ)
    if args.cold:
        cache = Path(tempfile.mkdtemp(prefix="speed-bench-cache-"))
        home_cache = Path(env.get("SPEED_CACHE", Path.home() / ".cache" / "speed"))
        for sub in ("models",):  # keep the joined/converted models: they are not what is measured
            if (home_cache / sub).exists():
                (cache / sub).symlink_to(home_cache / sub)
        env["SPEED_CACHE"] = str(cache)
    cmd = [sys.executable, "-m", "speed.cli", "run", args.config, "-o", f"run.dir={run_dir}"]
    for o in args.override:
        cmd += ["-o", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"conditions: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, config {args.config}, "
        f"overrides {args.override or 'none'}, {'cold' if args.cold else 'warm'} baseline cache"
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        print(f"quickstart FAILED after {wall:.0f} s")
        return 1
    print(
        f"quickstart wall time: {wall / 60:.1f} min ({wall:.0f} s); peak memory of one process: {peak_mb:.0f} MB"
    )
    for manifest in sorted(
        run_dir.glob("*/manifest.json"), key=lambda m: json.loads(m.read_text())["finished_at"]
    ):
        m = json.loads(manifest.read_text())
        print(f"  {m['stage']:<11} {m['duration_s']:7.1f} s  count {m['stats'].get('count', '')}")
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
