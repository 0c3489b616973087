"""The data every view draws: downsampled curves, resume markers, checkpoint dots.

A run can hold millions of points per key; no view ships them all. The
store is asked for at most ``buckets`` min/max pairs over a step range:

* up to :data:`EXACT_MAX_STEPS` steps in the range, one ``GROUP BY`` over the
  ``metric_points (sid, step)`` index gives the exact min and max of every
  bucket (a spike of one step is never lost);
* past that, the same buckets are filled by :data:`SAMPLES_PER_BUCKET` index
  seeks each (``step >= s ORDER BY step LIMIT 1``): the cost is that of the
  buckets, not of the run (5 M points: one GROUP BY takes seconds, the seeks
  milliseconds). ``Series.exact`` says which one was used; zooming in to
  fewer steps gets the exact picture back.

Only the effective timeline is drawn (``store.effective``): what a resumed run
replaced is not on the curve, where it was resumed is (``Marker``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptd.store.query import Reader, effective

#: SQL condition: a metric row is on the effective timeline (no later attempt
#: resumed from a step before it).
EFFECTIVE = effective("metrics")

#: Largest step range read exactly (see the module docstring); measured on
#: the 2-core box: ~0.2 s for 200 k points, 1.2 s for 1 M.
EXACT_MAX_STEPS = 200_000
SAMPLES_PER_BUCKET = 4
#: Checkpoints drawn as dots per run (the newest ones when there are more).
MAX_DOTS = 500
#: Config keys that declare a run's length (for the ETA).
TOTAL_KEYS = ("total_steps", "max_steps", "steps", "num_steps", "iterations")


@dataclass
class Series:
    """One key of one run, bucketed: parallel lists, ordered by step."""

    run_id: str
    key: str
    step: list[float] = field(default_factory=list)   # mean step of the bucket
    time: list[float] = field(default_factory=list)   # mean time of the bucket
    vmin: list[float] = field(default_factory=list)
    vmax: list[float] = field(default_factory=list)
    vlast: list[float] = field(default_factory=list)  # value at the bucket's last step
    exact: bool = True
    points: int = 0                                   # rows behind the buckets (exact only)

    def polyline(self) -> tuple[list[float], list[float]]:
        """x/y of a line through each bucket's min and max (the usual min/max
        decimation: at one bucket per pixel it looks like every point was drawn)."""
        xs: list[float] = []
        ys: list[float] = []
        for i, s in enumerate(self.step):
            lo, hi = self.vmin[i], self.vmax[i]
            xs.append(s)
            ys.append(lo)
            if hi != lo:
                xs.append(s)
                ys.append(hi)
        return xs, ys

    def as_json(self) -> dict[str, Any]:
        return {"run": self.run_id, "key": self.key, "step": self.step, "time": self.time,
                "min": self.vmin, "max": self.vmax, "last": self.vlast, "exact": self.exact}


@dataclass
class Marker:
    """Where attempt ``attempt`` took over: it resumed from checkpoint ``step``
    (``-1``: it started over), after the previous attempt ended as ``reason``."""

    attempt: int
    step: int
    reason: str


def _src(key: str) -> str:
    """GLOB pattern of the writers of ``key``: the daemon's ``sys/...``, else the
    client processes (``c-<id>``, one per process; plain ``c`` before)."""
    return "d*" if key.startswith("sys/") else "c*"


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


Seek = Callable[..., list[tuple[int, float, Any]]]


def seeker(reader: Reader, run_id: str, key: str) -> Seek:
    """Index seeks along ``key``'s effective curve: ``seek(">=", s, n)`` gives the
    first ``n`` points ``(step, time, value)`` at or after step ``s``,
    ``seek("<=", s, n)`` the last ``n`` at or before it.

    One seek per series (``metric_points (sid, step)``; a key has one series
    per attempt and writer), each bounded by its attempt's effective cutoff,
    then merged: the cost is that of the answer, not of the run.
    """
    cutoffs = reader.cutoffs(run_id)
    plans = [(s.sid, None if s.src.startswith("d") else cutoffs.get(s.attempt))
             for s in reader.series(run_id, key=key, system=None)
             if s.src.startswith(_src(key)[0])]

    def seek(direction: str, step: int, limit: int = 1) -> list[tuple[int, float, Any]]:
        out: list[tuple[int, float, Any]] = []
        for sid, bound in plans:
            sql, args = "SELECT step, time, value FROM metric_points WHERE sid = ?", [sid]
            hi = step if direction == "<=" else None
            if bound is not None:
                hi = bound if hi is None else min(hi, bound)
            if direction == ">=":
                sql += " AND step >= ?"
                args.append(step)
            if hi is not None:
                sql += " AND step <= ?"
                args.append(hi)
            sql += " ORDER BY step" + (" DESC" if direction == "<=" else "") + " LIMIT ?"
            out += reader.conn.execute(sql, (*args, limit)).fetchall()
        out.sort(key=lambda r: r[0], reverse=direction == "<=")
        return out[:limit]

    return seek


def step_range(reader: Reader, run_id: str, key: str) -> tuple[int, int] | None:
    """First and last step of a key (two index seeks per series, whatever the run's size)."""
    seek = seeker(reader, run_id, key)
    first, last = seek(">=", -(1 << 62)), seek("<=", 1 << 62)
    if not first:
        return None
    return int(first[0][0]), int(last[0][0])


def downsample(reader: Reader, run_id: str, key: str, buckets: int = 800,
               lo: int | None = None, hi: int | None = None) -> Series:
    """``key`` of ``run_id`` between steps ``lo`` and ``hi`` in at most ``buckets`` buckets."""
    out = Series(run_id, key)
    rng = step_range(reader, run_id, key)
    if rng is None:
        return out
    lo = rng[0] if lo is None else max(lo, rng[0])
    hi = rng[1] if hi is None else min(hi, rng[1])
    if hi < lo:
        return out
    buckets = max(1, buckets)
    span = hi - lo + 1
    if span <= EXACT_MAX_STEPS:
        _exact(reader, out, lo, hi, buckets)
    else:
        out.exact = False
        _sampled(reader, out, lo, span, buckets)
    return out


def _exact(reader: Reader, out: Series, lo: int, hi: int, buckets: int) -> None:
    span = hi - lo + 1
    width = max(1.0, span / buckets)
    # max(step) as the only max() aggregate... would give a bare column; the
    # last value is taken by a correlated seek instead (one per bucket)
    rows = reader.conn.execute(
        "SELECT CAST((step - ?4) / ?5 AS INTEGER) AS b, avg(step), avg(time),"
        " min(coalesce(value, 9e999)), max(coalesce(value, -9e999)), max(step), count(*),"
        " sum(value IS NULL)"
        f" FROM metrics WHERE run_id = ?1 AND key = ?2 AND src GLOB ?3 AND {EFFECTIVE}"
        " AND step BETWEEN ?4 AND ?6 GROUP BY b ORDER BY b",
        (out.run_id, out.key, _src(out.key), lo, width, hi)).fetchall()
    seek = seeker(reader, out.run_id, out.key)
    for _b, s, t, vmin, vmax, last_step, n, nans in rows:
        if n == nans:  # a bucket of NaNs only: a gap in the line
            vmin = vmax = float("nan")
        out.step.append(float(s))
        out.time.append(float(t))
        out.vmin.append(float(vmin))
        out.vmax.append(float(vmax))
        out.vlast.append(_num(seek("<=", int(last_step))[0][2])
                         if len(rows) <= 2000 else float(vmax))
        out.points += n


def _sampled(reader: Reader, out: Series, lo: int, span: int, buckets: int) -> None:
    seek = seeker(reader, out.run_id, out.key)
    width = span / buckets
    for b in range(buckets):
        got: list[tuple[int, float, float]] = []
        start = lo + b * width
        for j in range(SAMPLES_PER_BUCKET):
            # rounded up: a sample point of a bucket is never a step of the one before
            rows = seek(">=", math.ceil(start + j * width / SAMPLES_PER_BUCKET))
            if not rows or rows[0][0] >= lo + (b + 1) * width:
                break
            row = rows[0]
            if not got or row[0] != got[-1][0]:
                got.append((row[0], row[1], _num(row[2])))
        if not got:
            continue
        vals = [v for _, _, v in got if not math.isnan(v)] or [float("nan")]
        out.step.append(sum(g[0] for g in got) / len(got))
        out.time.append(sum(g[1] for g in got) / len(got))
        out.vmin.append(min(vals))
        out.vmax.append(max(vals))
        out.vlast.append(got[-1][2])
        out.points += len(got)


def markers(reader: Reader, run_id: str) -> list[Marker]:
    """One marker per attempt after the first: where the curve was resumed."""
    out = []
    rows = reader.rows("SELECT attempt, restored_step FROM attempts WHERE run_id = ?"
                       " ORDER BY attempt", (run_id,))
    ended = {r["attempt"]: r for r in reader.rows(
        "SELECT attempt, status, signal FROM attempts WHERE run_id = ?", (run_id,))}
    for r in rows:
        if r["attempt"] <= 1:
            continue
        prev = ended.get(r["attempt"] - 1) or {}
        step = r["restored_step"] if r["restored_step"] is not None else -1
        out.append(Marker(r["attempt"], int(step), str(prev.get("status") or "?")))
    return out


def values_at(reader: Reader, run_id: str, key: str, steps: list[int]) -> list[float]:
    """The value of ``key`` at (or last before) each of ``steps``: index seeks."""
    seek = seeker(reader, run_id, key)
    return [_num(got[0][2]) if (got := seek("<=", s)) else float("nan") for s in steps]


def checkpoint_steps(reader: Reader, run_id: str, lo: int | None = None,
                     hi: int | None = None, most: int = MAX_DOTS) -> list[int]:
    """Steps of the committed checkpoints between ``lo`` and ``hi``, oldest first;
    of more than ``most``, ``most`` spread evenly over them, the newest kept (a
    chart shows a dot every few pixels at best, and each costs a value lookup)."""
    steps = [r[0] for r in reader.conn.execute(
        "SELECT step FROM checkpoints WHERE run_id = ? AND status = 'committed'"
        " AND step BETWEEN ? AND ? ORDER BY step",
        (run_id, -(2**63) if lo is None else lo, 2**63 - 1 if hi is None else hi))]
    if len(steps) <= most:
        return steps
    stride = len(steps) / max(1, most)
    return [steps[len(steps) - 1 - int(i * stride)] for i in range(max(1, most))][::-1]


def checkpoint_dots(reader: Reader, run_id: str, key: str | None = None,
                    steps: list[int] | None = None) -> list[tuple[int, float]]:
    """``(step, value of key at that step)`` for each committed checkpoint, or
    for ``steps`` of them (a view that draws a few looks up only those); the
    value is NaN without a key or a value there."""
    steps = checkpoint_steps(reader, run_id) if steps is None else steps
    if key is None:
        return [(s, float("nan")) for s in steps]
    return list(zip(steps, values_at(reader, run_id, key, steps), strict=True))


def keys(reader: Reader, run_id: str) -> list[str]:
    """Every metric key of a run, the daemon's ``sys/`` ones last (from
    ``metric_series``: a row per key and writer, not per point)."""
    names = sorted({s.key for s in reader.series(run_id, system=None)})
    return [k for k in names if not k.startswith("sys/")] + \
        [k for k in names if k.startswith("sys/")]


def last_values(reader: Reader, run_id: str, names: list[str]) -> dict[str, float]:
    out = {}
    for k in names:
        rng = step_range(reader, run_id, k)
        if rng is not None:
            out[k] = values_at(reader, run_id, k, [rng[1]])[0]
    return out


def run_rows(reader: Reader, ids: list[str] | None = None) -> list[dict[str, Any]]:
    """The runs table of ``watch`` and ``ui``: ``ls`` plus rate, ETA, last values,
    config; of the runs ``ids`` only when given (``watch RUN`` on a store of
    hundreds of runs does not look at the others' metrics)."""
    rows = reader.rows("SELECT * FROM runs ORDER BY started DESC, rowid DESC")
    if ids is not None:
        rows = [r for r in rows if r["id"] in ids]
    out = []
    for r in rows:
        names = keys(reader, r["id"])
        user = [k for k in names if not k.startswith("sys/")]
        config = _loads(r.get("config"))
        rate = _rate(reader, r["id"], user[0]) if user and r["status"] == "running" else None
        total = next((config[k] for k in TOTAL_KEYS
                      if isinstance(config, dict) and isinstance(config.get(k), int)), None)
        eta = None
        if rate and total and r.get("step") is not None and total > r["step"]:
            eta = (total - r["step"]) / rate
        out.append({
            "id": r["id"], "name": r.get("name"), "project": r.get("project"),
            "status": r["status"], "attempt": r["attempt"], "step": r.get("step"),
            "started": r.get("started"), "ended": r.get("ended"),
            "rate": rate, "eta_s": eta, "total_steps": total,
            "config": config if isinstance(config, dict) else {},
            "tags": _tags(r), "keys": names, "last": last_values(reader, r["id"], user),
        })
    return out


def _tags(run: dict[str, Any]) -> list[str]:
    tags = _loads(run.get("tags")) if "tags" in run else None
    return [str(t) for t in tags] if isinstance(tags, list) else []


def _rate(reader: Reader, run_id: str, key: str, window: int = 200) -> float | None:
    """Steps per second over the last ``window`` logged rows of ``key``."""
    rows = seeker(reader, run_id, key)("<=", 1 << 62, window)
    if len(rows) < 2:
        return None
    (s1, t1, _), (s0, t0, _) = rows[0], rows[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def _loads(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (``weight`` in [0, 1))."""
    if weight <= 0:
        return list(values)
    out, acc, n = [], 0.0, 0
    for v in values:
        if math.isnan(v):
            out.append(v)
            continue
        acc = acc * weight + (1 - weight) * v
        n += 1
        out.append(acc / (1 - weight ** n))
    return out
