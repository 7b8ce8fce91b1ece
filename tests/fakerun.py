"""A fake but realistic run directory for the report tests (no tests here; imported by them).

The run has every stage of the pipeline finished, a real SQLite ledger written through
:meth:`speed.ledger.Ledger.record`, manifests shaped as the runner writes them (calls per role taken
from the ledger), synthesized examples, judge verdicts, evaluation results in ``evaluate_model``'s
shape and a scaling plot. Its figures are known, so tests can check the report's arithmetic.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from speed.io import write_json, write_jsonl
from speed.ledger import Ledger
from speed.llm.base import Completion, Request

XSS = "<script>alert(1)</script>"

#: (stage, role, calls, tokens_in per call, tokens_out per call, errors)
CALLS = [
    ("brainstorm", "teacher", 4, 120, 80, 0),
    ("seed", "teacher", 10, 300, 200, 1),
    ("candidates", "junior", 6, 250, 900, 0),
    ("judge", "teacher", 5, 1200, 60, 0),
    ("revisions", "senior", 5, 250, 180, 0),
    ("revisions", "teacher", 5, 500, 220, 0),
    ("synthesize", "senior", 15, 250, 180, 0),
    ("synthesize", "revisor", 15, 400, 180, 0),
]
TEACHER_CALLS = 4 + 10 + 5 + 5
TEACHER_TOKENS = 4 * 200 + 10 * 500 + 5 * 1260 + 5 * 720
DURATIONS = {
    "brainstorm": 12.5,
    "seed": 64.0,
    "junior": 410.0,
    "candidates": 95.0,
    "judge": 31.0,
    "senior": 380.0,
    "revisions": 50.0,
    "revisor": 300.0,
    "synthesize": 720.0,
    "labels": 30.0,
    "embed": 240.0,
    "evaluate": 88.0,
}
#: what the labels stage's manifest holds (relabel, round trip and mining on)
LABELS_STATS: dict[str, Any] = {
    "input": 12,
    "checked": 5,
    "count": 10,
    "drops": {"round_trip": 1, "relabel_neither": 1},
    "relabel": {"judge": "teacher", "asked": 3, "swap": 1, "keep": 1, "both": 0, "drop": 1, "unparsed": 0},
    "round_trip": {"scorer": "embedder", "k": 3, "checked": 4, "dropped": 1, "ranks": {"1": 3, ">3": 1}},
    "mining": {
        "negatives": "mined",
        "source": "pool",
        "candidates": 9,
        "examples": 3,
        "mined": 3,
        "none_found": 0,
        "replaced": 2,
        "filled": 1,
        "rows_added": 0,
    },
    "seconds_per_1k_checked": 41.5,
}
KINDS = {"retrieval": 5, "classification": 4, "sts": 3}
FINAL = sum(KINDS.values())
#: examples whose revision changed the senior's output (the revised ones but one; see synth_records)
CHANGED = 7
DROPS = {"parse_error": 2, "duplicate": 1}
SCORES = {
    "STSBenchmark": ("STS", "cosine_spearman", 0.71, 0.82),
    "SciFact": ("Retrieval", "ndcg_at_10", 0.52, 0.64),
    "Banking77Classification": ("Classification", "accuracy", 0.70, 0.79),
}

#: what speed.scale.scale_study writes (the fields the report reads)
SCALE_STUDY = {
    "model": "all-MiniLM-L6-v2",
    "tasks": list(SCORES),
    "points": [{"n": 400, "average": 0.70}, {"n": 100, "average": 0.60}, {"n": 200, "average": 0.65}],
    "fit": {"a": 0.268, "b": 0.0721, "r2": 0.99, "n_points": 3},
    "baseline_average": 0.643,
}


def tiny_png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG, made without an imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x2f\x6f\xde" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def fill_ledger(ledger: Ledger) -> None:
    for stage, role, n, tin, tout, errors in CALLS:
        items = []
        for i in range(n + errors):
            req = Request.chat(f"{stage} {role} request {i}")
            comp = (
                Completion(texts=[f"answer {i}"], tokens_in=tin, tokens_out=tout, latency_s=0.5)
                if i < n
                else Completion(error="not JSON", tokens_in=tin, latency_s=0.5)
            )
            items.append((req.key(role, "m"), req, comp))
        ledger.record(stage, role, "m", items)


#: An example of each kind in the fields its schema has.
EXAMPLES: dict[str, dict[str, str]] = {
    "retrieval": {"user_query": "q", "positive_document": "p", "hard_negative_document": "n"},
    "classification": {"input_text": "q", "label": "p", "misleading_label": "n"},
    "sts": {"S1": "q", "S2": "p", "S3": "n"},
}


def synth_records() -> list[dict[str, Any]]:
    """Shard records as the synthesize workers write them (senior's text, revisor's text, used or not).

    Of each kind, even-numbered examples were revised (the revisor's version used); the STS example 1
    was revised into the same data with other formatting (not a change), and the retrieval example 0
    carries model text with markup.
    """
    records = []
    for kind, n in KINDS.items():
        for i in range(n):
            example = {k: f"{v} {i} about {kind}" for k, v in EXAMPLES[kind].items()}
            raw = json.dumps({k: f"draft {v}" for k, v in EXAMPLES[kind].items()})
            revisor: str | None = json.dumps(example) if i % 2 == 0 else None
            if kind == "sts" and i == 1:
                draft = json.loads(raw)
                example, revisor = draft, json.dumps(draft, indent=1)
            if kind == "retrieval" and i == 0:
                raw = f'Here is the JSON: {{"user_query": "{XSS}", "positive_document": "d"}}'
                example = {**example, "user_query": XSS, "positive_document": "a document & more"}
                revisor = json.dumps(example)
            records.append(
                {
                    "index": i,
                    "kind": kind,
                    "task": f"Retrieve {kind} documents for question {i}.",
                    "prompt": f"Write one {kind} example as JSON.",
                    "attributes": {"query_length": "less than 5 words"},
                    "raw_output": raw,
                    "revisor_output": revisor,
                    "revised": revisor is not None,
                    "example": example,
                }
            )
    return records


def write_synthesize(folder: Path) -> int:
    """The synthesize stage's data folder, written by the stage's own writer; returns the row count."""
    from speed.stages.synthesize import training_rows, write_part

    rows = [row for rec in synth_records() for row in training_rows("00000", rec, rec["example"])]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    write_part(folder / "data", "00000", rows)
    return len(rows)


def judge_rows() -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"Write a retrieval example {i}.",
            "chosen": '{"user_query": "good"}',
            "rejected": '{"user_query": "bad"}',
            "reason": f"Candidate {i} follows the length guideline; the other copies the query.",
        }
        for i in range(7)
    ]


def eval_results() -> dict[str, Any]:
    def result(label: str, index: int) -> dict[str, Any]:
        tasks = {
            name: {"type": typ, "main_score_name": metric, "main_score": scores[index], "split": "test"}
            for name, (typ, metric, *scores) in SCORES.items()
        }
        avg = sum(t["main_score"] for t in tasks.values()) / len(tasks)
        return {
            "model": label,
            "instructions": index == 1,
            "tasks": tasks,
            "averages": {**{t["type"]: t["main_score"] for t in tasks.values()}, "average": avg},
        }

    return {**result("embed/model", 1), "baseline": result("all-MiniLM-L6-v2", 0)}


def write_stage(run: Path, name: str, ledger: Ledger | None, stats: dict[str, Any]) -> Path:
    folder = run / name
    folder.mkdir(parents=True, exist_ok=True)
    calls = {}
    if ledger is not None:
        calls = {role: t.to_dict() for (st, role), t in ledger.breakdown().items() if st == name}
    write_json(
        folder / "manifest.json",
        {
            "stage": name,
            "key": f"key-{name}",
            "speed_version": "0.1.0",
            "upstream": {},
            "finished_at": "2026-11-26T12:00:00+0000",
            "duration_s": DURATIONS.get(name, 1.0),
            "resumed": name == "synthesize",
            "stats": stats,
            "calls": calls,
            "files": sorted(p.name for p in folder.iterdir()),
        },
    )
    return folder


def make_fake_run(run: Path, stages: tuple[str, ...] | None = None) -> Path:
    """Write a run directory; ``stages`` limits which stages have finished (default: all)."""
    run.mkdir(parents=True, exist_ok=True)
    done = set(stages if stages is not None else DURATIONS)
    ledger = Ledger(run / "ledger.sqlite")
    try:
        fill_ledger(ledger)
        for name in DURATIONS:
            if name not in done:
                continue
            stats: dict[str, Any] = {"count": 3}
            if name == "synthesize":
                count = write_synthesize(run / name)
                stats = {
                    "count": count,
                    "drops": dict(DROPS),
                    "shards": 1,
                    "negative_removed": {"too_short": 2},
                }
            elif name == "labels":
                stats = dict(LABELS_STATS)
            elif name == "judge":
                rows = judge_rows()
                write_jsonl(run / name / "data.jsonl", rows)
                stats = {"count": len(rows), "drops": {"judge_unparsable": 1}}
            elif name == "evaluate":
                write_json(run / name / "results.json", eval_results())
                (run / name / "scale").mkdir()
                (run / name / "scale" / "scale_plot.png").write_bytes(tiny_png())
                write_json(run / name / "scale" / "scale_study.json", SCALE_STUDY)
                stats = {"count": len(SCORES)}
            write_stage(run, name, ledger, stats)
    finally:
        ledger.close()
    return run
