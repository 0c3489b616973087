"""The views' SQL-side downsampling against the data a real resumed run logged.

A real client logs ``loss`` through a real daemon: attempt 1 logs steps
0..2999 (``1000 + step``, a NaN at step 50) with checkpoints at 100, 200, ..,
1000; attempt 2 restores 1000 and logs 1001..4999 (``-step``, one spike of
1e6; checkpoints at 2000, 3000, 4000). What attempt 1 logged after step 1000
is superseded: it must never reach a curve. The expected buckets are
computed here from what the scripts logged, not from the store.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import DaemonProc, env_for, kill_home_daemon, run_script

from ckptd.store.query import Reader
from ckptd.views import series

FIRST = """
import ckptd_client as ckptd
run = ckptd.init(name="ds")
for s in range(3000):
    run.log({"loss": float("nan") if s == 50 else 1000.0 + s}, step=s)
    if s % 100 == 0 and 0 < s <= 1000:
        run.checkpoint({"s": s}, step=s).wait(timeout=60)
run.finish(timeout=60)
print(run.id)
"""
SECOND = """
import ckptd_client as ckptd
run = ckptd.init()
assert run.restore()["s"] == 1000
for s in range(1001, 5000):
    run.log({"loss": 1e6 if s == 2345 else -float(s)}, step=s)
    if s % 1000 == 0:
        run.checkpoint({"s": s}, step=s).wait(timeout=60)
run.finish(timeout=60)
"""
SPIKE = 2345


def effective() -> dict[int, float]:
    """step -> value on the effective timeline, from what the scripts logged."""
    out = {s: (math.nan if s == 50 else 1000.0 + s) for s in range(1001)}
    out.update({s: (1e6 if s == SPIKE else -float(s)) for s in range(1001, 5000)})
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("ds") / "home"
    home.mkdir(mode=0o700)
    d = DaemonProc(home)
    d.start()
    try:
        rid = run_script(home, FIRST).stdout.split()[-1]
        run_script(home, SECOND, env=env_for(home, CKPTD_RUN_ID=rid, CKPTD_ATTEMPT="2"))
    finally:
        d.terminate()
        kill_home_daemon(home)  # one a client may have started after ours stopped
    return home, rid


def in_bucket(lo: int, width: float, b: int) -> list[tuple[int, float]]:
    data = effective()
    return [(s, v) for s, v in sorted(data.items()) if int((s - lo) / width) == b]


def nan_min(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return min(vals) if vals else math.nan


def nan_max(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return max(vals) if vals else math.nan


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_exact_buckets_are_the_min_max_of_the_effective_timeline(resumed: tuple[Path, str]
                                                                 ) -> None:
    home, rid = resumed
    with Reader(home) as reader:
        assert series.step_range(reader, rid, "loss") == (0, 4999)
        s = series.downsample(reader, rid, "loss", 50)
    assert s.exact and len(s.step) == 50 and s.points == 5000
    for b in range(50):
        rows = in_bucket(0, 100.0, b)
        vals = [v for _, v in rows]
        assert same(s.vmin[b], nan_min(vals)) and same(s.vmax[b], nan_max(vals)), b
        assert s.step[b] == sum(st for st, _ in rows) / len(rows)
        assert same(s.vlast[b], rows[-1][1]), b
    assert max(s.vmax) == 1e6  # the one-step spike is not lost
    assert not any(2000 < v < 1e6 for v in s.vmax)  # nothing superseded


def test_sampled_buckets_stay_inside_the_true_range_of_their_bucket(
        resumed: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    home, rid = resumed
    monkeypatch.setattr(series, "EXACT_MAX_STEPS", 100)  # the 5 M-point path, at 5 k
    with Reader(home) as reader:
        for lo, hi, buckets in ((None, None, 40), (700, 3100, 30)):
            s = series.downsample(reader, rid, "loss", buckets, lo, hi)
            first, last = (0, 4999) if lo is None else (lo, hi)
            width = (last - first + 1) / buckets
            assert not s.exact and len(s.step) == buckets, (lo, hi)
            for b in range(buckets):
                vals = [v for _, v in in_bucket(first, width, b)]
                lo_v, hi_v = nan_min(vals), nan_max(vals)
                assert first + b * width <= s.step[b] < first + (b + 1) * width, (lo, b)
                assert lo_v <= s.vmin[b] <= s.vmax[b] <= hi_v, (lo, b, s.vmin[b], s.vmax[b])
                assert s.vlast[b] in vals, (lo, b)


def test_values_under_checkpoints_and_last_values(resumed: tuple[Path, str]) -> None:
    home, rid = resumed
    with Reader(home) as reader:
        ckpts = [*range(100, 1001, 100), 2000, 3000, 4000]
        assert series.checkpoint_steps(reader, rid) == ckpts
        assert series.checkpoint_steps(reader, rid, 250, 2500) == [*range(300, 1001, 100), 2000]
        # spread over the range, the newest kept
        assert series.checkpoint_steps(reader, rid, most=5) == [300, 600, 800, 2000, 4000]
        assert series.checkpoint_dots(reader, rid, "loss", [100, 1000, 3000]) == [
            (100, 1100.0), (1000, 2000.0), (3000, -3000.0)]
        got = series.values_at(reader, rid, "loss", [50, 1000, 1500, 4999, 99999])
        assert math.isnan(got[0]) and got[1:] == [2000.0, -1500.0, -4999.0, -4999.0]
        assert series.last_values(reader, rid, ["loss"]) == {"loss": -4999.0}
        assert series.keys(reader, rid)[0] == "loss"
        row = series.run_rows(reader, [rid])
        assert [r["id"] for r in row] == [rid] and row[0]["last"] == {"loss": -4999.0}
