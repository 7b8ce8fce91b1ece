"""The synthesize stage on a tiny Llama trained in the test to write STS and matching JSON.

The upstream stages (brainstorm, senior, revisor) are stand-ins registered by a plugin module the
test writes: they copy prepared folders in the layout the real stages write (``data.jsonl`` with
``{kind, task, topic}``; ``merged/`` model folders), so the real synthesize stage runs unchanged.
The helpers here are shared with ``tests/integration/test_synthesize_resume.py`` and
``tests/integration/test_ray_synthesize.py``.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

WORDS = [
    *("a", "man", "plays", "guitar", "woman", "sings", "song", "child", "reads", "book", "dog"),
    *("runs", "park", "cat", "sleeps", "sofa", "chef", "cooks", "soup", "rain", "falls", "city"),
]
MATCHING_TASKS = ["Match a question to its answer.", "Find the title of a short story."]

STUB_PLUGIN = '''
"""Stand-ins for the upstream stages of synthesize: copy prepared folders (test helper)."""
import shutil
from pathlib import Path

from speed.runner import Stage, register


class _Copy(Stage):
    def run(self, ctx):
        src = Path(ctx.cfg.extra["stubs"][self.name])
        shutil.copytree(src, ctx.out, dirs_exist_ok=True)
        return {"count": 1}


@register
class Brainstorm(_Copy):
    name = "brainstorm"
    section = "stubs"


@register
class Senior(_Copy):
    name = "senior"
    section = "stubs"


@register
class Revisor(_Copy):
    name = "revisor"
    section = "stubs"
'''


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + "."


def training_examples(seed: int = 0) -> list[tuple[str, dict[str, str], str]]:
    """(kind, example, task) triples the tiny writer learns from."""
    rng = random.Random(seed)
    out = []
    for i in range(24):
        if i % 2 == 0:
            out.append(("sts", {"S1": _sentence(rng), "S2": _sentence(rng), "S3": _sentence(rng)}, ""))
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
    """Folders the stand-in stages copy, the stub plugin and an evaluation folder; returns their paths."""
    src = root / "upstream"
    brainstorm = src / "brainstorm"
    brainstorm.mkdir(parents=True)
    rows = [{"kind": "sts", "task": "Retrieve semantically similar text.", "topic": None}]
    rows += [{"kind": "matching_short", "task": t, "topic": "stories"} for t in MATCHING_TASKS]
    (brainstorm / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in ("senior", "revisor"):
        shutil.copytree(json_writer(), src / stage / "merged")
    (root / "plugins").mkdir(exist_ok=True)
    (root / "plugins" / "synth_stubs.py").write_text(STUB_PLUGIN)
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
        "plugins": str(root / "plugins"),
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


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    up = prepare_upstream(tmp_path_factory.mktemp("synth"))
    sys.path.insert(0, up["plugins"])
    return up


# --------------------------------------------------------------------------------------------
# the plan


def test_apportion_gives_exact_shares_of_the_kind_mix():
    from speed.config import SynthesizeConfig
    from speed.stages.synthesize import apportion, plan_kinds

    mix = SynthesizeConfig().kind_mix  # SPEED 7:7:7:2
    assert apportion(230, mix) == {
        "retrieval": 70,
        "classification": 70,
        "sts": 70,
        "matching_short": 10,
        "matching_long": 10,
    }
    counts = apportion(7, {"a": 1, "b": 1, "c": 0})
    assert counts == {"a": 4, "b": 3} and sum(counts.values()) == 7
    kinds = plan_kinds(1000, mix, random.Random(1))
    assert kinds.count("sts") == round(1000 * 7 / 23) and len(kinds) == 1000
    assert kinds != sorted(kinds)  # shuffled
    assert plan_kinds(1000, mix, random.Random(1)) == kinds


def test_kind_mix_refuses_negative_or_empty_weights():
    from pydantic import ValidationError

    from speed.config import SpeedConfig

    with pytest.raises(ValidationError, match=r"synthesize.kind_mix\['sts'\] is -1"):
        SpeedConfig.model_validate({"synthesize": {"kind_mix": {"sts": -1, "retrieval": 1}}})
    with pytest.raises(ValidationError, match="no kind a positive weight"):
        SpeedConfig.model_validate({"synthesize": {"kind_mix": {"sts": 0}}})


# --------------------------------------------------------------------------------------------
# the stage, in this process


def test_synthesize_writes_rows_with_provenance_and_counts_every_drop(tmp_path, upstream):
    from speed.config import load_config
    from speed.export import export_run
    from speed.io import read_jsonl, read_rows
    from speed.runner import Runner

    cfg = load_config(write_config(tmp_path, "run", upstream))
    statuses = Runner(cfg).run()
    assert [s.state for s in statuses] == ["done"] * 4
    folder = tmp_path / "run" / "synthesize"
    manifest = json.loads((folder / "manifest.json").read_text())
    stats = manifest["stats"]
    assert stats["shards"] == {"total": 4, "run": 4, "resumed": 0}
    # every prompt is either kept or dropped under a named reason
    assert stats["generated"] == 24
    assert stats["count"] + sum(stats["drops"].values()) == 24
    assert stats["count"] > 0 and stats["drops"]
    assert set(stats["per_kind"]) <= {"sts", "matching_short"}
    # the senior and the revisor were both called, through the ledger, once per prompt
    assert manifest["calls"]["senior"]["calls"] == 24
    assert 0 < manifest["calls"]["revisor"]["calls"] <= 24

    rows = read_rows(folder)
    assert len(rows) == stats["rows"] == stats["count"]
    row = rows[0]
    for column in (
        "kind",
        "task",
        "attributes",
        "prompt",
        "raw_output",
        "revisor_output",
        "revised",
        "example",
    ):
        assert column in row
    assert row["query"].startswith("Instruct: ") and row["query"].endswith(row["query_text"])
    assert sum(r["revised"] for r in rows) == stats["revisions"]["used"]
    sts = [r for r in rows if r["kind"] == "sts"]
    assert all(r["negative"] for r in sts)
    assert all(r["negative"] is None for r in rows if r["kind"] == "matching_short")

    # nothing kept repeats an evaluation sentence; what the writer reproduced was dropped
    eval_sentences = {
        json.loads(line)["sentence1"].lower()
        for line in (Path(upstream["eval"]) / "sts/STSBenchmark/test.jsonl").read_text().splitlines()
    }
    for r in rows:
        assert not {v.lower() for v in json.loads(r["example"]).values()} & eval_sentences
    records = [rec for p in sorted((folder / "shards").glob("*.jsonl")) for rec in read_jsonl(p)]
    assert len(records) == 24
    hits = [
        r
        for r in records
        if r["drop"] is None and {v.lower() for v in r["example"].values()} & eval_sentences
    ]
    assert stats["drops"].get("contaminated", 0) >= len(hits)
    # every shard has its marker and was processed once
    assert sorted(p.stem for p in (folder / "shards").glob("*.done")) == ["00000", "00001", "00002", "00003"]
    assert (folder / "shards" / "processed.log").read_text().split() == ["00000", "00001", "00002", "00003"]

    fe = export_run(tmp_path / "run", "flagembedding", tmp_path / "fe.jsonl")
    assert len(fe.read_text().splitlines()) == len(rows)


def test_turning_the_revisor_off_reruns_but_replays_the_senior(tmp_path, upstream):
    from speed.config import load_config
    from speed.io import read_rows
    from speed.runner import Runner

    path = write_config(tmp_path, "run", upstream)
    Runner(load_config(path)).run()
    before = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())["stats"]
    assert before["calls_this_run"]["senior_sent"] == 24

    cfg = load_config(path, ["synthesize.revise=false"])
    assert [s.state for s in Runner(cfg).status()][-1] == "stale"
    Runner(cfg).run()
    stats = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())["stats"]
    # the senior's answers come from the ledger; no revisor is loaded or called
    assert stats["calls_this_run"] == {"senior_sent": 0, "senior_replayed": 24}
    assert stats["revisions"]["used"] == 0
    assert not any(r["revised"] for r in read_rows(tmp_path / "run" / "synthesize"))


def test_a_retrained_senior_is_asked_anew_not_replayed(tmp_path, upstream):
    from speed.config import load_config
    from speed.runner import Runner

    path = write_config(tmp_path, "run", upstream)
    Runner(load_config(path)).run()
    # the upstream stages' section changes: new senior and revisor keys, same folders in the run
    Runner(load_config(path, ["extra.stubs.retrained=1"])).run()
    stats = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())["stats"]
    assert stats["calls_this_run"]["senior_sent"] == 24 and stats["calls_this_run"]["senior_replayed"] == 0


def test_missing_inputs_fail_before_any_call(tmp_path, upstream):
    from speed.config import load_config
    from speed.runner import Runner, StageError

    cfg = load_config(
        write_config(tmp_path, "run", upstream),
        ["synthesize.kind_mix={sts: 1, retrieval: 1}"],
    )
    with pytest.raises(StageError, match=r"no brainstormed task for kind\(s\) \['retrieval'\]"):
        Runner(cfg).run()
    cfg = load_config(write_config(tmp_path, "run2", upstream), ["evaluate.data_dir=/nonexistent/eval"])
    with pytest.raises(StageError, match=r"synthesize\.decontaminate: false"):
        Runner(cfg).run()
    assert (
        not (tmp_path / "run2" / "ledger.sqlite").exists()
        or not (tmp_path / "run2" / ".work" / "synthesize" / "shards").exists()
    )
