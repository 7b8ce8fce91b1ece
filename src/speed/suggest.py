"""The "did you mean ...?" hint of every error about a mistyped name.

One helper, so that every message that refuses a name (a stage, a task kind, a template, an
evaluation task, an export format, a language, a packaged model) suggests the near ones the same way
(STYLE.md, habit 6). It sits at the bottom of the package and imports nothing of speed's, so any
layer may use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def close_matches(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The choices nearest to ``name``, best first; a choice equal but for case comes first.

    Args:
        name: what was asked for.
        choices: the valid names.
        n: how many suggestions at most.
        cutoff: difflib's similarity threshold in [0, 1]; lower suggests more distant names.

    Returns:
        Up to ``n`` names from ``choices`` (empty when none is near).
    """
    valid = list(dict.fromkeys(choices))
    near = difflib.get_close_matches(name, valid, n=n, cutoff=cutoff)
    # difflib is case-sensitive: 'scifact' is far from 'SciFact' by its ratio, yet plainly meant
    same_case = next((v for v in valid if v.lower() == name.lower() and v != name), None)
    if same_case is not None and same_case not in near:
        near = [same_case, *near][:n]
    return near


def did_you_mean(
    name: str,
    choices: Iterable[str],
    n: int = 1,
    cutoff: float = 0.6,
    *,
    what: str = "",
    show: Callable[[str], str] = str,
) -> str:
    """The hint to append to an error message: ``" Did you mean 'x'?"``, or ``""`` when nothing is near.

    Args:
        name: what was asked for.
        choices: the valid names.
        n: how many suggestions at most (several read ``'a', 'b' or 'c'``).
        cutoff: difflib's similarity threshold (see :func:`close_matches`).
        what: words before the names (``"the packaged model "``).
        show: how a suggestion is written (``str.title`` for language names).

    Returns:
        The hint with a leading space, ready to append to a sentence, or an empty string.

    Example:
        >>> did_you_mean("brainstrom", ["brainstorm", "seed"])
        " Did you mean 'brainstorm'?"
    """
    near = [f"'{show(c)}'" for c in close_matches(name, choices, n=n, cutoff=cutoff)]
    if not near:
        return ""
    listed = near[0] if len(near) == 1 else f"{', '.join(near[:-1])} or {near[-1]}"
    return f" Did you mean {what}{listed}?"
