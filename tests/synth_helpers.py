"""Helpers of the synthesize tests: a tiny JSON writer trained once, stand-in upstream folders, configs.

The upstream stages of synthesize (brainstorm, senior, revisor) are stand-ins from the plugin module
``tests/plugins/synth_stubs.py``: they copy the folders :func:`prepare_upstream` writes, in the layout
the real stages write (``data.jsonl`` with ``{kind, task, topic}``; ``merged/`` model folders), so
the real synthesize stage runs unchanged. Used by ``tests/unit/test_synthesize.py`` and the
integration tests of synthesis (resume after SIGKILL, Ray).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

#: the folder of the stand-in stages' plugin (on pytest's ``pythonpath``)
PLUGINS = Path(__file__).resolve().parent / "plugins"

WORDS = [
    *("a", "man", "plays", "guitar", "woman", "sings", "song", "child", "reads", "book", "dog"),
    *("runs", "park", "cat", "sleeps", "sofa", "chef", "cooks", "soup", "rain", "falls", "city"),
]
MATCHING_TASKS = ["Match a question to its answer.", "Find the title of a short story."]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + "."


def training_examples(seed: int = 0) -> list[tuple[str, dict[str, str], str]]:
    """(kind, example, task) triples the tiny writer learns from."""
    rng = random.Random(seed)
    out = []
    for i in range(24):
        if i % 2 == 0:
            # every STS example has a botched S3 (a placeholder, as small writers leave them), so the
            # writer learns it on any machine's numerics: kept as an (S1, S2) pair by
            # synthesize.keep_without_negative (with one in three, a CI machine sampled none)
            out.append(("sts", {"S1": _sentence(rng), "S2": _sentence(rng), "S3": "S3."}, ""))
        else:
            ex = {"input": _sentence(rng), "positive_document": _sentence(rng)}
            out.append(("matching_short", ex, MATCHING_TASKS[i % 4 // 2]))
    return out


def make_json_writer(path: Path, steps: int = 250) -> Path:
    """A tiny Llama trained to answer generation and revisor prompts with JSON examples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speed.stages.alignment import revisor_prompt
    from speed.tasks import get_kind
    from tiny import make_tiny_llama

    torch.set_num_threads(1)
    rng = random.Random(0)
    pairs = []
    for kind_name, example, task in training_examples():
        kind = get_kind(kind_name)
        prompt = kind.generation_prompt(task or kind.fixed_tasks[0], kind.sample_attributes(rng))
        text = json.dumps(example)
        pairs += [(prompt, text), (revisor_prompt(prompt, text), text)]
    make_tiny_llama(path, hidden_size=64, extra_text=[t for p in pairs for t in p], vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    data = []
    for prompt, text in pairs:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        data.append((ids, tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(data, 4)
        length = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((4, length), tok.pad_token_id)
        labels = torch.full((4, length), -100)
        mask = torch.zeros((4, length), dtype=torch.long)
        for b, (p, c) in enumerate(batch):
            ids[b, : len(p) + len(c)] = torch.tensor(p + c)
            mask[b, : len(p) + len(c)] = 1
            labels[b, len(p) : len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return path


_WRITER: Path | None = None


def json_writer() -> Path:
    """The trained tiny writer, built once per process."""
    global _WRITER
    if _WRITER is None or not _WRITER.exists():
        _WRITER = make_json_writer(Path(tempfile.mkdtemp(prefix="speed-writer-")) / "writer")
    return _WRITER


def prepare_upstream(root: Path) -> dict[str, str]:
    """Folders the stand-in stages copy and an evaluation folder; returns their paths (and the folder
    of the stub plugin, for a subprocess that lacks pytest's ``pythonpath``)."""
    src = root / "upstream"
    brainstorm = src / "brainstorm"
    brainstorm.mkdir(parents=True)
    rows = [{"kind": "sts", "task": "Retrieve semantically similar text.", "topic": None}]
    rows += [{"kind": "matching_short", "task": t, "topic": "stories"} for t in MATCHING_TASKS]
    (brainstorm / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in ("senior", "revisor"):
        shutil.copytree(json_writer(), src / stage / "merged")
    # an STS benchmark made of the writer's own training sentences: what it reproduces is contaminated
    sts = root / "eval" / "sts" / "STSBenchmark"
    sts.mkdir(parents=True)
    lines = [
        json.dumps({"sentence1": ex["S1"], "sentence2": ex["S2"], "score": 4.0})
        for kind, ex, _ in training_examples()
        if kind == "sts"
    ]
    (sts / "test.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "brainstorm": str(brainstorm),
        "senior": str(src / "senior"),
        "revisor": str(src / "revisor"),
        "plugins": str(PLUGINS),
        "eval": str(root / "eval"),
    }


def write_config(
    root: Path, run: str, up: dict[str, str], *, n: int = 24, shard_size: int = 6, **extra: str
) -> Path:
    """A pipeline of the stand-ins and the real synthesize stage; ``extra`` adds YAML sections."""
    sections = {
        "executor": "{kind: local}",
        "synthesize": (
            f"{{num_examples: {n}, shard_size: {shard_size}, kind_mix: {{sts: 1, matching_short: 1}}}}"
        ),
        **extra,
    }
    body = "\n".join(f"{k}: {v}" for k, v in sections.items())
    path = root / f"{run}.yaml"
    path.write_text(
        f"""
run: {{dir: {root / run}, seed: 3, threads: 1}}
pipeline: {{stages: [brainstorm, senior, revisor, synthesize], plugins: [synth_stubs]}}
models:
  senior: {{backend: hf, dtype: float32, max_tokens: 80, batch_size: 4, device: cpu}}
  revisor: {{backend: hf, model: null, dtype: float32, max_tokens: 80, batch_size: 4, device: cpu}}
evaluate: {{tasks: [STSBenchmark], data_dir: {up["eval"]}}}
extra: {{stubs: {{brainstorm: {up["brainstorm"]}, senior: {up["senior"]}, revisor: {up["revisor"]}}}}}
{body}
"""
    )
    return path
