"""The store on real SQLite files: durability settings, versioning, idempotent replays,
NaN handling, and docs/schema.md kept honest about every table and column."""

from __future__ import annotations

import math
import re
import sqlite3
from pathlib import Path

import pytest
from ckptd_client import protocol

from ckptd.store.writer import SCHEMA_VERSION, SchemaTooNew, Store

REPO = Path(__file__).resolve().parents[2]


def events(run: str, attempt: int, *msgs: dict) -> list[tuple[str, int, str, dict]]:
    return [(run, attempt, "c", dict(m)) for m in msgs]


def log(seq: int, step: int, **m: float) -> dict:
    return {"t": protocol.LOG, "seq": seq, "step": step, "time": 1.7e9 + seq, "m": m}


def register(seq: int = 1, **fields: object) -> dict:
    return {"t": protocol.REGISTER, "seq": seq, "time": 1.7e9, "name": "r", "pid": 1,
            "command": ["python", "train.py"], "cwd": "/tmp", **fields}


def status(seq: int, value: str, exit_code: int | None = 0) -> dict:
    return {"t": protocol.STATUS, "seq": seq, "time": 1.7e9 + seq, "status": value,
            "exit_code": exit_code}


def apply(store: Store, batch: list[tuple[str, int, str, dict]]) -> None:
    with store.transaction():
        for run, attempt in {(e[0], e[1]) for e in batch}:
            store.ensure_run(run, attempt)
        store.apply([(r, a, s, dict(m)) for r, a, s, m in batch])


def dump(path: Path) -> list[str]:
    """Every row, but for ``sqlite_sequence``: an ``INSERT OR IGNORE`` that a
    replay turns into nothing still uses up an ``AUTOINCREMENT`` event id (a
    gap; ids only grow, which is all a follower needs)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [line for line in conn.iterdump() if '"sqlite_sequence"' not in line]
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "ckptd.db")
    yield s
    s.close()


def test_new_store_is_wal_fsynced_and_versioned(store: Store) -> None:
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopening_keeps_data_and_version(tmp_path: Path) -> None:
    s = Store(tmp_path / "ckptd.db")
    apply(s, events("r1", 1, register(), log(2, 0, x=1.0)))
    s.close()
    s = Store(tmp_path / "ckptd.db")
    try:
        assert s.conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 1
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        s.close()


def test_store_from_a_newer_ckptd_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ckptd.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match="upgrade ckptd"):
        Store(path)
    assert path.read_bytes() == before


def test_replayed_events_change_nothing(store: Store) -> None:
    batch = events("r1", 1, register(), log(2, 0, loss=0.5, lr=0.1), log(3, 1, loss=0.4),
                   {"t": protocol.EVENT, "seq": 4, "time": 1.7e9, "level": "info",
                    "msg": "hello", "fields": {"a": 1}},
                   status(5, "finished"))
    apply(store, batch)
    first = dump(store.path)
    apply(store, batch)  # a resend
    apply(store, batch[:2])  # a partial spool ingested again
    assert dump(store.path) == first
    assert store.conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 3


def test_replayed_registration_does_not_revive_a_finished_run(store: Store) -> None:
    apply(store, events("r1", 1, register(), status(2, "finished")))
    apply(store, events("r1", 1, register()))
    assert store.conn.execute("SELECT status FROM runs").fetchone()[0] == "finished"


def test_late_status_of_an_older_attempt_does_not_override_the_newer(store: Store) -> None:
    apply(store, events("r1", 2, register(joined=True)))
    apply(store, events("r1", 1, status(9, "failed", 1)))  # attempt 1's spool, late
    assert store.conn.execute("SELECT status, attempt FROM runs").fetchone() == ("running", 2)
    assert store.conn.execute("SELECT status FROM attempts WHERE attempt = 2").fetchone() == \
        ("running",)


def test_nan_is_stored_as_null_infinities_as_themselves(store: Store) -> None:
    apply(store, events("r1", 1, log(1, 0, nan=math.nan, inf=math.inf, ninf=-math.inf,
                                     big=2**62)))
    got = dict(store.conn.execute("SELECT key, value FROM metrics").fetchall())
    assert got["nan"] is None
    assert got["inf"] == math.inf and got["ninf"] == -math.inf
    assert got["big"] == float(2**62)


def test_run_step_only_grows(store: Store) -> None:
    apply(store, events("r1", 1, register(), log(2, 10, x=1.0)))
    apply(store, events("r1", 1, log(3, 4, x=1.0)))
    assert store.conn.execute("SELECT step FROM runs").fetchone()[0] == 10


def test_restore_supersedes_the_replaced_timeline_in_any_order(store: Store) -> None:
    apply(store, events("r1", 1, register(), *(log(s + 2, s, x=float(s)) for s in range(6))))
    restored = {"t": protocol.RESTORED, "seq": 2, "time": 1.8e9, "step": 3}
    apply(store, events("r1", 2, register(joined=True), restored))
    # attempt 1's last steps arrive after attempt 2 restored (a late spool)
    apply(store, events("r1", 1, log(8, 6, x=6.0)))
    rows = store.conn.execute("SELECT step FROM effective_metrics WHERE attempt = 1"
                              " ORDER BY step").fetchall()
    assert rows == [(0,), (1,), (2,), (3,)]


def test_schema_doc_describes_every_table_and_column(store: Store) -> None:
    """docs/schema.md has a section per table listing each of its columns, and no
    column that does not exist."""
    doc = (REPO / "docs" / "schema.md").read_text()
    sections = dict(re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", doc, re.M | re.S))
    tables = [r[0] for r in store.conn.execute(
        "SELECT name FROM sqlite_master WHERE (type = 'table' OR name = 'metrics')"
        " AND name NOT LIKE 'sqlite_%'")]
    problems = []
    for table in tables:
        if table not in sections:
            problems.append(f"table {table} has no section")
            continue
        columns = {r[1] for r in store.conn.execute(f"PRAGMA table_info({table})")}
        documented = set(re.findall(r"^\| `(\w+)` \|", sections[table], re.M))
        problems += [f"{table}.{c} undocumented" for c in sorted(columns - documented)]
        problems += [f"{table}.{c} documented but absent" for c in sorted(documented - columns)]
    problems += [f"section {s} is not a table" for s in sections if s not in tables]
    assert not problems, problems
    assert "NULL means NaN" in doc and "superseded" in doc and "mode=ro" in doc
