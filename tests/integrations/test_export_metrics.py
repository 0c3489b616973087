"""``ckptd export``: TensorBoard reads back identical values; CSV, Parquet and JSONL round-trip.

The run has a resume in it (attempt 1 logged steps 0-9, attempt 2 restored
step 5 and logged 6-9 again), so the effective timeline and ``--all-attempts``
differ and both are checked.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, env_for, kill_home_daemon, run_script

FIRST = """
import torch, ckptd_client as ckptd
run = ckptd.init(name="exp")
for step in range(10):
    run.log({"loss": 1.0 / (step + 1) + 1e-9 * step, "acc": step / 10}, step=step)
    if step == 3:
        run.log({"odd": float("nan")}, step=3)
    if step == 5:
        run.checkpoint({"w": torch.ones(4)}, step=5).wait(30)
print(run.id)
run.finish()
"""
SECOND = """
import ckptd_client as ckptd
run = ckptd.init()
assert run.restore() is not None
for step in range(6, 10):
    run.log({"loss": 2.0 + step, "acc": -step / 3}, step=step)
run.finish()
"""


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One resumed run for every test here (two training processes cost seconds)."""
    home = tmp_path_factory.mktemp("export") / "home"
    home.mkdir(mode=0o700)
    d = DaemonProc(home)
    d.start()
    try:
        run_id = run_script(home, FIRST).stdout.split()[-1]
        run_script(home, SECOND, env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"))
        yield home, run_id
    finally:
        d.stop()
        kill_home_daemon(home)


@pytest.fixture
def home(shared_home: tuple[Path, str]) -> Path:
    return shared_home[0]


@pytest.fixture
def resumed_run(shared_home: tuple[Path, str]) -> str:
    return shared_home[1]


def _expected(home: Path, run_id: str, all_attempts: bool) -> list[dict]:
    args = ["metrics", run_id, "--format", "jsonl"] + (["--all-attempts"] if all_attempts else [])
    return [json.loads(line) for line in ckptd(home, *args, check=True).stdout.splitlines()]


def _same(a: float | str | None, b: float | str | None) -> bool:
    """Equal, or both not-a-number (JSON output spells it "NaN" or null)."""
    a, b = (float(x) if isinstance(x, str) else x for x in (a, b))
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == b


def test_csv_long_round_trips_the_effective_timeline(home: Path, resumed_run: str,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    ckptd(home, "export", "exp", "--format", "csv", "-o", str(out), check=True)
    with open(out / f"{resumed_run}.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "attempt", "step", "key", "value", "time"]
    expected = _expected(home, resumed_run, False)
    assert len(rows) == len(expected) == 10 * 2 + 1
    for r, e in zip(rows, expected, strict=True):
        assert r["run"] == resumed_run
        assert (int(r["attempt"]), int(r["step"]), r["key"]) == (e["attempt"], e["step"], e["key"])
        assert _same(float(r["value"]), e["value"]) and float(r["time"]) == e["time"]
    by_step = {(int(r["step"]), r["key"]): float(r["value"]) for r in rows}
    assert by_step[(7, "loss")] == 9.0 and by_step[(4, "loss")] == 1.0 / 5 + 4e-9


def test_parquet_long_and_wide_round_trip_with_all_attempts(home: Path, resumed_run: str,
                                                            tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    ckptd(home, "export", resumed_run, "--format", "parquet", "--all-attempts", "-o", str(out),
          check=True)
    table = pq.read_table(out / f"{resumed_run}.parquet").to_pylist()
    expected = _expected(home, resumed_run, True)
    assert len(table) == len(expected) == 10 * 2 + 1 + 4 * 2  # superseded points kept
    got = [(r["attempt"], r["step"], r["key"], r["value"]) for r in table]
    want = [(e["attempt"], e["step"], e["key"], e["value"]) for e in expected]
    assert all(g[:3] == w[:3] and _same(g[3], w[3]) for g, w in zip(got, want, strict=True))

    ckptd(home, "export", resumed_run, "--format", "parquet", "--wide", "-o", str(out),
          check=True)
    wide = pq.read_table(out / f"{resumed_run}.parquet").to_pylist()
    assert [w["step"] for w in wide] == list(range(10))  # effective: one row per step
    assert wide[3]["acc"] == 0.3 and wide[8]["loss"] == 10.0 and wide[8]["attempt"] == 2
    assert math.isnan(wide[3]["odd"])
    assert wide[0]["odd"] is None


def test_tensorboard_export_reads_back_identically(home: Path, resumed_run: str,
                                                   tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    ckptd(home, "export", "exp", "--format", "tensorboard", "-o", str(out), check=True)
    acc = EventAccumulator(str(out / resumed_run))
    acc.Reload()
    expected = _expected(home, resumed_run, False)
    got = {(tag, e.step): (e.value, e.wall_time) for tag in acc.Tags()["scalars"]
           for e in acc.Scalars(tag)}
    assert len(got) == len(expected)
    for e in expected:
        value, wall = got[(e["key"], e["step"])]
        # TensorBoard's scalars are float32: the value it shows is the float32 of ours
        assert _same(value, None if e["value"] is None else float(np.float32(e["value"])))
        assert wall == e["time"]
    again = ckptd(home, "export", "exp", "--format", "tensorboard", "-o", str(out))
    assert again.returncode != 0 and "already holds TensorBoard event files" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    ckptd(home, "export", "exp", "--format", "tensorboard", "--all-attempts", "-o",
          str(tmp_path / "tb2"), check=True)
    per = {}
    for attempt in (1, 2):
        a = EventAccumulator(str(tmp_path / "tb2" / resumed_run / f"attempt-{attempt}"))
        a.Reload()
        per[attempt] = {e.step: e.value for e in a.Scalars("loss")}
    assert sorted(per[1]) == list(range(10)) and sorted(per[2]) == [6, 7, 8, 9]
    assert per[2][7] == 9.0 and per[1][7] == np.float32(1 / 8 + 7e-9)


def test_jsonl_export_and_bad_input(home: Path, resumed_run: str, tmp_path: Path) -> None:
    out = tmp_path / "j"
    ckptd(home, "export", "exp", "--format", "jsonl", "-o", str(out), check=True)
    rows = [json.loads(x) for x in (out / f"{resumed_run}.jsonl").read_text().splitlines()]
    assert [(r["step"], r["key"]) for r in rows] == \
        [(e["step"], e["key"]) for e in _expected(home, resumed_run, False)]
    assert rows[0]["run"] == resumed_run
    for args, message in ((["--format", "xml"], "is not one of"),
                          (["--format", "jsonl", "--wide"], "--wide applies to")):
        bad = ckptd(home, "export", "exp", *args, "-o", str(out))
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
    bad = ckptd(home, "export", "nope", "--format", "csv", "-o", str(out))
    assert bad.returncode == 2 and "no run 'nope'" in bad.stderr


def test_a_missing_extra_is_one_line_naming_the_install(home: Path, resumed_run: str,
                                                        tmp_path: Path) -> None:
    import os

    # a pyarrow that fails to import, first on the path: what a machine without it sees
    broken = tmp_path / "broken"
    (broken / "pyarrow").mkdir(parents=True)
    (broken / "pyarrow" / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    env = env_for(home, PYTHONPATH=os.pathsep.join([str(broken), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    bad = ckptd(home, "export", "exp", "--format", "parquet", "-o", str(tmp_path / "p"), env=env)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.strip() == ("ckptd: error: export --format parquet needs the 'pyarrow' "
                                  "package: pip install 'ckptd[export]'")
    assert not (tmp_path / "p" / f"{resumed_run}.parquet").exists()
