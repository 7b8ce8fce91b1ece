"""Budgets: a hard stop on what the teacher costs a run folder, checked before each batch is sent.

``run.budget`` limits the teacher's calls, prompt tokens, generated tokens and spend in US dollars
(tokens priced per model by ``run.budget.prices``). :class:`~speed.ledger.LedgeredBackend` asks
:meth:`Budget.admit` before it sends a batch; the batch is cut to the requests that fit, the rest is
not sent, and :class:`BudgetExceeded` stops the run with what was spent and what remains. Answers
already received are in the ledger, so a rerun with a raised limit replays them and sends only
the rest.

Design choices:
- What was spent is read from the run's ledger (every teacher call it holds, superseded stage runs
  included): it is what the run folder has cost, it survives a kill, and a resumed run starts from
  it. Replayed answers are not sent, so they cost nothing.
- A batch is admitted against a worst-case bound, never an estimate, so a run never crosses a limit:
  a request generates at most ``max_tokens`` per sample, and a prompt has at most one token per
  UTF-8 byte of its messages and schema (true of the byte-level BPE and byte-fallback tokenizers of
  the teacher models in use) plus a chat-template allowance. Prompt tokens are over-counted about
  fourfold in English, so near a ``tokens_in`` or ``usd`` limit requests are admitted a few at a
  time, each round against the ledger's actual figures, and the run stops when the next request's
  bound no longer fits: less than one request's worth is left unused.
- Admitted requests are reserved until their batch ends, so batches sent from several threads at
  once cannot together cross a limit.
- Only the teacher is budgeted: it is the role that is paid per call (an API); the generators run on
  the user's own hardware.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from speed.config import BudgetConfig
    from speed.llm.base import Request


class SpendSource(Protocol):
    """What a budget reads its spend from: :meth:`speed.ledger.Ledger.totals_by_model` (this module
    sits below the ledger, which hands its backends a budget)."""

    def totals_by_model(self, role: str) -> Mapping[str, Any]: ...


#: the role whose calls a budget limits
BUDGETED_ROLE = "teacher"

#: prompt tokens a chat template may add: per message (role markers) and once (a default system
#: prompt such as SmolLM2's, the assistant header)
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS = 64

#: the limits of a budget, as their config keys name them
LIMITS = ("calls", "tokens_in", "tokens_out", "usd")


@dataclass(frozen=True)
class Spend:
    """Teacher calls, tokens and dollars: spent, reserved or bounded."""

    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            self.calls + other.calls,
            self.tokens_in + other.tokens_in,
            self.tokens_out + other.tokens_out,
            self.usd + other.usd,
        )

    def __sub__(self, other: Spend) -> Spend:
        return Spend(
            self.calls - other.calls,
            self.tokens_in - other.tokens_in,
            self.tokens_out - other.tokens_out,
            self.usd - other.usd,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "usd": round(self.usd, 6),
        }


def price_of(prices: Mapping[str, Any], model: str, tokens_in: int, tokens_out: int) -> float | None:
    """Dollars for ``model``'s tokens by the price table (USD per 1M); None when it has no price."""
    price = prices.get(model)
    if price is None:
        return None
    return (tokens_in * price.input + tokens_out * price.output) / 1e6


def request_bound(request: Request) -> tuple[int, int]:
    """The most prompt and generated tokens one request can cost (see the module docstring)."""
    text = sum(len(m.get("content", "").encode("utf-8")) for m in request.messages)
    schema = len(json.dumps(request.schema).encode("utf-8")) if request.schema else 0
    tokens_in = text + schema + TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + TEMPLATE_TOKENS
    return tokens_in, request.sampling.max_tokens * max(1, request.sampling.n)


class BudgetExceeded(RuntimeError):
    """The next teacher requests would cross ``run.budget``; the run stopped before sending them.

    Attributes:
        stage: the stage that was sending.
        unsent: requests of the batch that were not sent.
        status: :meth:`Budget.status` when the run stopped (limits, spent, left).
    """

    def __init__(self, message: str, stage: str, unsent: int, status: dict[str, Any]):
        super().__init__(message)
        self.stage = stage
        self.unsent = unsent
        self.status = status


