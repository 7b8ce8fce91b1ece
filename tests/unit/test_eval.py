"""Evaluation: data-dir discovery, task registry, local loaders, instructions, tables, and a tiny
end-to-end MTEB run on a temporary folder in the layout of shared/eval with a tiny BERT built here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from speed import paths
from speed.evaluation import (
    INSTRUCTIONS,
    TASKS,
    UnknownTaskError,
    category_averages,
    format_query,
    markdown_table,
    resolve_task_names,
)
from speed.evaluation.loaders import EvalDataError, load_beir
from tiny import WORDS, make_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------
# fixtures: a tiny BERT and a tiny eval folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_eval_dir(root: Path) -> Path:
    """STSBenchmark, SciFact and TrecQA-clean in the layouts of shared/eval, a few rows each."""
    import random

    rng = random.Random(0)
    sts = []
    for i in range(24):
        a = " ".join(rng.choice(WORDS) for _ in range(5))
        b = a if i % 3 == 0 else " ".join(rng.choice(WORDS) for _ in range(5))
        sts.append({"sentence1": a, "sentence2": b, "score": 5.0 if a == b else float(i % 5)})
    _write_jsonl(root / "sts/STSBenchmark/test.jsonl", sts)

    docs = [
        {"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(WORDS) for _ in range(8))}
        for i in range(12)
    ]
    queries = [
        {"_id": f"q{i}", "text": docs[i]["text"].split()[0] + " " + docs[i]["text"].split()[1]}
        for i in range(8)
    ]
    for name, folder in (("SciFact", "retrieval/SciFact"), ("TrecQA-clean", "reranking/TrecQA-clean")):
        base = root / folder
        _write_jsonl(base / "corpus.jsonl", docs)
        # q7 is in queries.jsonl but not judged: it must not be evaluated (NFCorpus' case)
        _write_jsonl(base / "queries.jsonl", queries)
        qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(7))
        if name == "TrecQA-clean":
            qrels += "".join(f"q{i}\td{(i + 1) % 12}\t0\n" for i in range(7))
            _write_jsonl(
                base / "top_ranked.jsonl",
                [{"query-id": f"q{i}", "corpus-ids": [f"d{i}", f"d{(i + 1) % 12}"]} for i in range(7)],
            )
        (base / "qrels").mkdir(parents=True, exist_ok=True)
        (base / "qrels/test.tsv").write_text(qrels, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_eval_dir(tmp_path_factory.mktemp("eval"))


# --------------------------------------------------------------------------------------------
# paths


def test_eval_data_dir_prefers_config_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, env = tmp_path / "conf", tmp_path / "env"
    conf.mkdir()
    env.mkdir()
    monkeypatch.setenv(paths.EVAL_DIR_ENV, str(env))
    assert paths.eval_data_dir(str(conf)) == conf.resolve()
    assert paths.eval_data_dir() == env.resolve()


def test_eval_data_dir_missing_configured_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(paths.EvalDataNotFoundError, match=r"evaluate\.data_dir"):
        paths.eval_data_dir(str(tmp_path / "nope"))


def test_eval_data_dir_bad_env_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.EVAL_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(paths.EvalDataNotFoundError, match="SPEED_EVAL_DIR"):
        paths.eval_data_dir()


def test_eval_data_dir_walks_up_to_shared_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared" / "eval").mkdir(parents=True)
    deep = tmp_path / "repo" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.delenv(paths.EVAL_DIR_ENV, raising=False)
    monkeypatch.chdir(deep)
    assert paths.eval_data_dir() == (tmp_path / "shared" / "eval").resolve()


def test_eval_data_dir_none_found_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.EVAL_DIR_ENV, raising=False)
    monkeypatch.setattr(paths, "_candidates_above", lambda start: [])
    with pytest.raises(paths.EvalDataNotFoundError) as err:
        paths.eval_data_dir()
    assert "SPEED_EVAL_DIR" in str(err.value) and "evaluate.data_dir" in str(err.value)


# --------------------------------------------------------------------------------------------
# registry


def test_registry_covers_every_shared_eval_folder() -> None:
    assert set(TASKS) == {
        "STSBenchmark",
        "SICK-R",
        "Banking77Classification",
        "SIB200ClusteringS2S",
        "SciFact",
        "NFCorpus",
        "Cranfield",
        "TrecQA-clean",
    }
    assert set(INSTRUCTIONS) == set(TASKS)
    assert INSTRUCTIONS["STSBenchmark"] == "Retrieve semantically similar text."


def test_resolve_task_names_expands_suites_and_dedups() -> None:
    assert resolve_task_names(["SciFact", "quick"]) == ["SciFact", "STSBenchmark", "Banking77Classification"]
    assert resolve_task_names("all") == list(TASKS)


@pytest.mark.parametrize(("typo", "suggestion"), [("Scifact", "SciFact"), ("STSbenchmark", "STSBenchmark")])
def test_unknown_task_suggests_near_names(typo: str, suggestion: str) -> None:
    with pytest.raises(UnknownTaskError, match=f"Did you mean '{suggestion}'"):
        resolve_task_names([typo])


def test_get_task_keeps_official_metadata(eval_dir: Path) -> None:
    import mteb

    from speed.evaluation import get_task

    task = get_task("SciFact", eval_dir)
    official = mteb.get_task("SciFact")
    assert isinstance(task, type(official))
    assert task.metadata == official.metadata
    (eval_dir / "clustering/SIB200-eng").mkdir(parents=True, exist_ok=True)
    sib = get_task("SIB200ClusteringS2S", eval_dir)  # built without reading data
    assert sib.hf_subsets == ["eng_Latn"]
    assert sib.metadata == mteb.get_task("SIB200ClusteringS2S").metadata


def test_get_task_missing_folder_is_clear(tmp_path: Path) -> None:
    from speed.evaluation import get_task

    with pytest.raises(EvalDataError, match="retrieval/NFCorpus"):
        get_task("NFCorpus", tmp_path)


# --------------------------------------------------------------------------------------------
# loaders


def test_load_beir_keeps_only_judged_queries(eval_dir: Path) -> None:
    data = load_beir(eval_dir / "retrieval/SciFact", ["test"])["default"]["test"]
    assert data["queries"]["id"] == [f"q{i}" for i in range(7)]
    assert len(data["corpus"]) == 12
    assert data["relevant_docs"]["q0"] == {"d0": 1}
    assert data["top_ranked"] is None


def test_bad_qrels_header_names_the_file(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "1", "text": "x"}])
    _write_jsonl(tmp_path / "queries.jsonl", [{"_id": "1", "text": "x"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels/test.tsv").write_text("q\td\ts\n1\t1\t1\n")
    with pytest.raises(EvalDataError, match=r"test\.tsv"):
        load_beir(tmp_path, ["test"])


# --------------------------------------------------------------------------------------------
# instructions and tables


def test_format_query_is_e5_style_and_never_doubles() -> None:
    q = format_query("Retrieve semantically similar text.", "a cat")
    assert q == "Instruct: Retrieve semantically similar text.\nQuery: a cat"
    assert format_query("other", q) == q
    assert format_query(None, "a cat") == "a cat"


def test_tables_show_averages_and_deltas() -> None:
    tasks = {
        "A": {"type": "STS", "main_score_name": "cosine_spearman", "main_score": 0.8},
        "B": {"type": "STS", "main_score_name": "cosine_spearman", "main_score": 0.6},
        "C": {"type": "Retrieval", "main_score_name": "ndcg_at_10", "main_score": 0.3},
    }
    averages = category_averages(tasks)
    assert averages["STS"] == pytest.approx(0.7)
    assert averages["average"] == pytest.approx(1.7 / 3)
    base = {"model": "base", "tasks": tasks, "averages": averages}
    table = markdown_table({"model": "new", "tasks": tasks, "averages": averages}, base)
    assert "| A | STS | cosine_spearman | 80.00 | 80.00 | +0.00 |" in table
    assert "**Retrieval average**" in table


# --------------------------------------------------------------------------------------------
# end to end on the tiny folder


def test_evaluate_model_end_to_end(tiny_bert: Path, eval_dir: Path, tmp_path: Path) -> None:
    import torch

    from speed.evaluation import evaluate_model

    torch.set_num_threads(1)
    out = tmp_path / "out"
    result = evaluate_model(
        str(tiny_bert),
        ["STSBenchmark", "SciFact", "TrecQA-clean"],
        data_dir=eval_dir,
        out_dir=out,
        instructions=True,
        batch_size=8,
        baseline=str(tiny_bert),
        model_name="tiny",
    )
    assert list(result["tasks"]) == ["STSBenchmark", "SciFact", "TrecQA-clean"]
    assert result["tasks"]["SciFact"]["main_score_name"] == "ndcg_at_10"
    assert result["tasks"]["TrecQA-clean"]["main_score_name"] == "map_at_1000"
    for entry in [*result["tasks"].values(), *result["baseline"]["tasks"].values()]:
        assert -1.0 <= entry["main_score"] <= 1.0
    assert set(result["averages"]) == {"Reranking", "Retrieval", "STS", "average"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["baseline"]["model"] == str(tiny_bert) and saved["instructions"] is True
    assert "| SciFact | Retrieval | ndcg_at_10 |" in (out / "results.md").read_text()
    assert (out / "mteb" / "tiny" / "SciFact.json").is_file()


def test_bf16_evaluation_loads_bf16_weights_and_scores_like_fp32(tiny_bert: Path, eval_dir: Path) -> None:
    import torch

    from speed.evaluation import evaluate_model, load_embedder

    torch.set_num_threads(1)
    assert next(load_embedder(tiny_bert, precision="bf16").parameters()).dtype == torch.bfloat16
    runs = {
        p: evaluate_model(str(tiny_bert), ["STSBenchmark"], data_dir=eval_dir, batch_size=8, precision=p)
        for p in ("fp32", "bf16")
    }
    assert runs["fp32"]["precision"] == "float32" and runs["bf16"]["precision"] == "bfloat16"
    fp32, bf16 = (runs[p]["tasks"]["STSBenchmark"]["main_score"] for p in ("fp32", "bf16"))
    assert abs(fp32 - bf16) < 0.05


def test_instructions_go_to_queries_only(tiny_bert: Path, eval_dir: Path) -> None:
    import mteb

    from speed.evaluation import get_task, load_embedder
    from speed.evaluation.instructions import instructed_encoder

    model = load_embedder(tiny_bert)
    calls: list[tuple[list[str], str | None]] = []
    original = model.encode

    def spy(texts, prompt=None, **kwargs):
        calls.append((list(texts), prompt))
        return original(texts, prompt=prompt, **kwargs)

    model.encode = spy
    model.encode_query = spy
    model.encode_document = spy
    encoder = instructed_encoder(model, {"SciFact": "Find the document."})
    mteb.evaluate(
        encoder,
        get_task("SciFact", eval_dir),
        cache=None,
        encode_kwargs={"batch_size": 8, "show_progress_bar": False},
        show_progress_bar=False,
        co2_tracker=False,
    )
    prompts = {p for _, p in calls}
    assert "Instruct: Find the document.\nQuery: " in prompts
    doc_calls = [texts for texts, p in calls if not p]
    assert doc_calls and all(len(t) == 12 for t in doc_calls)  # the corpus, bare


# --------------------------------------------------------------------------------------------
# the evaluate stage's baseline cache


def test_evaluate_stage_caches_the_baseline_by_weights_tasks_and_data(
    tiny_bert: Path, eval_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The baseline is evaluated once per (weights, tasks, data); the trained model every time."""
    import shutil

    from speed.config import SpeedConfig
    from speed.io import write_json
    from speed.precision import resolve_precision
    from speed.runner import RunSession, StageContext
    from speed.stages.evaluate import Evaluate, baseline_cache_path

    monkeypatch.setenv("SPEED_CACHE", str(tmp_path / "cache"))
    baseline = tmp_path / "baseline"
    shutil.copytree(tiny_bert, baseline)
    evaluated: list[str] = []

    def fake_evaluate(model: Any, tasks: list[str], **kw: Any) -> dict[str, Any]:
        evaluated.append(Path(model).name)
        score = 0.25 if Path(model) == baseline else 0.5
        result: dict[str, Any] = {
            "tasks": {"STSBenchmark": {"main_score": score}},
            "averages": {"average": score},
        }
        if kw.get("baseline") is not None:
            result["baseline"] = kw["baseline"]
        return result

    monkeypatch.setattr("speed.evaluation.evaluate_model", fake_evaluate)
    run = tmp_path / "run"
    shutil.copytree(tiny_bert, run / "embed" / "model")
    write_json(run / "embed" / "manifest.json", {"stage": "embed", "key": "e"})
    cfg = SpeedConfig.model_validate(
        {
            "run": {"dir": str(run)},
            "evaluate": {"tasks": ["STSBenchmark"], "data_dir": str(eval_dir), "baseline": str(baseline)},
        }
    )

    def evaluate() -> dict[str, Any]:
        session = RunSession(cfg, run)
        out = run / ".work" / "evaluate"
        out.mkdir(parents=True, exist_ok=True)
        try:
            return Evaluate().run(StageContext(cfg, run, "evaluate", "k", out, ("embed",), session))
        finally:
            session.close()

    first = evaluate()
    assert evaluated == ["baseline", "model"] and first["baseline"] == {"STSBenchmark": 0.25}
    batch, precision = cfg.evaluate.batch_size, resolve_precision(cfg.evaluate.precision)
    cached = baseline_cache_path(str(baseline), ["STSBenchmark"], eval_dir, batch, precision)
    assert cached is not None and cached.exists()
    second = evaluate()
    assert evaluated == ["baseline", "model", "model"], "the cached baseline is not evaluated again"
    assert second["baseline"] == first["baseline"]

    # other weights in the same folder: another cache entry, evaluated anew
    (baseline / "extra.bin").write_bytes(b"new weights")
    assert baseline_cache_path(str(baseline), ["STSBenchmark"], eval_dir, batch, precision) != cached
    evaluate()
    assert evaluated[-2:] == ["baseline", "model"]
    # other tasks or batch size: another entry too; a hub name is never cached
    for other in (
        baseline_cache_path(str(baseline), ["STSBenchmark", "SICK-R"], eval_dir, batch, precision),
        baseline_cache_path(str(baseline), ["STSBenchmark"], eval_dir, batch + 1, precision),
    ):
        assert other is not None and other != cached
    assert baseline_cache_path("someone/some-model", ["STSBenchmark"], eval_dir, batch, precision) is None
