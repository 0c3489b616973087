"""A long run on the real store (issue 11.4): ``tail -n`` reads from the end of
the indexes, ``metrics`` streams in constant memory and ends quietly on a
closed pipe, a metric point costs <= 60 bytes, and a schema-5 store migrates
with every row intact.

The big store (300 k points, a log line per step) is written by
``bench/scale.py``'s bulk path: the daemon's own writer (``Store.apply``) fed
the messages a client sends, without the socket.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ckptd_client import protocol
from helpers import env_for

from ckptd.store import query
from ckptd.store.writer import MIGRATIONS, SCHEMA_VERSION, Store

REPO = Path(__file__).resolve().parents[2]
POINTS = 300_000
EVENTS = 300_000
#: Peak RSS of a `ckptd` process that reads a bounded number of rows: the
#: interpreter and the CLI are ~50 MB; reading this run whole took 180-300 MB.
RSS_MB = 100


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("scale") / "home"
    home.mkdir(mode=0o700)
    _bench().bulk(home, POINTS, batch=20_000, event_every=1)
    # a chatty run: log lines only (what `tail` without --metrics reads)
    store = Store(home / "ckptd.db")
    try:
        for first in range(0, EVENTS, 50_000):
            with store.transaction():
                store.ensure_run("chatty", 1)
                store.apply([("chatty", 1, "c-cc", {
                    "t": protocol.EVENT, "seq": seq + 1, "time": 1.7e9 + seq, "step": seq,
                    "msg": f"line {seq}", "level": "info"})
                    for seq in range(first, first + 50_000)])
    finally:
        store.close()
    return home


#: ``python -m ckptd`` that writes its own peak RSS (``VmHWM``, kB) to $HWM_FILE at
#: exit. Not ``wait4``'s ``ru_maxrss``: Linux carries the forking process's peak
#: over ``exec`` into it, so a child of a pytest process that imported torch
#: "peaked" at that process's 300 MB whatever it did itself.
_HWM = """
import atexit, os, runpy, sys
def _hwm():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["HWM_FILE"], "w") as out:
        out.write(kb)
