"""The call ledger: every LLM call of a run, in one SQLite database.

Each request is keyed by a hash of role, model, messages, sampling and schema
(:meth:`speed.llm.base.Request.key`). A request already answered is replayed instead of sent, which
is how a killed run resumes without paying twice, and the ledger's sums are the run's cost report:
teacher calls and tokens per stage, the paper's headline figure.

Design choices:
- SQLite in WAL mode: one file that travels with the run, safe against a SIGKILL mid-write, readable
  by other processes (``speed status``) while a stage writes.
- Dispatch is decoupled from durability. The backend gets every request of a call at once and keeps
  as many in flight as its engine takes; each answer is written as it arrives
  (:meth:`~speed.llm.base.Backend.generate_as_ready`), before the stage uses it, so a crash loses
  only the calls in flight. Answers that arrive together are written in one transaction (group
  commit: while one write runs, the next answers gather), capped at ``flush_every`` answers, so
  transactions stay small under load and nothing waits for a timer when answers are sparse. A
  transaction is all or nothing: a SIGKILL mid-write leaves no half-written row.
- When the backend fails mid-batch (or on Ctrl-C), the answers received before are recorded before
  the error propagates: paid calls are never lost.
- A failed request is recorded with its error but never replayed: a rerun asks again. ``attempts``
  accumulates over reruns, and so do the ``failed_*`` columns: the attempts that failed, by cause
  (``failed_429``, ``failed_5xx``, ``failed_timeout``, ``failed_dropped``). A request the endpoint
  never answered (retries ran out) is a row with its error and attempts, so every try sent is
  counted. Ledgers made before these columns existed get them (0) when a run opens them; readers
  of such a ledger see 0.
- Only the request payload is stored: no endpoint URL, header or API key ever reaches the database.
- Which calls a stage used is kept apart from the calls themselves (table ``uses``: stage key, call
  key), so a stage's manifest counts the calls behind its output, sent now or replayed, and not
  those of a superseded run of the same stage (another key) that the ledger still holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed.io import read_json
from speed.llm.base import FAILURE_CAUSES, Backend, Completion, OnReady, Request, gather

if TYPE_CHECKING:
    from speed.budget import Budget

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key        TEXT PRIMARY KEY,
    stage      TEXT NOT NULL,
    role       TEXT NOT NULL,
    model      TEXT NOT NULL,
    request    TEXT NOT NULL,
    response   TEXT,
    tokens_in  INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0,
    latency_s  REAL NOT NULL DEFAULT 0,
    attempts   INTEGER NOT NULL DEFAULT 0,
    error      TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_stage_role ON calls(stage, role);
CREATE TABLE IF NOT EXISTS uses (
    stage_key  TEXT NOT NULL,
    call_key   TEXT NOT NULL,
    PRIMARY KEY (stage_key, call_key)
);
"""


#: columns counting the failed attempts of a call by cause, added to ``calls`` after the first release
FAILURE_COLUMNS: dict[str, str] = {cause: f"failed_{cause}" for cause in FAILURE_CAUSES}


def has_calls_table(conn: sqlite3.Connection) -> bool:
    """Whether the database behind ``conn`` has the ledger's ``calls`` table."""
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calls'").fetchone()
    return row is not None


class LedgerError(RuntimeError):
    """The ledger file cannot be opened, read or written; the message names the file and the fix."""


def _ledger_error(path: Path, err: sqlite3.Error) -> LedgerError:
    """Words for an SQLite failure: what it means for the run and what to do about it."""
    text = str(err)
    if "malformed" in text or "not a database" in text or "no such table" in text:
        return LedgerError(
            f"the call ledger '{path}' is damaged ({text}). Restore it from a backup, or move it aside "
            f"(mv '{path}' '{path}.damaged') and rerun: finished stages are kept, the calls of "
            "unfinished stages are sent again"
        )
    if "disk I/O" in text or "full" in text:
        return LedgerError(
            f"cannot write the call ledger '{path}' ({text}): the disk is full or a file-size limit "
            "(ulimit -f) was reached. Free space or raise the limit, then rerun: answers already "
            "recorded are kept"
        )
    if "readonly" in text or "unable to open" in text:
        return LedgerError(
            f"cannot open the call ledger '{path}' for writing ({text}); make the run folder and the "
            "file writable (chmod u+w), or choose another run.dir"
        )
    return LedgerError(f"the call ledger '{path}' failed: {text}")


