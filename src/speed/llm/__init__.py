"""LLM backends behind one interface (:class:`Backend`), built from a model spec by :func:`load_backend`.

Only the interface and the registry are imported here; each backend module (and its heavy library)
is imported when a spec names it.
"""

from speed.llm.base import Backend, BackendError, Completion, Request, Sampling
from speed.llm.registry import (
    MissingDependencyError,
    backend_names,
    load_backend,
    register_backend,
)

__all__ = [
    "Backend",
    "BackendError",
    "Completion",
    "MissingDependencyError",
    "Request",
    "Sampling",
    "backend_names",
    "load_backend",
    "register_backend",
]
