"""``ckptd compare --plot FILE``: the numbers of the table, seen as curves.

Each side gets one colour: every seed's effective curve of the compared key as
a thin line, the mean across the side's seeds as a thick one, and a shaded
95% band around the mean. The band is a **percentile bootstrap of the mean
across seeds at each step** (each side resampled on its own, seeded, the same
number of resamples as the table), so it means what the table's ``ci95 of
mean`` means, at every step instead of at one. Mean and band are drawn only
over the steps every seed of the side reached (a seed that stopped early
would otherwise drag the mean); the seeds themselves are drawn whole.

SVG ids let a script find each part: ``seed-<side>-<run>``, ``mean-<side>``,
``band-<side>`` (``<side>`` is the side's position, from 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptd_client.errors import CkptdError

from ckptd.store.query import Reader, printable
from ckptd.views.plot import write_picture

FORMATS = (".png", ".svg")
#: Most x positions the mean and band are computed at (evenly picked steps).
MAX_GRID = 400


def side_curves(reader: Reader, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per side: each used run's (steps, values) of the compared key."""
    out = []
    for side in result["sides"]:
        seeds = []
        for run_id in side["runs"]:
            rows = [r for r in reader.metrics(run_id, result["key"])
                    if r["value"] == r["value"]]  # NaN breaks a line; leave it out
            seeds.append({"run": run_id, "step": [r["step"] for r in rows],
                          "value": [r["value"] for r in rows]})
        out.append({"side": side["side"], "seeds": seeds})
    return out


def mean_band(seeds: list[dict[str, Any]], *, resamples: int, seed: int
              ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps, mean, and the 95% bootstrap band's low and high edge."""
    import numpy as np

    curves = [s for s in seeds if s["step"]]
    if not curves:
        return [], [], [], []
    lo_step = max(s["step"][0] for s in curves)
    hi_step = min(s["step"][-1] for s in curves)
    steps = np.unique(np.concatenate([np.asarray(s["step"], dtype=float) for s in curves]))
    steps = steps[(steps >= lo_step) & (steps <= hi_step)]
    if len(steps) > MAX_GRID:
        steps = steps[np.linspace(0, len(steps) - 1, MAX_GRID).round().astype(int)]
    if not len(steps):
        return [], [], [], []
    # seeds logged at different steps meet on one grid (linear between their points)
    table = np.stack([np.interp(steps, s["step"], s["value"]) for s in curves])
    mean = table.mean(axis=0)
    if len(curves) < 2:
        return steps.tolist(), mean.tolist(), mean.tolist(), mean.tolist()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(curves), size=(resamples, len(curves)))
    means = table[picks].mean(axis=1)  # resamples x steps
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    return steps.tolist(), mean.tolist(), low.tolist(), high.tolist()


def render(reader: Reader, result: dict[str, Any], out: Path, *, width: int = 900,
           height: int = 520) -> None:
    """Write the picture of ``result`` (what :func:`compare.compare` returned) to ``out``."""
    if out.suffix.lower() not in FORMATS:
        raise CkptdError(f"--plot {out}: unknown picture format; use .png or .svg")
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi)
    for i, side in enumerate(side_curves(reader, result)):
        color = f"C{i % 10}"
        for s in side["seeds"]:
            ax.plot(s["step"], s["value"], color=color, linewidth=0.8, alpha=0.35,
                    gid=f"seed-{i}-{s['run']}")
        steps, mean, low, high = mean_band(side["seeds"], resamples=result["resamples"],
                                           seed=result["seed"])
        n = len(side["seeds"])
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0,
                        gid=f"band-{i}")
        ax.plot(steps, mean, color=color, linewidth=2.2, gid=f"mean-{i}",
                label=printable(f"{side['side']}: mean of {n} seed{'s' if n != 1 else ''}"))
    ax.set_xlabel("step")
    ax.set_ylabel(printable(result["key"]))
    ax.set_title(f"shaded: 95% bootstrap interval of the mean across seeds "
                 f"({result['resamples']} resamples, seed {result['seed']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lower()[1:], dpi=dpi)
    plt.close(fig)
    write_picture(out, buf.getvalue())


__all__ = ["FORMATS", "mean_band", "render", "side_curves"]