atexit.register(_hwm)
sys.argv[0] = "ckptd"
runpy.run_module("ckptd", run_name="__main__", alter_sys=True)
"""


def _run(home: Path, *args: str, head: bool = False) -> tuple[str, str, int, float]:
    """``ckptd ARGS`` (with ``head``: read one line, then close the pipe):
    stdout, stderr, exit code, peak RSS in MB of that process alone."""
    hwm = home.parent / f"hwm-{os.getpid()}-{len(os.listdir(home.parent))}"
    proc = subprocess.Popen([sys.executable, "-c", _HWM, "--home", os.fspath(home), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(home, HWM_FILE=os.fspath(hwm)),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    if head:
        out = proc.stdout.readline().decode()
        proc.stdout.close()
    else:
        out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    proc.wait()
    peak = int(hwm.read_text()) / 1024 if hwm.exists() else float("inf")
    return out, err, proc.returncode, peak


@pytest.mark.parametrize("metrics", [False, True], ids=["events", "metrics"])
def test_tail_reads_the_last_lines_not_the_run(big: Path, metrics: bool) -> None:
    run, last = ("scale-bulk", f"step {POINTS // 4 - 1}") if metrics else \
        ("chatty", f"line {EVENTS - 1}")
    out, err, rc, rss = _run(big, "tail", run, "-n", "100", *(["--metrics"] if metrics else []))
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 100
    assert last in lines[-1] or any(last in ln for ln in lines[-3:]), lines[-3:]
    assert rss < RSS_MB, f"tail -n 100 peaked at {rss:.0f} MB: it read the whole run"


def test_metrics_stream_in_constant_memory_and_head_ends_quietly(big: Path) -> None:
    out, err, rc, _ = _run(big, "metrics", "scale-bulk", "--key", "loss", "--format", "csv",
                           head=True)
    assert out.rstrip() == "step,key,value,attempt,time"
    assert rc == 0 and err == "", err
    out, err, rc, rss = _run(big, "metrics", "scale-bulk", "--format", "jsonl")
    assert rc == 0, err
    steps = POINTS // 4
    # every step once, plus the two steps each resume restored from (both attempts'
    # rows at the restored step are on the effective timeline), 4 keys each
    assert out.count("\n") == (steps + 2) * 4
    assert rss < RSS_MB, f"a full export peaked at {rss:.0f} MB: rows were not streamed"


def test_a_metric_point_costs_at_most_60_bytes(big: Path) -> None:
    conn = sqlite3.connect(f"file:{big / 'ckptd.db'}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') AND tbl_name IN"
            " ('metrics', 'metric_points', 'metric_series', 'metric_backfill')")]
        size = conn.execute(f"SELECT SUM(pgsize) FROM dbstat WHERE name IN"
                            f" ({','.join('?' * len(names))})", names).fetchone()[0]
        points = conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    finally:
        conn.close()
    assert points >= POINTS
    assert size / points <= 60, f"{size / points:.1f} bytes per point"


def _v5_store(path: Path) -> None:
    """A store as schema 5 left it: the migrations up to 5, then rows as the
    version-5 writer inserted them (one ``metrics`` row per point)."""
    import sqlite_utils

    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    for version in range(1, 6):
        MIGRATIONS[version](db)
    conn.execute("PRAGMA user_version = 5")
    conn.execute("INSERT INTO runs (id, name, status, attempt, started) VALUES"
                 " ('r1', 'r1', 'running', 2, 1.7e9)")
    conn.execute("INSERT INTO attempts (run_id, attempt, restored_step) VALUES"
                 " ('r1', 1, NULL), ('r1', 2, 3)")
    rows = []
    for attempt, src, steps in ((1, "c-aa", range(6)), (2, "c-bb", range(3, 8))):
        for i, step in enumerate(steps):
            for key, value in (("loss", 1.0 / (step + 1)), ("nan", None)):
                rows.append(("r1", attempt, src, i + 2, key, step, value, 1.7e9 + step, 0))
    rows.append(("r1", 2, "r1-cc", 2, "loss", 5, 0.25, 1.7e9, 1))
    rows.append(("r1", 2, "d", 7, "sys/cpu", 9, 50.0, 1.7e9, 0))
    conn.executemany("INSERT INTO metrics (run_id, attempt, src, seq, key, step, value, time,"
                     " rank) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    conn.close()


def _everything(path: Path) -> tuple[list[Any], list[Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = "run_id, attempt, src, seq, key, step, value, time, rank"
        order = " ORDER BY run_id, attempt, src, seq, key"
        return (conn.execute(f"SELECT {cols} FROM metrics{order}").fetchall(),
                conn.execute(f"SELECT {cols} FROM effective_metrics{order}").fetchall())
    finally:
        conn.close()


def test_schema_5_store_migrates_and_reads_the_same(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db = home / "ckptd.db"
    _v5_store(db)
    before = _everything(db)
    with query.Reader(home) as reader:  # a reader before any daemon migrated it
        seen_before = (reader.metrics("r1", all_attempts=True, rank=None),
                       reader.metrics("r1", "sys/cpu"), reader.last_values("r1"),
                       reader.key_stats("r1"))
    store = Store(db)
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
        # a replay of a migrated point is still ignored; a new one is kept
        with store.transaction():
            store.apply([("r1", 2, "c-bb", {"t": protocol.LOG, "seq": 2, "step": 3,
                                            "time": 1.7e9 + 3, "m": {"loss": 0.25}}),
                         ("r1", 2, "c-bb", {"t": protocol.LOG, "seq": 9, "step": 8,
                                            "time": 1.7e9 + 8, "m": {"loss": 0.1}})])
    finally:
        store.close()
    after = _everything(db)
    new = ("r1", 2, "c-bb", 9, "loss", 8, 0.1, 1.7e9 + 8, 0)
    assert after[0] == sorted([*before[0], new], key=lambda r: r[:5])
    assert after[1] == sorted([*before[1], new], key=lambda r: r[:5])
    assert len(before[1]) < len(before[0])  # the resume hid some of attempt 1's rows
    with query.Reader(home) as reader:
        seen_after = (reader.metrics("r1", all_attempts=True, rank=None)[:-1],
                      reader.metrics("r1", "sys/cpu"), reader.last_values("r1"),
                      reader.key_stats("r1"))
    assert repr(seen_after[:2]) == repr(seen_before[:2])
    assert seen_after[2]["loss"] == 0.1 and seen_before[2]["loss"] == 0.125
    assert [(r["key"], r["count"]) for r in seen_after[3]] == \
        [(r["key"], r["count"] + (r["key"] == "loss")) for r in seen_before[3]]