class Budget:
    """The run's budget over its ledger: spent so far, and admission of new teacher requests.

    Args:
        config: ``run.budget``.
        ledger: the run's ledger (what was spent).
    """

    def __init__(self, config: BudgetConfig, ledger: SpendSource):
        self.config = config
        self.ledger = ledger
        self._lock = threading.Lock()
        self._reserved: dict[int, Spend] = {}
        self._next = 0

    # -- what was spent ------------------------------------------------------------------------

    def spent(self) -> tuple[Spend, list[str]]:
        """Teacher calls, tokens and dollars the ledger holds, and the models it could not price."""
        total = Spend()
        unpriced: list[str] = []
        for model, t in self.ledger.totals_by_model(role=BUDGETED_ROLE).items():
            usd = price_of(self.config.prices, model, t.tokens_in, t.tokens_out)
            if usd is None:
                unpriced.append(model)
            total += Spend(t.calls, t.tokens_in, t.tokens_out, usd or 0.0)
        return total, unpriced

    def status(self) -> dict[str, Any]:
        """Limits, spent and left, per limit (``left`` is None where there is no limit)."""
        spent, unpriced = self.spent()
        return budget_status(self.config, spent, unpriced)

    # -- admission -----------------------------------------------------------------------------

    def admit(self, model: str, requests: Sequence[Request]) -> tuple[int, int]:
        """Reserve the longest prefix of ``requests`` whose worst case fits what is left.

        Returns:
            ``(n, ticket)``: how many of the requests may be sent, and the ticket to
            :meth:`release` once their batch has ended (its answers are in the ledger by then).
        """
        with self._lock:
            spent, _ = self.spent()
            held = sum(self._reserved.values(), Spend())
            used = spent + held
            n = 0
            cost = Spend()
            for request in requests:
                tokens_in, tokens_out = request_bound(request)
                usd = price_of(self.config.prices, model, tokens_in, tokens_out)
                if usd is None and self.config.usd is not None:
                    break  # an unpriced model cannot be sent under a dollar limit
                nxt = cost + Spend(1, tokens_in, tokens_out, usd or 0.0)
                if not self._fits(used + nxt):
                    break
                cost = nxt
                n += 1
            ticket = self._next
            self._next += 1
            if n:
                self._reserved[ticket] = cost
            return n, ticket

    def release(self, ticket: int) -> None:
        """End a reservation made by :meth:`admit`."""
        with self._lock:
            self._reserved.pop(ticket, None)

    def _fits(self, total: Spend) -> bool:
        c = self.config
        return (
            (c.calls is None or total.calls <= c.calls)
            and (c.tokens_in is None or total.tokens_in <= c.tokens_in)
            and (c.tokens_out is None or total.tokens_out <= c.tokens_out)
            and (c.usd is None or total.usd <= c.usd)
        )

    def exceeded(
        self, stage: str, model: str, first_unsent: Request, unsent: int, batch: int
    ) -> BudgetExceeded:
        """The error that stops the run: what was spent, what remains, which limit stopped it, the fix."""
        status = self.status()
        tokens_in, tokens_out = request_bound(first_unsent)
        need = {
            "calls": 1,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "usd": price_of(self.config.prices, model, tokens_in, tokens_out) or 0.0,
        }
        limited = [name for name in LIMITS if status[name]["limit"] is not None]
        parts = [_describe(name, status[name]) for name in limited]
        # the limits to raise: those that cannot take the next request's worst case
        blocking = [name for name in limited if status[name]["left"] < need[name]] or limited
        example = " ".join(f"-o run.budget.{name}={_raised(status[name]['limit'])}" for name in blocking)
        sent = batch - unsent
        message = (
            f"run.budget reached in stage '{stage}' (teacher {model}): {'; '.join(parts)}. "
            f"{unsent} of this batch's {batch} teacher requests were not sent ({sent} were); every answer "
            "received is kept in the ledger. To resume without resending anything, raise the budget "
            f"and rerun, e.g. `speed run CONFIG {example}`"
        )
        return BudgetExceeded(message, stage, unsent, status)


def budget_status(config: BudgetConfig, spent: Spend, unpriced: Sequence[str] = ()) -> dict[str, Any]:
    """Limit, spent and left of each budget limit, and the models the price table lacks."""
    values = spent.to_dict()
    out: dict[str, Any] = {}
    for name in LIMITS:
        limit = getattr(config, name)
        left = None if limit is None else limit - values[name]
        if isinstance(left, float):
            left = round(left, 6)
        out[name] = {"limit": limit, "spent": values[name], "left": left}
    out["active"] = config.active
    # only a dollar limit needs prices: without one, an unpriced model is no news
    out["unpriced_models"] = list(unpriced) if config.usd is not None else []
    return out


def _describe(name: str, entry: Mapping[str, Any]) -> str:
    label = {"calls": "calls", "tokens_in": "tokens in", "tokens_out": "tokens out", "usd": "USD"}[name]
    if name == "usd":
        return f"{label} {entry['spent']:.4f} spent of {entry['limit']:g}, {entry['left']:.4f} left"
    return f"{label} {entry['spent']} spent of {entry['limit']}, {entry['left']} left"


def _raised(limit: float) -> str:
    """A doubled limit, for the example of the fix."""
    return f"{limit * 2:g}" if isinstance(limit, float) else str(int(limit) * 2)