@dataclass
class Totals:
    """Sums over answered calls (errors excluded from calls and tokens)."""

    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    errors: int = 0
    latency_s: float = 0.0
    attempts: int = 0
    failed_429: int = 0
    failed_5xx: int = 0
    failed_timeout: int = 0
    failed_dropped: int = 0

    @property
    def failed(self) -> dict[str, int]:
        """Attempts that failed, by cause (answered calls and errors alike)."""
        return {cause: int(getattr(self, col)) for cause, col in FAILURE_COLUMNS.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "errors": self.errors,
            "latency_s": round(self.latency_s, 3),
            "attempts": self.attempts,
            "failed_attempts": self.failed,
        }


class Ledger:
    """An SQLite call ledger. Thread-safe; one connection per thread.

    Every SQLite failure leaves as a :class:`LedgerError` naming the file and the fix (damaged file,
    full disk, no write permission), never as a bare ``sqlite3`` error.

    Args:
        path: the database file (created with its folder).
        create: create the file and its tables when missing. Readers (``speed status``, ``speed
            cost``) pass False: they must never turn a 0-byte or damaged ledger into a new, empty
            one, which a later run would then take for a ledger with no calls and pay for them all
            again.

    Raises:
        LedgerError: the file cannot be opened, or (``create=False``) holds no call table.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            if create:
                conn.executescript(_SCHEMA)
            elif not has_calls_table(conn):
                raise LedgerError(
                    f"the call ledger '{self.path}' holds no call table (empty or never initialised); "
                    f"restore it from a backup, or delete it to start a new ledger knowingly"
                )
            have = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
            if create:
                for col in FAILURE_COLUMNS.values():
                    if col not in have:  # a ledger from before failures were counted
                        conn.execute(f"ALTER TABLE calls ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0")
                have.update(FAILURE_COLUMNS.values())
        # the sums a query asks for; 0 for a column an old ledger opened read-only lacks
        failed = ", ".join(f"SUM({{p}}{col})" if col in have else "0" for col in FAILURE_COLUMNS.values())
        self._sums = (
            "SUM({p}error IS NULL), SUM(CASE WHEN {p}error IS NULL THEN {p}tokens_in END), "
            "SUM(CASE WHEN {p}error IS NULL THEN {p}tokens_out END), SUM({p}error IS NOT NULL), "
            "SUM({p}latency_s), SUM({p}attempts), " + failed
        )

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                self._local.conn = conn
            yield conn
        except sqlite3.Error as err:
            raise _ledger_error(self.path, err) from err

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block succeeds, rolled back otherwise."""
        with self._conn() as conn:
            if conn.in_transaction:
                # a Ctrl-C that landed just after an earlier BEGIN left that write open: drop it, or
                # this BEGIN fails and the answers being saved after the interrupt are lost
                conn.execute("ROLLBACK")
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # after a disk error SQLite may have rolled back already; the first error is the one to tell
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- reads ---------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> dict[str, Completion]:
        """Answered (error-free) completions for the given keys."""
        found: dict[str, Completion] = {}
        with self._conn() as conn:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT key, response FROM calls WHERE error IS NULL AND response IS NOT NULL "
                    f"AND key IN ({marks})",
                    chunk,
                ).fetchall()
                for key, response in rows:
                    comp = Completion.from_dict(json.loads(response))
                    comp.cached = True
                    found[key] = comp
        return found

    def totals(self, stage: str | None = None, role: str | None = None) -> Totals:
        """Sums over calls, optionally of one stage and/or one role."""
        where, args = [], []
        if stage is not None:
            where.append("stage = ?")
            args.append(stage)
        if role is not None:
            where.append("role = ?")
            args.append(role)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._conn() as conn:
            row = conn.execute(f"SELECT {self._sums.format(p='')} FROM calls {clause}", args).fetchone()
        return Totals(*(v or 0 for v in row))

    def totals_by_model(self, role: str) -> dict[str, Totals]:
        """Totals of one role's calls per model label (what a budget prices; :mod:`speed.budget`)."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT model, SUM(error IS NULL), SUM(CASE WHEN error IS NULL THEN tokens_in END), "
                "SUM(CASE WHEN error IS NULL THEN tokens_out END), SUM(error IS NOT NULL), "
                "SUM(latency_s) FROM calls WHERE role = ? GROUP BY model ORDER BY model",
                (role,),
            ).fetchall()
        return {model: Totals(*(v or 0 for v in rest)) for model, *rest in rows}

    def usage(self, stage_key: str) -> dict[str, Totals]:
        """Totals per role over the calls a stage run (its key) used, sent or replayed."""
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT c.role, {self._sums.format(p='c.')} FROM uses u JOIN calls c ON c.key = u.call_key "
                "WHERE u.stage_key = ? GROUP BY c.role ORDER BY c.role",
                (stage_key,),
            ).fetchall()
        return {role: Totals(*(v or 0 for v in rest)) for role, *rest in rows}

    def breakdown(self) -> dict[tuple[str, str], Totals]:
        """Totals per (stage, role)."""
        with self._conn() as conn:
            pairs = conn.execute("SELECT DISTINCT stage, role FROM calls ORDER BY stage, role").fetchall()
        return {(s, r): self.totals(stage=s, role=r) for s, r in pairs}

    def rows(self, stage: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Raw rows, newest first, for inspection."""
        with self._conn() as conn:
            conn.row_factory = sqlite3.Row
            try:
                q = (
                    "SELECT * FROM calls"
                    + (" WHERE stage = ?" if stage else "")
                    + " ORDER BY updated_at DESC LIMIT ?"
                )
                args: list[Any] = [stage, limit] if stage else [limit]
                return [dict(r) for r in conn.execute(q, args).fetchall()]
            finally:
                conn.row_factory = None

    # -- writes --------------------------------------------------------------------------------

    def use(self, stage_key: str, keys: Sequence[str]) -> None:
        """Note that the stage run ``stage_key`` used the calls ``keys``."""
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO uses (stage_key, call_key) VALUES (?, ?)",
                [(stage_key, k) for k in dict.fromkeys(keys)],
            )

    def record(
        self, stage: str, role: str, model: str, items: Sequence[tuple[str, Request, Completion]]
    ) -> None:
        """Store answers (or errors) in one transaction."""
        now = time.time()
        cols = list(FAILURE_COLUMNS.values())
        insert = f"""
            INSERT INTO calls (key, stage, role, model, request, response, tokens_in,
                               tokens_out, latency_s, attempts, error, created_at, updated_at,
                               {", ".join(cols)})
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {", ".join("?" * len(cols))})
            ON CONFLICT(key) DO UPDATE SET
                stage = excluded.stage, response = excluded.response,
                tokens_in = excluded.tokens_in, tokens_out = excluded.tokens_out,
                latency_s = calls.latency_s + excluded.latency_s,
                attempts = calls.attempts + excluded.attempts,
                {", ".join(f"{c} = calls.{c} + excluded.{c}" for c in cols)},
                error = excluded.error, updated_at = excluded.updated_at
            -- the same answer stored again (a Ctrl-C between the commit and the caller's
            -- bookkeeping makes the backend report it twice) is one call, not two
            WHERE NOT (calls.error IS NULL AND calls.response IS excluded.response)
        """
        with self._transaction() as conn:
            for key, req, comp in items:
                conn.execute(
                    insert,
                    (
                        key,
                        stage,
                        role,
                        model,
                        json.dumps(req.to_dict(), ensure_ascii=False),
                        None if comp.error else json.dumps(comp.to_dict(), ensure_ascii=False),
                        comp.tokens_in,
                        comp.tokens_out,
                        comp.latency_s,
                        comp.attempts,
                        comp.error,
                        now,
                        now,
                        *(int(comp.failures.get(cause, 0)) for cause in FAILURE_COLUMNS),
                    ),
                )


