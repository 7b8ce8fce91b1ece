"""speed.roles: which weights a role runs with, and one factory of ledgered backends for driver and Ray."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from speed.config import load_config
from speed.executors.ray import RayEnv
from speed.llm.base import Backend, Completion, Request
from speed.roles import role_weights, weights_problem
from speed.runner import RunSession, StageContext, StageError


class _Loaded(Backend):
    """Remembers what it was built with; answers nothing."""

    name = "loaded"

    def __init__(self, model: str) -> None:
        self.model_id = model
        self.closed = False

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [Completion(texts=["x"]) for _ in requests]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Replace load_backend; record (backend, model_path) of every load."""
    seen: list[tuple[str, str | None]] = []

    def load(spec: Any, *, threads: int | None = None, model_path: str | None = None) -> Backend:
        seen.append((spec.backend, model_path))
        return _Loaded(model_path or spec.model)

    monkeypatch.setattr("speed.llm.load_backend", load)
    return seen


def test_a_role_runs_trained_weights_only_in_a_stage_that_reads_their_stage(tmp_path: Path) -> None:
    assert (
        role_weights(tmp_path, "junior", ("brainstorm", "seed", "junior")) == tmp_path / "junior" / "merged"
    )
    assert role_weights(tmp_path, "senior", ("junior", "judge")) is None  # the senior stage trains it
    assert role_weights(tmp_path, "junior", ("seed",)) is None  # the junior stage fine-tunes its base
    assert role_weights(tmp_path, "embedder", ("embed",)) == tmp_path / "embed" / "model"
    assert role_weights(tmp_path, "teacher", ("junior", "senior", "revisor")) is None


def test_weights_problem_names_what_is_missing(tmp_path: Path) -> None:
    assert "does not exist" in str(weights_problem(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    assert "holds no model" in str(weights_problem(tmp_path / "m"))
    (tmp_path / "m" / "model.gguf").write_bytes(b"")
    assert weights_problem(tmp_path / "m") is None


def _trained_senior(run: Path) -> None:
    (run / "senior" / "merged").mkdir(parents=True)
    (run / "senior" / "merged" / "config.json").write_text("{}")
    (run / "senior" / "manifest.json").write_text(json.dumps({"key": "k1"}))


def test_driver_and_ray_worker_load_the_same_weights_under_the_same_label(
    tmp_path: Path, loads: list[tuple[str, str | None]]
) -> None:
    cfg = load_config(None, [f"run.dir={tmp_path}", "models.senior.backend=hf", "models.teacher.backend=hf"])
    _trained_senior(tmp_path)
    reads = ("brainstorm", "senior", "revisor")
    session = RunSession(cfg, tmp_path)
    try:
        ctx = StageContext(cfg, tmp_path, "synthesize", "key", tmp_path / ".work", reads, session)
        driver = ctx.llm("senior")
        teacher = ctx.llm("teacher")
        env = RayEnv(cfg, "synthesize", "key", str(tmp_path), ledger=None, reads=reads)
        worker = env.llm("senior")
        assert driver.model_id == worker.model_id == "run:senior/merged@k1"
        assert loads == [
            ("hf", str(tmp_path / "senior" / "merged")),
            ("hf", None),
            ("hf", str(tmp_path / "senior" / "merged")),
        ]
        assert teacher.model_id == cfg.models.teacher.model
        assert ctx.llm("senior").backend is driver.backend  # loaded once per process
        env.close()
        assert worker.backend.closed  # type: ignore[attr-defined]
    finally:
        session.close()
    assert driver.backend.closed  # type: ignore[attr-defined]


def test_a_stage_checks_the_trained_folder_before_any_call(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    (tmp_path / "senior" / "merged").mkdir(parents=True)
    (tmp_path / "senior" / "manifest.json").write_text(json.dumps({"key": "k1"}))
    session = RunSession(cfg, tmp_path)
    try:
        ctx = StageContext(cfg, tmp_path, "revisions", "key", tmp_path / ".work", ("senior",), session)
        with pytest.raises(StageError, match=r"stage 'revisions': no trained senior model.*rerun 'senior'"):
            ctx.weights("senior")
        (tmp_path / "senior" / "merged" / "config.json").write_text("{}")
        assert ctx.weights("senior") == tmp_path / "senior" / "merged"
        assert ctx.weights("teacher") is None
    finally:
        session.close()
