"""run.budget: admission before each batch, a clean stop, resume without resending, the figures.

The backends here are tiny fakes over a real SQLite ledger; tests/integration/test_budget_llamacpp.py
proves the same on the real llama.cpp teacher through the CLI.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from speed.budget import Budget, BudgetExceeded, request_bound
from speed.config import BudgetConfig, ConfigError, load_config
from speed.ledger import Ledger, LedgeredBackend, budget_summary
from speed.llm.base import Backend, Completion, Request, Sampling

TOKENS_IN, TOKENS_OUT = 7, 3


class Teacher(Backend):
    """Answers every request with fixed token counts; remembers what it was sent, per call."""

    name = "fake"
    model_id = "gpt-test"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self.batches.append([r.messages[-1]["content"] for r in requests])
        return [
            Completion(texts=[r.messages[-1]["content"].upper()], tokens_in=TOKENS_IN, tokens_out=TOKENS_OUT)
            for r in requests
        ]

    @property
    def sent(self) -> list[str]:
        return [text for batch in self.batches for text in batch]


def requests(n: int, max_tokens: int = 10) -> list[Request]:
    return [Request.chat(f"q{i}", sampling=Sampling(max_tokens=max_tokens)) for i in range(n)]


def ledgered(ledger: Ledger, teacher: Teacher, **limits: object) -> LedgeredBackend:
    budget = Budget(BudgetConfig.model_validate(limits), ledger)
    return LedgeredBackend(teacher, ledger, "teacher", "seed", budget=budget)


def test_a_call_limit_cuts_the_batch_and_a_raised_one_resumes_without_resending(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    teacher = Teacher()
    with pytest.raises(BudgetExceeded) as stop:
        ledgered(ledger, teacher, calls=3).generate(requests(5))
    assert teacher.sent == ["q0", "q1", "q2"]  # one round, cut to what fits
    assert ledger.totals(role="teacher").calls == 3  # the answers received are kept
    message = str(stop.value)
    assert "stage 'seed'" in message and "calls 3 spent of 3, 0 left" in message
    assert "2 of this batch's 5 teacher requests were not sent" in message
    assert "-o run.budget.calls=6" in message
    assert stop.value.status["calls"] == {"limit": 3, "spent": 3, "left": 0}

    out = ledgered(ledger, teacher, calls=10).generate(requests(5))
    assert [c.text for c in out] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
    assert teacher.sent == ["q0", "q1", "q2", "q3", "q4"]  # nothing sent twice
    assert [c.cached for c in out] == [True, True, True, False, False]


def test_replayed_answers_cost_nothing_even_with_the_budget_spent(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    teacher = Teacher()
    ledgered(ledger, teacher, calls=2).generate(requests(2))
    again = ledgered(ledger, teacher, calls=2).generate(requests(2))
    assert all(c.cached for c in again) and len(teacher.batches) == 1


def test_a_token_limit_admits_by_the_worst_case_and_never_crosses(tmp_path: Path) -> None:
    # each request may generate 10 tokens and generates 3: the first round takes 2 (20 of 25), the
    # next rounds take what the ledger's actual spend leaves room for, until less than 10 is left
    ledger = Ledger(tmp_path / "ledger.sqlite")
    teacher = Teacher()
    with pytest.raises(BudgetExceeded) as stop:
        ledgered(ledger, teacher, tokens_out=25).generate(requests(20, max_tokens=10))
    spent = ledger.totals(role="teacher").tokens_out
    assert spent <= 25 and 25 - spent < 10
    assert [len(b) for b in teacher.batches][:2] == [2, 1]  # 20 reserved, then 6 spent + 10 + 10 > 25
    assert len(teacher.sent) == spent // TOKENS_OUT
    assert stop.value.status["tokens_out"]["left"] == 25 - spent
    assert "-o run.budget.tokens_out=50" in str(stop.value)


def test_the_prompt_bound_counts_every_byte_and_the_template() -> None:
    req = Request.chat("héllo", system="be brief", sampling=Sampling(max_tokens=50, n=2), schema={"a": 1})
    tokens_in, tokens_out = request_bound(req)
    assert tokens_out == 100
    assert tokens_in == len("héllo".encode()) + len("be brief") + len(json.dumps({"a": 1})) + 2 * 8 + 64


def test_a_dollar_limit_prices_tokens_per_model(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    teacher = Teacher()
    prices = {"gpt-test": {"input": 1000.0, "output": 1000.0}}  # 0.001 USD per token
    bound_in, bound_out = request_bound(requests(1)[0])
    per_request = (bound_in + bound_out) * 0.001
    limit = round(per_request * 2.5, 6)
    with pytest.raises(BudgetExceeded) as stop:
        ledgered(ledger, teacher, usd=limit, prices=prices).generate(requests(50))
    spent = stop.value.status["usd"]["spent"]
    assert spent == pytest.approx(len(teacher.sent) * (TOKENS_IN + TOKENS_OUT) * 0.001)
    assert spent <= limit and limit - spent < per_request
    assert "USD" in str(stop.value)


def test_batches_in_flight_together_cannot_share_the_last_calls(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(BudgetConfig(calls=3), ledger)
    first, ticket = budget.admit("m", requests(2))
    second, _ = budget.admit("m", requests(2))
    assert (first, second) == (2, 1)  # reserved, though nothing is in the ledger yet
    budget.release(ticket)
    assert budget.admit("m", requests(5))[0] == 2


def test_admission_is_thread_safe(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(BudgetConfig(calls=10), ledger)
    got: list[int] = []

    def take() -> None:
        got.append(budget.admit("m", requests(3))[0])

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == 10


def test_other_roles_are_not_budgeted(tmp_path: Path) -> None:
    from speed.roles import RoleBackends

    cfg = load_config(None, ["run.budget.calls=1", "models.junior.backend=hf", "models.junior.model=x"])
    roles = RoleBackends(cfg, tmp_path, budget=Budget(cfg.run.budget, Ledger(tmp_path / "l.sqlite")))
    roles._backends[("junior", None)] = Teacher()
    roles._backends[("teacher", None)] = Teacher()
    ledger = Ledger(tmp_path / "l.sqlite")
    assert roles.ledgered("junior", ledger=ledger, stage="candidates").budget is None
    assert roles.ledgered("teacher", ledger=ledger, stage="seed").budget is roles.budget
    unkept = RoleBackends(cfg, tmp_path)  # a Ray worker's: no budget to keep
    unkept._backends[("teacher", None)] = Teacher()
    with pytest.raises(ConfigError, match=r"executor\.kind: local"):
        unkept.ledgered("teacher", ledger=ledger, stage="seed")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("run.budget.calls=0", "'run.budget.calls': Input should be greater than 0"),
        ("run.budget.tokens_in=-5", "'run.budget.tokens_in': Input should be greater than 0"),
        ("run.budget.usd=0", "'run.budget.usd': Input should be greater than 0"),
        ("run.budget.calls=many", "'run.budget.calls': Input should be a valid integer"),
        ("run.budget.call=3", "Did you mean 'calls'?"),
        ("run.budget.prices={gpt-4o: {input: -1, output: 1}}", "'run.budget.prices.gpt-4o.input'"),
        ("run.budget.usd=5", "run.budget.prices has no price for the teacher's model 'gpt-4o'"),
    ],
)
def test_budget_values_are_checked_at_load(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_raising_the_budget_does_not_make_stages_stale() -> None:
    from speed.runner import Runner

    low = Runner(load_config(None, ["run.budget.calls=10"])).keys
    priced = ["run.budget.usd=1", "run.budget.prices={gpt-4o: {input: 1, output: 1}}"]
    high = Runner(load_config(None, ["run.budget.calls=100", *priced])).keys
    assert low == high


def test_speed_cost_and_the_report_show_spend_against_budget(tmp_path: Path, capsys) -> None:
    from fakerun import TEACHER_CALLS, make_fake_run
    from speed.cli import main
    from speed.report.summary import collect_summary

    run = make_fake_run(tmp_path / "run")
    cfg = load_config(None, ["run.budget.calls=30", "run.budget.tokens_out=100000", f"run.dir={run}"])
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    status = budget_summary(run)
    assert status is not None
    assert status["calls"] == {"limit": 30, "spent": TEACHER_CALLS, "left": 30 - TEACHER_CALLS}
    assert status["tokens_in"]["limit"] is None

    assert main(["cost", str(run)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["teacher", "calls", "30", str(TEACHER_CALLS), str(30 - TEACHER_CALLS)] in rows
    assert "not priced" not in out  # no dollar limit, no need for prices
    assert main(["cost", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"]["calls"]["left"] == 30 - TEACHER_CALLS

    summary, _, _ = collect_summary(run)
    assert summary["costs"]["budget"]["calls"]["spent"] == TEACHER_CALLS
    from speed.report import build_report

    html = build_report(run).read_text(encoding="utf-8")
    assert 'id="budget-table"' in html and "tokens_out" in html


def test_a_teacher_stage_on_ray_runs_on_the_driver_where_the_budget_is_kept(tmp_path: Path) -> None:
    from speed.executors import Shard, Worker, WorkerFactory
    from speed.executors.ray import RayExecutor
    from speed.runner import RunSession, StageContext

    class TeacherStage:
        roles = ("teacher",)

    class Ask(Worker):
        def __init__(self, env, stage: type) -> None:
            super().__init__(env)
            self.env = env

        def process(self, shard: Shard) -> dict:
            llm = self.env.llm("teacher")
            return {"texts": [c.text for c in llm.generate(requests(shard.payload))]}

    cfg = load_config(None, [f"run.dir={tmp_path}", "executor.kind=ray", "run.budget.calls=2"])
    session = RunSession(cfg, tmp_path)
    session.roles._backends[("teacher", None)] = teacher = Teacher()
    out = tmp_path / ".work" / "seed"
    out.mkdir(parents=True)
    ctx = StageContext(cfg, tmp_path, "seed", "k", out, (), session)
    executor = RayExecutor(cfg)  # never started: the shards must not reach Ray
    try:
        shards = [Shard("a", 2), Shard("b", 3)]
        results = executor.map(ctx, WorkerFactory(Ask, {"stage": TeacherStage}), shards)
        assert next(results) == ("a", {"texts": ["Q0", "Q1"]})
        with pytest.raises(BudgetExceeded):
            next(results)
        assert teacher.sent == ["q0", "q1"] and not executor._started
    finally:
        session.close()
