"""Statistics over a handful of seeds: pure functions, standard library only.

The choices follow Agarwal et al. (NeurIPS 2021, "Deep RL at the Edge of the
Statistical Precipice", the ``rliable`` library) and Bouthillier et al.
(MLSys 2021): report an interval, not a point; use the interquartile mean
(robust to one diverged seed) next to the mean; resample each side on its own
(stratified bootstrap); state the probability that one side beats the other.

Every bootstrap is seeded, so the same runs always give the same numbers.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
from collections.abc import Callable, Sequence

#: Bootstrap resamples used unless asked otherwise (stated in every output).
RESAMPLES = 2000
#: Seed of every bootstrap: same data, same intervals.
SEED = 0
#: Fewer runs than this on a side and no winner is called.
MIN_N = 3

Stat = Callable[[Sequence[float]], float]


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def iqm(xs: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle half, as ``scipy.stats.trim_mean(x, 0.25)``
    (``floor(n/4)`` values cut from each end)."""
    s = sorted(xs)
    k = int(0.25 * len(s))
    middle = s[k:len(s) - k]
    return mean(middle)


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def percentile_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    values = sorted(values)
    tail = (1 - level) / 2
    return quantile(values, tail), quantile(values, 1 - tail)


def bootstrap_ci(xs: Sequence[float], stat: Stat = mean, *, resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(xs)``."""
    rng = random.Random(seed)
    n = len(xs)
    return percentile_interval([stat(rng.choices(xs, k=n)) for _ in range(resamples)], level)


def prob_better(a: Sequence[float], b: Sequence[float], *, higher: bool = True) -> float:
    """P(a random run of A beats a random run of B), ties counting one half
    (the Mann-Whitney U statistic over ``len(a) * len(b)``)."""
    if not higher:
        a, b = [-x for x in a], [-x for x in b]
    sb = sorted(b)
    wins = 0.0
    for x in a:
        below = bisect.bisect_left(sb, x)
        ties = bisect.bisect_right(sb, x) - below
        wins += below + ties / 2
    return wins / (len(a) * len(b))


def bootstrap_pair(a: Sequence[float], b: Sequence[float],
                   stat: Callable[[Sequence[float], Sequence[float]], float], *,
                   resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = 0.95) -> tuple[float, float]:
    """Stratified bootstrap interval of ``stat(a, b)``: each side resampled on its own."""
    rng = random.Random(seed)
    values = [stat(rng.choices(a, k=len(a)), rng.choices(b, k=len(b)))
              for _ in range(resamples)]
    return percentile_interval(values, level)


def summarize(xs: Sequence[float], *, resamples: int = RESAMPLES,
              seed: int = SEED) -> dict[str, object]:
    """Everything ``ckptd compare`` reports about one side."""
    n = len(xs)
    out: dict[str, object] = {
        "n": n, "mean": mean(xs), "std": std(xs), "median": median(xs), "iqm": iqm(xs),
        "min": min(xs), "max": max(xs),
    }
    if n >= 2:
        out["ci95"] = list(bootstrap_ci(xs, mean, resamples=resamples, seed=seed))
        out["iqm_ci95"] = list(bootstrap_ci(xs, iqm, resamples=resamples, seed=seed))
    else:
        out["ci95"] = [xs[0], xs[0]]  # one value: no spread to resample
        out["iqm_ci95"] = [xs[0], xs[0]]
    return out


def overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Do two closed intervals share a point?"""
    return a[0] <= b[1] and b[0] <= a[1]


__all__ = ["RESAMPLES", "SEED", "MIN_N", "mean", "std", "median", "iqm", "quantile",
           "bootstrap_ci", "bootstrap_pair", "prob_better", "summarize", "overlap"]
