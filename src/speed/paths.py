"""Where the offline evaluation data lives (outside the repository and the run).

Design choices:

- Evaluation data is never copied into the repository or the run. It is found, in this order, at the
  configured folder (``evaluate.data_dir``), at ``$SPEED_EVAL_DIR``, or at a ``shared/eval`` folder
  beside the repository (found by walking up from the working directory and from this package), which
  is how the project's machines lay it out (``../shared/eval`` next to the checkout, or ``shared/eval``
  inside a copied working tree).
- Packaged models are found by :mod:`speed.models`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Environment variable naming the evaluation data folder.
EVAL_DIR_ENV = "SPEED_EVAL_DIR"


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