class LedgeredBackend(Backend):
    """A backend whose every call goes through the ledger.

    Requests already answered are replayed; the rest go to the backend all at once (it keeps as many
    in flight as its engine takes), and each answer is recorded as it arrives
    (:meth:`Backend.generate_as_ready`), before the caller sees it. So a crash, even a SIGKILL,
    loses only the calls still in flight, and a rerun sends only those.

    Args:
        backend: the real backend.
        ledger: the run's ledger.
        role: the role this backend plays ("teacher", "junior", ...).
        stage: the stage the calls belong to (for the cost report).
        flush_every: at most this many answers per ledger transaction. Answers that arrive together
            are written together, in transactions of at most this size, so that one big group (a
            vLLM batch) never holds the database's write lock for long while other workers wait.
            It does not limit how many requests are in flight: that is the backend's business
            (``concurrency`` for HTTP, the whole batch for vLLM).
        model_id: label of the model for the ledger key; defaults to ``backend.model_id``.
        stage_key: the key of the stage run; every call answered here, sent or replayed, is noted
            as used by it (:meth:`Ledger.usage`).
        budget: the run's :class:`~speed.budget.Budget`, asked before each batch is sent; None:
            no limit.
    """

    name = "ledgered"

    def __init__(
        self,
        backend: Backend,
        ledger: Ledger,
        role: str,
        stage: str,
        flush_every: int = 32,
        model_id: str | None = None,
        stage_key: str | None = None,
        budget: Budget | None = None,
    ):
        self.backend = backend
        self.budget = budget
        self.ledger = ledger
        self.role = role
        self.stage = stage
        self.flush_every = max(1, flush_every)
        self.model_id = model_id or backend.model_id
        self.stage_key = stage_key
        self.sent = 0
        self.replayed = 0

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer each request, replayed from the ledger or sent and recorded; in order."""
        return gather(self, requests)

    def generate_as_ready(self, requests: Sequence[Request], on_ready: OnReady) -> None:
        """Report replayed answers at once, then each sent answer once it is recorded.

        When the backend fails (or Ctrl-C), the answers it received before are recorded before the
        error propagates; a rerun replays them and sends only the rest.
        """
        keys = [r.key(self.role, self.model_id) for r in requests]
        cached = self.ledger.lookup(keys)
        replay = [(i, cached[k]) for i, k in enumerate(keys) if k in cached]
        self.replayed += len(replay)
        # identical requests in one batch are sent once; their copies get the same answer
        copies: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k not in cached:
                copies.setdefault(k, []).append(i)
        send = [idxs[0] for idxs in copies.values()]
        if replay:
            on_ready(replay)
        recorded: set[int] = set()

        def record(ready: list[tuple[int, Completion]]) -> None:
            # a backend reporting again what a failed write had partly stored must not count twice
            fresh = [(j, comp) for j, comp in ready if j not in recorded]
            for start in range(0, len(fresh), self.flush_every):
                part = fresh[start : start + self.flush_every]
                self.ledger.record(
                    self.stage,
                    self.role,
                    self.model_id,
                    [(keys[send[j]], requests[send[j]], comp) for j, comp in part],
                )
                recorded.update(j for j, _ in part)
                self.sent += len(part)
            if fresh:
                on_ready([(i, comp) for j, comp in fresh for i in copies[keys[send[j]]]])

        if send and self.budget is None:
            self.backend.generate_as_ready([requests[i] for i in send], record)
        elif send:
            self._send_within_budget([requests[i] for i in send], record)
        if self.stage_key is not None:
            self.ledger.use(self.stage_key, keys)

    def _send_within_budget(self, batch: list[Request], record: OnReady) -> None:
        """Send ``batch`` in the rounds the budget admits; stop before the first that does not fit.

        Each round is admitted against the ledger's figures after the previous round's answers,
        so a batch far from the limit goes in one round, with all its concurrency.

        Raises:
            BudgetExceeded: part of the batch was not sent (the answers of the rest are recorded).
        """
        assert self.budget is not None
        start = 0
        while start < len(batch):
            n, ticket = self.budget.admit(self.model_id, batch[start:])
            if n == 0:
                break
            try:
                self.backend.generate_as_ready(batch[start : start + n], _shifted(record, start))
            finally:
                self.budget.release(ticket)
            start += n
        if start < len(batch):
            raise self.budget.exceeded(
                self.stage, self.model_id, batch[start], len(batch) - start, len(batch)
            )

    def close(self) -> None:
        self.backend.close()


def _shifted(on_ready: OnReady, offset: int) -> OnReady:
    """``on_ready`` for a slice of a batch that starts at ``offset``: indices moved back to the batch's."""

    def shifted(ready: list[tuple[int, Completion]]) -> None:
        on_ready([(offset + j, comp) for j, comp in ready])

    return shifted


