"""Does alignment help? The untuned base, the junior (SFT) and the senior (DPO) on held-out prompts.

Runs (or resumes) the pipeline up to the senior, then draws ``--n`` generation prompts that no stage
trained or judged on (none the seed, candidates or revisions stages used), lets each of the three
generators answer them as synthesis samples the senior (``models.senior`` temperature and top_p;
SPEED: 1.0 and 1.0), and prints:

- JSON parse rate: the output parses as the kind's schema (speed's parser: fences, prose and light
  repairs are tolerated, as in synthesis);
- filter pass rate: parsed and kept by the quality filters synthesis uses (empty or placeholder
  fields, too short for the requested length, query copied into the document, near-equal fields,
  wrong language);
- teacher-judged win rates of senior over junior and of junior over base: the run's teacher
  (temperature 0, the judge prompt with two candidates) names the better of the two outputs, in both
  orders; a pair is a win or a loss only when both verdicts agree (small judges mostly pick whatever
  is shown first; the share of first-shown winners is printed), else ``order-inconsistent``;
  identical outputs are ties; unusable verdicts are counted apart. Win rate = wins / (wins +
  losses), with a 95% Wilson interval.

All calls go through a ledger of their own (``RUN/bench/ledger.sqlite``), so a rerun replays and the
run's own cost report is untouched. Results are printed and written to
``RUN/bench/alignment-n{N}-{judge}.json``.

Usage::

    nohup python bench/alignment.py --run runs/bench-alignment > bench-alignment.log 2>&1 &
    python bench/alignment.py --config my.yaml -o seed.num_examples=500 --n 50

Without ``--config`` a CPU configuration is used (below): a llama.cpp teacher, SmolLM2-135M as the
base model, about 330 teacher calls; 2-4 hours on 2 busy cores. Its learning rates are 5x the
paper's because it takes about 15 optimizer steps instead of about 1.5K; at the paper's 1e-4 the
junior's loss stayed flat.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CONFIG = """
run: {{dir: {run}, seed: 0, threads: {threads}}}
pipeline: {{stages: [brainstorm, seed, junior, candidates, judge, senior]}}
models:
  teacher: {{backend: llamacpp_server, model: {teacher}, threads: {threads}, n_ctx: 4096, max_tokens: 512,
             batch_size: 4, timeout_s: 900}}
  junior: {{backend: hf, model: smollm2-135m-instruct, max_tokens: 384, batch_size: 8}}
  senior: {{backend: hf, max_tokens: 384, batch_size: 8}}
