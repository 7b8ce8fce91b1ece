"""Your documents, your gain: grounded data from a corpus, MiniLM trained on it, scored on the domain.

Takes SciFact's corpus (shared/eval) as "the user's documents" (configs/domain.yaml), generates
grounded data with the local models once, then trains all-MiniLM-L6-v2 on it under each variant and
seed and scores SciFact and NFCorpus (nDCG@10) against the base model. The variants turn the label
checks of the labels and embed stages off one at a time:

- ``full``: configs/domain.yaml as written (mined negatives beside the generated ones, round trip,
  in-batch false-negative margin; no relabel: its 0.5B teacher judges by position);
- ``no_mining``: the generated hard negative only;
- ``mined``: the mined negative instead of the generated one (an LLM-written negative is often a
  false one: base MiniLM scored it above the positive in 58 of 104 grounded retrieval triples);
- ``no_round_trip``: no round-trip filter;
- ``relabel``: full plus the teacher's relabel (both orders; for a teacher worth asking);
- ``no_false_negatives``: plain InfoNCE over in-batch negatives (E5);
- ``none``: all off (SPEED's data as published, grounded).

Generation (brainstorm to synthesize) runs once in ``WORK/gen``; each variant and seed is a copy of
that run (stage folders hard-linked, the ledger copied) resumed with its overrides and
``embed.seed``, so only labels, embed and evaluate run again (seeds after the first start from the
variant's first seed, labels done); the baseline's scores are cached per machine. Decontamination
stays on against the evaluation queries (not their documents: the corpus is SciFact's own).

Prints per variant: mean and standard deviation over seeds of each task's nDCG@10 and its
difference to the base model, and the labels stage's counts (round-trip drops, relabel swaps and
drops, mined negatives).

    python bench/domain.py [--seeds 3] [--variants full,none] [--work DIR] [-o key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from speed.hardware import cpu_info

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_mining": ["labels.mining.negatives=generated"],
    "mined": ["labels.mining.negatives=mined"],
    "no_round_trip": ["labels.round_trip.enabled=false"],
    "relabel": ["labels.relabel.enabled=true"],
    "no_false_negatives": ["embed.false_negatives=none"],
    "none": [
        "labels.mining.negatives=generated",
        "labels.round_trip.enabled=false",
        "labels.relabel.enabled=false",
        "embed.false_negatives=none",
    ],
}


def speed(config: str, run_dir: Path, overrides: list[str], log: Path, *extra: str) -> float:
    """Run ``speed run`` on ``run_dir``; its wall time in seconds. Raises on failure, naming the log."""
    args = [sys.executable, "-m", "speed.cli", "run", config, *extra, "-o", f"run.dir={run_dir}"]
    for o in overrides:
        args += ["-o", o]
    t0 = time.time()
    with log.open("w") as out:
        rc = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"speed run failed (exit {rc}) for {run_dir}; see {log}")
    return time.time() - t0


def clone_run(src: Path, dst: Path) -> None:
    """A copy of a finished run to resume with other overrides: stage folders hard-linked (stages
    never change a file in place: they write new ones and rename), the ledger copied (SQLite writes
    in place)."""
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        src, tmp, copy_function=os.link, ignore=shutil.ignore_patterns("ledger.sqlite*", ".lock*")
    )
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    tmp.rename(dst)


def manifest_stats(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / stage / "manifest.json"
    return json.loads(path.read_text()).get("stats", {}) if path.exists() else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "domain.yaml"))
    p.add_argument("--seeds", type=int, default=3, help="embedder training seeds per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--work", help="folder of the runs (default: a new temporary one); reruns resume")
    p.add_argument("-o", "--override", action="append", default=[], help="config overrides for every run")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="speed-bench-domain-"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info().label()
    print(
        f"conditions: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; work {work}", flush=True
    )

    gen = work / "gen"
    wall = speed(args.config, gen, args.override, work / "gen.log", "--until", "synthesize")
    synth = manifest_stats(gen, "synthesize")
    print(
        f"generation: {wall / 60:.1f} min, {synth.get('count')} examples kept, drops {synth.get('drops')}",
        flush=True,
    )

    figures: dict[str, Any] = {"cpu": cpu, "seeds": args.seeds, "synthesize": synth, "variants": {}}
    baseline: dict[str, float] = {}
    # seed-major: an interrupted bench still has every variant's first seed to compare
    for seed in range(args.seeds):
        for variant in variants:
            runs = figures["variants"].setdefault(variant, [])
            run_dir = work / f"{variant}-s{seed}"
            # seed 0 runs the variant's labels stage; later seeds start from it (the labels stage's
            # key holds no embed setting), so only embed and evaluate run again
            clone_run(gen if seed == 0 else work / f"{variant}-s0", run_dir)
            overrides = [*args.override, *VARIANTS[variant], f"embed.seed={seed}"]
            wall = speed(args.config, run_dir, overrides, work / f"{variant}-s{seed}.log")
            ev = manifest_stats(run_dir, "evaluate")
            baseline = ev.get("baseline") or baseline
            runs.append(
                {
                    "seed": seed,
                    "scores": ev.get("scores", {}),
                    "labels": manifest_stats(run_dir, "labels"),
                    "wall_s": round(wall),
                }
            )
            print(f"  {variant} seed {seed}: {ev.get('scores')} ({wall / 60:.1f} min)", flush=True)
            figures["baseline"] = baseline
            if args.json:  # after every run, so that an interrupted bench keeps what it measured
                Path(args.json).write_text(json.dumps(figures, indent=2))

    tasks = sorted(baseline)
    print()
    print(
        "| variant | "
        + " | ".join(f"{t} nDCG@10 (mean ± sd) | Δ base" for t in tasks)
        + " | round-trip drops | relabel swaps/drops | mined | own document set aside |"
    )
    print("|---|" + "---|---|" * len(tasks) + "---|---|---|---|")
    print("| base model | " + " | ".join(f"{baseline[t]:.4f} | " for t in tasks) + " | | | |")
    for variant, runs in figures["variants"].items():
        cells = []
        for t in tasks:
            values = [r["scores"][t] for r in runs if t in r["scores"]]
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.4f} ± {sd:.4f} | {mean - baseline[t]:+.4f}")
        lab = runs[0]["labels"]
        drops = lab.get("drops") or {}
        relabel = lab.get("relabel") or {}
        mining = lab.get("mining") or {}
        print(
            f"| {variant} | "
            + " | ".join(cells)
            + f" | {drops.get('round_trip', 0)} | {relabel.get('swap', 0)}/{relabel.get('drop', 0)}"
            + f" | {mining.get('mined', 0)}"
            + f" | {(lab.get('round_trip') or {}).get('neighbour_above', 0)} ranked, "
            + f"{mining.get('same_document', 0)} mined |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