# --------------------------------------------------------------------------------------------
# labels and sums a run reads from its ledger


def cost_summary(run_dir: Path) -> dict[str, Any]:
    """Teacher calls and tokens per stage, and teacher calls per final example.

    A finished stage counts the calls its output was made from (sent or replayed; the ledger's
    ``uses``), so an earlier run of the stage under another config does not inflate it; a stage
    still running counts what it sent so far. ``teacher_ledger_total`` is every teacher call the
    ledger holds, superseded runs included: what the run directory has cost.
    """
    ledger = Ledger(run_dir / "ledger.sqlite", create=False)  # a reader never makes a ledger
    try:
        per_stage: dict[str, Totals] = {}
        for (stage, role), spent in ledger.breakdown().items():
            # a study's data sources (speed study, RUN/study/SOURCE) are no part of the run's data
            if role != "teacher" or stage.startswith("study/"):
                continue
            manifest = run_dir / stage / "manifest.json"
            key = read_json(manifest).get("key") if manifest.exists() else None
            # runs made before the ledger noted uses have none: count all of the stage's calls
            per_stage[stage] = (ledger.usage(key).get("teacher") if key else None) or spent
        everything = ledger.totals(role="teacher").to_dict()
    finally:
        ledger.close()
    total = Totals(*(sum(getattr(t, f) for t in per_stage.values()) for f in Totals.__dataclass_fields__))
    final = None
    m = run_dir / "synthesize" / "manifest.json"
    if m.exists():
        final = read_json(m).get("stats", {}).get("count")
    return {
        "teacher_by_stage": {stage: t.to_dict() for stage, t in per_stage.items()},
        "teacher_total": total.to_dict(),
        "teacher_ledger_total": everything,
        "final_examples": final,
        "teacher_calls_per_example": (total.calls / final) if final else None,
    }


def budget_summary(run_dir: Path) -> dict[str, Any] | None:
    """``run.budget`` of a run folder (its config.yaml) against its ledger, or None without a limit.

    For ``speed cost`` and the report: a reader, it never creates or changes a ledger.

    Raises:
        ConfigError: the run's config.yaml cannot be loaded.
    """
    from speed.budget import Budget
    from speed.config import load_config

    if not (run_dir / "config.yaml").is_file() or not (run_dir / "ledger.sqlite").is_file():
        return None
    cfg = load_config(run_dir / "config.yaml", [f"run.dir={run_dir}"])
    if not cfg.run.budget.active:
        return None
    ledger = Ledger(run_dir / "ledger.sqlite", create=False)
    try:
        return Budget(cfg.run.budget, ledger).status()
    finally:
        ledger.close()