brainstorm: {{kinds: [retrieval, classification, sts, matching_short], calls_per_kind: 12}}
seed: {{num_examples: 96, kind_mix: {{retrieval: 1, classification: 1, sts: 1, matching_short: 1}}}}
junior: {{batch_size: 8, per_device_batch_size: 4, epochs: 2, max_length: 1024, learning_rate: 5.0e-4}}
candidates: {{num_prompts: 48, k: 4}}
senior: {{batch_size: 8, per_device_batch_size: 2, epochs: 2, max_length: 1024, learning_rate: 5.0e-5}}
"""


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def held_out_prompts(cfg: Any, run: Path, n: int) -> list[Any]:
    from speed.io import read_rows
    from speed.stages.alignment import sample_prompts, task_pool

    used: set[str] = set()
    for stage in ("seed", "candidates", "revisions"):
        if (run / stage / "manifest.json").exists():
            used |= {r["prompt"] for r in read_rows(run / stage)}
    pool = task_pool(read_rows(run / "brainstorm"))
    rng = random.Random(f"bench/{cfg.run.seed}")
    prompts, _ = sample_prompts(pool, n, cfg.seed.kind_mix, rng, cfg.seed.language, used)
    return prompts


def generate(
    cfg: Any, ledger: Any, name: str, model_path: str, prompts: list[Any], model_id: str
) -> list[str]:
    from speed.ledger import LedgeredBackend
    from speed.llm import Sampling, load_backend
    from speed.stages.alignment import chat

    spec = cfg.models.junior
    # all three sample as synthesis runs the senior (SPEED: temperature 1.0, top_p 1.0)
    temp, top_p = cfg.models.senior.temperature, cfg.models.senior.top_p
    backend = load_backend(spec, threads=spec.threads or cfg.run.threads, model_path=model_path)
    llm = LedgeredBackend(
        backend, ledger, role=name, stage="bench", flush_every=spec.batch_size, model_id=model_id
    )
    try:
        reqs = [
            chat(p.prompt, Sampling(temperature=temp, top_p=top_p, max_tokens=spec.max_tokens, seed=1000 + i))
            for i, p in enumerate(prompts)
        ]
        out = []
        for start in range(0, len(reqs), spec.batch_size):
            out += [c.text for c in llm.generate(reqs[start : start + spec.batch_size])]
            logging.info("bench: %s %d/%d", name, len(out), len(reqs))
        return out
    finally:
        llm.close()


def quality(cfg: Any, prompts: list[Any], texts: list[str]) -> dict[str, Any]:
    from speed.data.filters import DropCounter
    from speed.stages.alignment import build_filters, parse_example
    from speed.tasks import get_kind

    filters = build_filters(cfg.seed.check_language)
    counter = DropCounter("bench")
    parsed = passed = 0
    for p, text in zip(prompts, texts, strict=True):
        kind = get_kind(p.kind)
        ok = kind.parse(text).ok
        parsed += ok
        example, _, _ = parse_example(kind, text, p.attributes, filters, counter)
        passed += example is not None
    n = len(prompts)
    return {"parse_rate": parsed / n, "filter_pass_rate": passed / n, "drops": dict(counter.reasons)}


def compare(
    cfg: Any,
    teacher: Any,
    prompts: list[Any],
    first: tuple[str, list[str]],
    second: tuple[str, list[str]],
    both_orders: bool = True,
) -> dict[str, Any]:
    """Teacher verdicts ``first`` vs ``second`` per prompt.

    With ``both_orders`` each pair is judged in both orders and counts as a win or a loss only when
    the two verdicts agree; disagreeing verdicts follow the position, not the content, and are
    counted as ``inconsistent``. Otherwise one verdict per pair in an order drawn at random.
    """
    from speed.llm import Sampling
    from speed.stages.alignment import chat, normalize
    from speed.stages.judge import judge_prompt, read_verdict, verdict_schema

    rng = random.Random(f"bench-order/{first[0]}/{second[0]}")
    reqs: list[Any] = []
    pairs: list[list[bool]] = []  # per pair, the 'swap' flag of each of its requests
    ties = 0
    for i, (p, a, b) in enumerate(zip(prompts, first[1], second[1], strict=True)):
        if normalize(a) == normalize(b):
            ties += 1
            continue
        drawn = rng.random() < 0.5
        swaps = [drawn, not drawn] if both_orders else [drawn]
        for swap in swaps:
            reqs.append(
                chat(
                    judge_prompt(p.prompt, [b, a] if swap else [a, b]),
                    Sampling(temperature=0.0, top_p=1.0, max_tokens=cfg.models.teacher.max_tokens, seed=i),
                    schema=verdict_schema(2),
                )
            )
        pairs.append(swaps)
    comps = iter(teacher.generate(reqs))
    wins = losses = invalid = inconsistent = verdicts = first_shown_won = 0
    for swaps in pairs:
        says_first = []
        for swap in swaps:
            comp = next(comps)
            verdict = read_verdict(comp.text, 2)[0] if comp.error is None else None
            if verdict is None:
                says_first.append(None)
                continue
            verdicts += 1
            first_shown_won += verdict.best == 1
            says_first.append((verdict.best == 1) != swap)
        if None in says_first:
            invalid += 1
        elif len(set(says_first)) > 1:
            inconsistent += 1
        elif says_first[0]:
            wins += 1
        else:
            losses += 1
    lo, hi = wilson(wins, wins + losses)
    return {
        "pair": f"{first[0]} over {second[0]}",
        "orders": 2 if both_orders else 1,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "inconsistent": inconsistent,
        "invalid": invalid,
        "win_rate": wins / (wins + losses) if wins + losses else None,
        "ci95": [round(lo, 3), round(hi, 3)],
        "first_shown_won": f"{first_shown_won}/{verdicts}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a speed config (default: the CPU config in this file)")
    ap.add_argument("-o", "--override", action="append", default=[], help="dotted config override")
    ap.add_argument("--run", default="runs/bench-alignment", help="run directory (default config only)")
    ap.add_argument(
        "--teacher", default="qwen2.5-coder-0.5b-instruct", help="packaged teacher (default config)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=50, help="held-out prompts")
    ap.add_argument(
        "--judge", help="model that judges the win rates instead of the run's teacher (same backend)"
    )
    ap.add_argument(
        "--one-order",
        action="store_true",
        help="judge each pair once (random order) instead of in both orders",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from speed.config import load_config
    from speed.io import read_json, read_rows, write_json
    from speed.ledger import Ledger, LedgeredBackend
    from speed.llm import load_backend
    from speed.models import resolve_hf
    from speed.runner import Runner, setup_logging

    torch.set_num_threads(args.threads)
    if args.config:
        cfg = load_config(args.config, args.override)
    else:
        run = Path(args.run)
        run.mkdir(parents=True, exist_ok=True)
        path = run / "bench-config.yaml"
        path.write_text(DEFAULT_CONFIG.format(run=run, threads=args.threads, teacher=args.teacher))
        cfg = load_config(path, args.override)
    run = Path(cfg.run.dir)
    setup_logging(run, cfg.run.log_level)
    t0 = time.time()
    Runner(cfg).run(until="senior")
    t_pipeline = time.time() - t0

    out = run / "bench"
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.sqlite")
    prompts = held_out_prompts(cfg, run, args.n)
    models = {
        "base": resolve_hf(cfg.models.junior.model, file=getattr(cfg.models.junior, "file", None)),
        "junior": str(run / "junior" / "merged"),
        "senior": str(run / "senior" / "merged"),
    }
    t1 = time.time()
    # ledger model ids carry the training stage's key, so a retrained model is asked anew
    ids = {
        "base": str(cfg.models.junior.model),
        "junior": f"junior@{read_json(run / 'junior' / 'manifest.json')['key']}",
        "senior": f"senior@{read_json(run / 'senior' / 'manifest.json')['key']}",
    }
    texts = {name: generate(cfg, ledger, name, path, prompts, ids[name]) for name, path in models.items()}
    t_generate = time.time() - t1
    scores = {name: quality(cfg, prompts, texts[name]) for name in models}

    t2 = time.time()
    tspec = cfg.models.teacher
    if args.judge:  # another model judges the win rates (the run's teacher may be too small)
        tspec = tspec.model_copy(update={"model": args.judge, "file": None})
    teacher = LedgeredBackend(
        load_backend(tspec, threads=tspec.threads or cfg.run.threads),
        ledger,
        "teacher",
        "bench",
        tspec.batch_size,
    )
    try:
        wins = [
            compare(cfg, teacher, prompts, (a, texts[a]), (b, texts[b]), not args.one_order)
            for a, b in (("senior", "junior"), ("junior", "base"))
        ]
    finally:
        teacher.close()
    t_judge = time.time() - t2

    manifests = {s: read_json(run / s / "manifest.json") for s in ("seed", "junior", "judge", "senior")}
    kinds: dict[str, int] = {}
    for p in prompts:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    conditions = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, threads {args.threads}",
        "teacher": f"{cfg.models.teacher.backend}:{cfg.models.teacher.model}",
        "win-rate judge": f"{tspec.backend}:{tspec.model} (temperature 0)",
        "base": f"{cfg.models.junior.model} ({cfg.models.junior.backend})",
        "generation": f"temperature {cfg.models.senior.temperature}, top_p {cfg.models.senior.top_p}, "
        f"max_tokens {cfg.models.junior.max_tokens}",
        "held_out_prompts": len(prompts),
        "prompt_kinds": kinds,
        "seed_examples": len(read_rows(run / "seed")),
        "junior": {k: manifests["junior"]["stats"].get(k) for k in ("steps", "loss_first", "loss_last")},
        "dpo_pairs": len(read_rows(run / "judge")),
        "senior": {k: manifests["senior"]["stats"].get(k) for k in ("steps", "loss_first", "loss_last")},
        "lr": {
            "junior": cfg.junior.learning_rate,
            "senior": cfg.senior.learning_rate,
            "beta": cfg.senior.beta,
        },
        "seconds": {"pipeline": round(t_pipeline), "generate": round(t_generate), "judge": round(t_judge)},
    }
    result = {"conditions": conditions, "quality": scores, "win_rates": wins}
    write_json(out / f"alignment-n{len(prompts)}-{Path(str(tspec.model)).name}.json", result)

    lines = ["", "== alignment benchmark =="]
    lines += [f"  {k}: {v}" for k, v in conditions.items()]
    lines.append(f"  {'model':8s} {'parse':>7s} {'filters':>8s}  drops")
    for name, s in scores.items():
        lines.append(f"  {name:8s} {s['parse_rate']:7.1%} {s['filter_pass_rate']:8.1%}  {s['drops']}")
    for w in wins:
        rate = "n/a" if w["win_rate"] is None else f"{w['win_rate']:.1%}"
        lines.append(
            f"  {w['pair']:18s} win rate {rate} (95% CI {w['ci95'][0]:.2f}-{w['ci95'][1]:.2f}); "
            f"wins {w['wins']}, losses {w['losses']}, ties {w['ties']}, order-inconsistent "
            f"{w['inconsistent']}, invalid {w['invalid']} ({w['orders']} order(s) per pair); "
            f"first-shown won {w['first_shown_won']} verdicts"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
