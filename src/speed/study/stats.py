"""The study's interval arithmetic: means over seeds with 95% t-intervals, and paired differences.

Design choices:
- A score per source is the mean over training seeds; its 95% interval is Student's t-interval,
  ``mean +- t(0.975, n-1) * sd / sqrt(n)`` with the sample standard deviation (n-1). With a single
  seed there is no spread to measure, so the interval is None, never a zero-width one that would
  look like certainty.
- Two sources are compared paired by seed (the same seed shuffles and initialises the same way for
  both), so the seed's own effect cancels: the difference per seed, then its mean and t-interval.
  A difference is ``beyond noise`` when its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["mean_interval", "paired_difference", "t_quantile"]


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom.

    Raises:
        ValueError: ``df`` < 1 or ``level`` outside (0, 1).
    """
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom (2 seeds), got df={df}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with its ``level`` t-interval.

    Returns:
        ``{"mean", "low", "high", "half_width", "sd", "n"}``; ``low``, ``high``, ``half_width`` and
        ``sd`` are None with fewer than two values (no spread to measure); every field but ``n`` is
        None with none.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "half_width": None, "sd": None, "n": 0}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "sd": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "sd": sd, "n": n}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> dict[str, Any]:
    """``a - b`` paired by seed: the mean difference over the seeds both have, with its t-interval.

    Args:
        a: seed -> score of the first source.
        b: seed -> score of the second source.

    Returns:
        :func:`mean_interval` of the per-seed differences, plus ``seeds`` (those paired) and
        ``beyond_noise``: True when the interval excludes 0, None without an interval.
    """
    seeds = sorted(set(a) & set(b))
    out = mean_interval([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    low, high = out["low"], out["high"]
    out["beyond_noise"] = None if low is None or high is None else bool(low > 0 or high < 0)
    return out
