"""Training throughput of speed's contrastive trainer beside plain sentence-transformers.

Both train the same model on the same rows with the same batch size, steps, loss (InfoNCE,
MultipleNegativesRankingLoss with scale 50) and batch sampler (NO_DUPLICATES). The plain run is
``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` used directly; speed's run goes
through ``speed.training.contrastive.train_embedder`` (row checks, instructions, stats, saving).

Two figures per run:
- ``loop``: examples/s inside ``trainer.train()`` (the HF Trainer's ``train_samples_per_second``),
  which is what the wrapper could slow down per step;
- ``end-to-end``: examples trained / wall time including model loading and, for speed, saving.

Runs alternate (speed, plain, speed, plain, ...) so that machine load hits both alike; medians are
printed. Usage::

    python bench/embedding.py --threads 1 --batch 32 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = [
    "model",
    "data",
    "text",
    "query",
    "document",
    "river",
    "mountain",
    "city",
    "history",
    "science",
    "music",
    "energy",
    "market",
    "health",
    "language",
    "computer",
    "network",
    "garden",
    "kitchen",
    "ocean",
    "forest",
    "planet",
    "engine",
    "museum",
    "library",
    "school",
    "travel",
    "weather",
    "sport",
    "coffee",
    "bridge",
    "island",
    "castle",
    "recipe",
    "camera",
    "battery",
    "window",
    "doctor",
    "engineer",
    "farmer",
]


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic triplets with short queries and 20-40 word documents (retrieval-like lengths)."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    return [
        {
            "query": sentence(rng.randint(4, 10)),
            "positive": sentence(rng.randint(20, 40)),
            "negative": sentence(rng.randint(20, 40)),
            "instruction": "Given a web search query, retrieve relevant passages that answer the query.",
        }
        for _ in range(n)
    ]


def run_speed(model: str, rows, batch: int, steps: int, max_length: int) -> tuple[float, float]:
    from speed.config import EmbedConfig
    from speed.training.contrastive import train_embedder

    cfg = EmbedConfig(
        batch_size=batch, max_steps=steps, warmup_steps=0, max_length=max_length, learning_rate=2e-5
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_embedder(rows, model, tmp, cfg, seed=0, device="cpu", logging_steps=steps)
    wall = time.perf_counter() - start
    return result.examples_per_second, steps * batch / wall


def run_plain(model: str, rows, batch: int, steps: int, max_length: int) -> tuple[float, float]:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from speed.evaluation import format_query

    start = time.perf_counter()
    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = min(st.max_seq_length or max_length, max_length)
    data = Dataset.from_dict(
        {
            "anchor": [format_query(r["instruction"], r["query"]) for r in rows],
            "positive": [r["positive"] for r in rows],
            "negative": [r["negative"] for r in rows],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=2e-5,
            warmup_steps=0,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            logging_steps=steps,
            seed=0,
        )
        trainer = SentenceTransformerTrainer(
            model=st, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(st, scale=50.0)
        )
        metrics = trainer.train().metrics
    wall = time.perf_counter() - start
    return float(metrics["train_samples_per_second"]), steps * batch / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import logging

    import torch
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    from speed.models import resolve_hf

    model = resolve_hf(args.model)
    rows = make_rows(args.rows)
    results: dict[str, list[tuple[float, float]]] = {
        "speed train_embedder": [],
        "plain sentence-transformers": [],
    }
    for i in range(args.repeats):
        results["speed train_embedder"].append(
            run_speed(model, rows, args.batch, args.steps, args.max_length)
        )
        results["plain sentence-transformers"].append(
            run_plain(model, rows, args.batch, args.steps, args.max_length)
        )
        print(f"repeat {i + 1}/{args.repeats} done", flush=True)

    print()
    print(
        f"conditions: model={args.model} device=cpu torch={torch.__version__} threads={args.threads} "
        f"batch={args.batch} steps={args.steps} rows={args.rows} max_length={args.max_length} "
        f"triplets (query+positive+hard negative) repeats={args.repeats} cpus={os.cpu_count()} "
        f"machine={platform.machine()} load_avg_1min={os.getloadavg()[0]:.2f}"
    )
    print(f"{'trainer':30s} {'loop ex/s (median)':>20s} {'end-to-end ex/s (median)':>26s}   runs (loop)")
    for name, runs in results.items():
        loop = statistics.median(r[0] for r in runs)
        e2e = statistics.median(r[1] for r in runs)
        print(f"{name:30s} {loop:20.1f} {e2e:26.1f}   {', '.join(f'{r[0]:.1f}' for r in runs)}")


if __name__ == "__main__":
    main()
