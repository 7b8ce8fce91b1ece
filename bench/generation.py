"""Generation throughput of the CPU backends, next to raw llama-cpp-python on the same settings.

For each packaged model, thread count and batch size it prints generated tokens per second, end to
end (prompt processing and HTTP included), for:

- ``llamacpp``: speed's llama.cpp backend in process,
- ``llamacpp_server``: speed's local llama.cpp server through the OpenAI-compatible client,
- ``hf``: speed's transformers backend on the safetensors folder converted from the same GGUF,
- ``raw``: ``llama_cpp.Llama.create_chat_completion`` called directly, no speed code at all.

Batch 1 is the median over ``--repeats`` single-prompt calls; batch 8 is the median over
``--repeats-batch`` calls of 8 prompts each; the backends of one model and thread count are loaded
together and called round-robin, so load changes of a shared machine hit them alike (llama.cpp answers them one after another; transformers
pads them into one batch). Sampling is SPEED's (temperature 1, top-p 1, no top-k/min-p) with fixed
seeds; prompts ask for long answers so that most samples run to ``--max-tokens``.

Usage::

    python bench/generation.py                      # the full matrix (several minutes on 2 cores)
    python bench/generation.py --quick              # SmolLM2, 1 thread: under a minute
    python bench/generation.py --models qwen2.5-coder-0.5b-instruct --backends raw,llamacpp

Figures depend on what else runs on the machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the policy speed's llama.cpp backends use (see speed.llm.llamacpp); raw llama-cpp-python in this
# process gets the same, so the comparison is fair
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from speed.hardware import cpu_info
from speed.llm import Backend, Request, Sampling
from speed.models import resolve_gguf, resolve_hf

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a search engine ranks documents for a query.",
    "Describe, step by step, how to bake bread at home.",
    "Write a detailed product review of a pair of running shoes.",
    "Explain the causes of the French Revolution in several paragraphs.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Describe how vaccines train the immune system, with examples.",
    "Write a detailed guide to choosing a first programming language.",
]
SAMPLER = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def _ver(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _requests(n: int, max_tokens: int, offset: int) -> list[Request]:
    return [
        Request.chat(
            PROMPTS[(offset + i) % len(PROMPTS)],
            sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=1000 + offset + i),
        )
        for i in range(n)
    ]


def _timed(generate: Callable[[list[Request]], int], reqs: list[Request]) -> float:
    """Generated tokens per second of one call."""
    start = time.perf_counter()
    tokens = generate(reqs)
    return tokens / (time.perf_counter() - start)


def _speed_backend(backend: Backend) -> Callable[[list[Request]], int]:
    def run(reqs: list[Request]) -> int:
        comps = backend.generate(reqs)
        bad = [c.error for c in comps if c.error]
        if bad:
            raise RuntimeError(f"backend {backend.name} failed: {bad[0]}")
        return sum(c.tokens_out for c in comps)

    return run


def _raw(llm: Any) -> Callable[[list[Request]], int]:
    def run(reqs: list[Request]) -> int:
        total = 0
        for r in reqs:
            out = llm.create_chat_completion(
                messages=[dict(m) for m in r.messages],
                temperature=r.sampling.temperature,
                top_p=r.sampling.top_p,
                max_tokens=r.sampling.max_tokens,
                seed=r.sampling.seed,
                **SAMPLER,
            )
            total += out["usage"]["completion_tokens"]
        return total

    return run


def _open(
    kind: str, model: str, threads: int, batch: int
) -> tuple[Callable[[list[Request]], int], Callable[[], None], str]:
    """A generate function, its cleanup, and a note (dtype) for one backend."""
    if kind == "raw":
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(resolve_gguf(model)),
            n_ctx=1024,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        return _raw(llm), llm.close, ""
    if kind == "llamacpp":
        from speed.llm.llamacpp import LlamaCppBackend

        b: Backend = LlamaCppBackend(model, threads=threads, n_ctx=1024)
        return _speed_backend(b), b.close, ""
    if kind == "llamacpp_server":
        from speed.llm.server import LlamaCppServerBackend

        b = LlamaCppServerBackend(model, threads=threads, n_ctx=1024, max_retries=1)
        return _speed_backend(b), b.close, ""
    if kind == "hf":
        from speed.llm.hf import HFBackend

        hf = HFBackend(model, threads=threads, batch_size=batch, device="cpu")
        return _speed_backend(hf), hf.close, str(hf.torch_dtype).removeprefix("torch.")
    raise ValueError(f"unknown backend '{kind}' (--backends); choose from raw, llamacpp, llamacpp_server, hf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    p.add_argument("--backends", default="raw,llamacpp,llamacpp_server,hf")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="calls measured at batch 1")
    p.add_argument("--repeats-batch", type=int, default=1, help="calls measured at batch > 1")
    p.add_argument("--budget-s", type=float, default=240, help="stop repeating a cell after this long")
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, 1 thread")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.threads = "smollm2-135m-instruct", "1"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    models = [m for m in args.models.split(",") if m]
    kinds = [k for k in args.backends.split(",") if k]
    threads_list = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    print("# generation throughput (generated tokens/s, end to end, median)")
    print(f"cpu: {cpu_info().label()}, {os.cpu_count()} logical cores; python {platform.python_version()}")
    print(
        f"llama-cpp-python {_ver('llama-cpp-python')}, torch {_ver('torch')}, transformers {_ver('transformers')}"
    )
    print(f"max_tokens {args.max_tokens}, temperature 1, top_p 1, no top-k/min-p; repeats: batch 1 x{args.repeats},"
          f" batch>1 x{args.repeats_batch}")  # fmt: skip
    print(
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; backends of one model and thread count run round-robin"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for model in models:  # convert/join outside the timings
        resolve_gguf(model)
        if "hf" in kinds:
            resolve_hf(model)
    print()
    header = f"{'model':<30} {'backend':<16} {'threads':>7} {'batch':>5} {'tok/s':>8} {'raw tok/s':>9}  calls, note"
    print(header)
    print("-" * len(header))
    for model in models:
        for threads in threads_list:
            # every backend of one (model, threads) is loaded at once and the calls go round-robin,
            # so that a change in the machine's load hits all of them alike
            opened: dict[str, tuple[Callable[[list[Request]], int], Callable[[], None], str]] = {}
            for kind in kinds:
                try:
                    opened[kind] = _open(kind, model, threads, max(batches))
                    opened[kind][0](_requests(1, 4, 99))  # warm-up
                except Exception as err:  # a bench reports what failed and goes on with the rest
                    print(f"{model:<30} {kind:<16} {threads:>7}  failed to load: {type(err).__name__}: {err}")
            try:
                for batch in batches:
                    reps = args.repeats if batch == 1 else args.repeats_batch
                    rates: dict[str, list[float]] = {k: [] for k in opened}
                    started = time.monotonic()
                    for r in range(reps):
                        if r and time.monotonic() - started > args.budget_s:
                            break  # enough for a median on a machine this slow
                        reqs = _requests(batch, args.max_tokens, r * batch)
                        for kind, (gen, _, _) in opened.items():
                            try:
                                rates[kind].append(_timed(gen, reqs))
                            except Exception as err:
                                print(f"{model:<30} {kind:<16} {threads:>7} {batch:>5}  failed: {err}")
                    medians = {k: statistics.median(v) for k, v in rates.items() if v}
                    ref = medians.get("raw")
                    for kind, rate in medians.items():
                        ref_text = f"{ref:9.1f}" if ref is not None else f"{'-':>9}"
                        note = opened[kind][2]
                        calls = f"{len(rates[kind])} call(s)"
                        print(
                            f"{model:<30} {kind:<16} {threads:>7} {batch:>5} {rate:8.1f} {ref_text}  {calls} {note}",
                            flush=True,
                        )
            finally:
                for _, close, _ in opened.values():
                    close()
                gc.collect()
    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
