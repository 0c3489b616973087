"""The writer's record of metric points that arrive below their series' last
``seq`` (``metric_backfill``), and a follower's use of it: on the real store
(the daemon's ``Store.apply``, a read-only ``Reader``), no daemon needed.
The end-to-end case (a real client's spool after a daemon restart, a real
``ckptd tail -f``) is ``test_tail_late_points.py``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils
from ckptd_client import protocol

from ckptd.store.query import Cursor, Reader
from ckptd.store.writer import MIGRATIONS, Store


def _log(seq: int, step: int | None = None) -> tuple[str, int, str, dict[str, Any]]:
    step = seq if step is None else step
    return ("r", 1, "c-aa", {"t": protocol.LOG, "seq": seq, "step": step,
                             "time": 1.7e9 + step, "m": {"loss": float(step), "lr": 0.1}})


def _apply(store: Store, seqs: list[int]) -> None:
    with store.transaction():
        store.ensure_run("r", 1)
        store.apply([_log(s) for s in seqs])


def _follow(reader: Reader, cursor: Cursor) -> tuple[list[int], Cursor]:
    lines, cursor = reader.lines("r", with_metrics=True, all_attempts=False, after=cursor)
    logged = [ln for ln in lines if ln.kind == "log"]
    assert all(set(ln.fields or {}) == {"loss", "lr"} for ln in logged), logged
    return sorted(ln.step for ln in logged if ln.step is not None), cursor


def _ranges(store: Store) -> list[tuple[int, int]]:
    return [(r[0], r[1]) for r in store.conn.execute(
        "SELECT lo, hi FROM metric_backfill WHERE sid = (SELECT MIN(id) FROM metric_series)"
        " ORDER BY id")]


def test_late_points_are_followed_once_and_replays_are_not_recorded(tmp_path: Path) -> None:
    store = Store(tmp_path / "ckptd.db")
    try:
        _apply(store, [1, 2, 3, 8, 9, 10])  # live; 4-7 still in a spool
        assert _ranges(store) == []  # in-order points record nothing
        with Reader(tmp_path) as reader:
            shown, cursor = reader.tail("r", 100, with_metrics=True, all_attempts=False)
            assert sorted(ln.step for ln in shown if ln.kind == "log") == [1, 2, 3, 8, 9, 10]
            # the spool: 3 and 9 replayed (shown before), 4-7 late, 11 new
            _apply(store, [3, 4, 5, 6, 7, 9, 11])
            assert _ranges(store) == [(4, 7)]
            steps, cursor = _follow(reader, cursor)
            assert steps == [4, 5, 6, 7, 11]
            assert _follow(reader, cursor)[0] == []
            # late points on both sides of a stored one: two ranges, neither
            # of which holds a point shown before
            _apply(store, [20, 22])
            steps, cursor = _follow(reader, cursor)
            assert steps == [20, 22]
            _apply(store, [21, 19, 12])
            assert _ranges(store)[1:] == [(12, 19), (21, 21)]
            # both batches before one look: points above the cursor and the
            # late ones are each shown once
            _apply(store, [30, 31])
            _apply(store, [25, 30, 26])
            steps, cursor = _follow(reader, cursor)
            assert steps == [12, 19, 21, 25, 26, 30, 31]
            assert _follow(reader, cursor)[0] == []
    finally:
        store.close()


def test_rm_removes_the_records_and_their_ids_are_never_reused(tmp_path: Path) -> None:
    store = Store(tmp_path / "ckptd.db")
    try:
        _apply(store, [1, 5])
        _apply(store, [3])
        top = store.conn.execute("SELECT MAX(id) FROM metric_backfill").fetchone()[0]
        assert top is not None
        with store.transaction():
            store.mark_run("r", status="finished")
            store.remove_run("r")
        assert store.conn.execute("SELECT COUNT(*) FROM metric_backfill").fetchone()[0] == 0
        # a follower of another run has ``top`` as its cursor: a new record
        # must come after it, not take the id of the removed one
        _apply(store, [1, 5])
        _apply(store, [3])
        assert store.conn.execute("SELECT MIN(id) FROM metric_backfill").fetchone()[0] > top
    finally:
        store.close()


def test_a_reader_follows_a_schema_8_store_and_its_migration(tmp_path: Path) -> None:
    """No daemon migrated it yet: no ``metric_backfill``, following still works;
    a daemon that migrates it meanwhile records late points the follower shows."""
    conn = sqlite3.connect(tmp_path / "ckptd.db", isolation_level=None)
    db = sqlite_utils.Database(conn)
    for version in range(1, 9):
        MIGRATIONS[version](db)
    conn.execute("PRAGMA user_version = 8")
    conn.execute("INSERT INTO runs (id, name, status, attempt, started) VALUES"
                 " ('r', 'r', 'running', 1, 1.7e9)")
    conn.execute("INSERT INTO metric_series (run_id, key, attempt, src) VALUES"
                 " ('r', 'loss', 1, 'c-aa'), ('r', 'lr', 1, 'c-aa')")
    conn.executemany("INSERT INTO metric_points VALUES (?,?,?,?,?)",
                     [(sid, s, s, 0.5, 1.7e9 + s) for s in (1, 2) for sid in (1, 2)])
    with Reader(tmp_path) as reader:
        _, cursor = reader.tail("r", 1, with_metrics=True, all_attempts=False)
        conn.executemany("INSERT INTO metric_points VALUES (?,?,?,?,?)",
                         [(sid, 3, 3, 0.5, 1.7e9 + 3) for sid in (1, 2)])
        steps, cursor = _follow(reader, cursor)
        assert steps == [3]
        conn.close()
        store = Store(tmp_path / "ckptd.db")  # the daemon starts: schema 9
        try:
            _apply(store, [5, 6])
            steps, cursor = _follow(reader, cursor)
            assert steps == [5, 6]
            _apply(store, [4])
            assert _follow(reader, cursor)[0] == [4]
        finally:
            store.close()
