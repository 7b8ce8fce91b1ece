"""From a role's :class:`~speed.config.ModelSpec` to a running :class:`~speed.llm.base.Backend`.

Design choices:
- A registry of *module paths*, not classes: a backend's module (and its heavy dependency: llama.cpp,
  torch, vLLM) is imported only when a spec names it, so ``import speed`` stays light and a machine
  without vLLM can still run the llama.cpp backends.
- A missing dependency raises :class:`MissingDependencyError` (an ``ImportError``) whose message holds
  the pip command that installs it, e.g. ``pip install 'speed[llamacpp]'``.
- Every backend class has ``from_spec(spec, threads=..., model_path=...)`` taking its own spec class
  (:class:`~speed.config.HFSpec`, ...), whose fields and options were checked when the config loaded;
  ``model_path`` replaces ``spec.model`` (trained weights from the run: a merged or adapter folder).
- Plugins add a backend with :func:`register_backend`, which registers its spec class in the config's
  union of specs too: the names a config may write and the backends that can be built are one set.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from speed.config import ModelSpec, register_spec, spec_classes
from speed.suggest import did_you_mean

if TYPE_CHECKING:
    from speed.llm.base import Backend

logger = logging.getLogger(__name__)


class MissingDependencyError(ImportError):
    """A backend's library is not installed; the message names the pip command."""


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    extra: str | None


_REGISTRY: dict[str, _Entry] = {
    "openai": _Entry("speed.llm.openai_api", "OpenAIBackend", None),
    "llamacpp": _Entry("speed.llm.llamacpp", "LlamaCppBackend", "llamacpp"),
    "llamacpp_server": _Entry("speed.llm.server", "LlamaCppServerBackend", "llamacpp"),
    "hf": _Entry("speed.llm.hf", "HFBackend", "train"),
    "vllm": _Entry("speed.llm.vllm", "VLLMBackend", "vllm"),
}


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """Import a heavy dependency or raise with the install hint.

    Args:
        module: the module to import (``llama_cpp``, ``vllm``, ``torch``...).
        extra: the speed extra that installs it (``llamacpp``, ``vllm``, ``train``).
        what: who needs it, for the message ("the llamacpp backend").

    Raises:
        MissingDependencyError: the module (or one it imports) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{what} needs the Python package '{module}', which is not installed "
            f"({err}). Install it with: pip install 'speed[{extra}]'"
        ) from err


def require_installed(modules: tuple[str, ...], *, extra: str, what: str) -> None:
    """Check that top-level modules are installed without importing them (for a child process).

    Raises:
        MissingDependencyError: one is missing; the message has the pip command.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{what} needs the Python package(s) {', '.join(missing)}, not installed. "
            f"Install them with: pip install 'speed[{extra}]'"
        )


def register_backend(
    name: str, module: str, cls: str, extra: str | None = None, *, spec: type[ModelSpec]
) -> None:
    """Make a backend available to configs and to :func:`load_backend` under ``name``.

    Args:
        name: the ``backend`` value of a model spec.
        module: the module holding the class (imported when first used).
        cls: the class name; it must have a ``from_spec`` classmethod like the built-in backends.
        extra: the speed extra that installs its dependencies, for the error message.
        spec: the backend's spec class: a :class:`~speed.config.ModelSpec` subclass (or
            :class:`~speed.config.LocalSpec`, for a backend that loads weights here) declaring
            ``backend: Literal[name] = name`` and the backend's fields; configs that name the
            backend are validated against it when they load.

    Raises:
        TypeError: ``spec`` is not such a class, or it names another backend.

    Example:
        >>> class EchoSpec(ModelSpec):  # doctest: +SKIP
        ...     backend: Literal["echo"] = "echo"
        >>> register_backend("echo", "my_plugin.echo", "EchoBackend", spec=EchoSpec)  # doctest: +SKIP
    """
    concrete = isinstance(spec, type) and issubclass(spec, ModelSpec) and spec is not ModelSpec
    default = spec.model_fields["backend"].default if concrete else None
    if concrete and default != name:
        raise TypeError(
            f"register_backend('{name}', ...): the spec class {spec.__name__} is for backend "
            f"'{default}'; declare backend: Literal['{name}'] = '{name}' in it"
        )
    register_spec(spec)
    _REGISTRY[name] = _Entry(module, cls, extra)


def backend_names() -> list[str]:
    """Names a config may write as a role's ``backend``."""
    return sorted(_REGISTRY)


def load_backend(
    spec: ModelSpec,
    *,
    threads: int | None = None,
    model_path: str | None = None,
) -> Backend:
    """Build the backend a model spec describes.

    Args:
        spec: the role's model spec (the backend's own spec class, as a config holds it).
        threads: CPU threads when ``spec.threads`` is unset (the run-wide ``run.threads``); 1 if both
            are unset.
        model_path: weights to load instead of ``spec.model`` (a trained folder or adapter of the run).

    Returns:
        A ready backend; close it (or use it as a context manager) to free the model or the server.

    Raises:
        ValueError: an unknown backend name (with the nearest known one).
        TypeError: a spec of another class than the one registered for its backend.
        MissingDependencyError: the backend's library is not installed (with the pip command).
    """
    entry = _REGISTRY.get(spec.backend)
    if entry is None:
        # a config cannot get here (the union of specs refuses the name); a spec built in code can
        hint = did_you_mean(spec.backend, list(_REGISTRY))
        raise ValueError(
            f"unknown backend '{spec.backend}' (model spec field 'backend'); known: "
            f"{', '.join(backend_names())}.{hint}"
        )
    expected = spec_classes().get(spec.backend)
    if expected is not None and not isinstance(spec, expected):
        raise TypeError(
            f"backend '{spec.backend}' takes a {expected.__name__}, got a {type(spec).__name__}; "
            "build specs with speed.config.parse_model_spec or the backend's spec class"
        )
    module = importlib.import_module(entry.module)
    cls: Any = getattr(module, entry.cls)
    n_threads = spec.threads or threads or 1
    logger.debug(
        "loading backend %s (model %s, threads %d)", spec.backend, model_path or spec.model, n_threads
    )
    backend: Backend = cls.from_spec(spec, threads=n_threads, model_path=model_path)
    return backend
