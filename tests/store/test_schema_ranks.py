"""Schema v2 (ranks): a v1 store is migrated in place, its rows kept as rank 0."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from ckptd.store.writer import SCHEMA_VERSION, Store, _create_v1


def test_v1_store_migrates_to_ranks_keeping_rows(tmp_path: Path) -> None:
    path = tmp_path / "ckptd.db"
    db = sqlite_utils.Database(sqlite3.connect(path))
    _create_v1(db)
    db["runs"].insert({"id": "r1", "name": "r1", "status": "finished", "attempt": 1})
    db["metrics"].insert({"run_id": "r1", "attempt": 1, "src": "c", "seq": 1, "key": "loss",
                          "step": 0, "value": 0.5, "time": 1.0})
    db.execute("PRAGMA user_version = 1")
    db.conn.commit()
    db.conn.close()
    store = Store(path)
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.conn.execute("SELECT key, value, rank FROM metrics").fetchall() == \
            [("loss", 0.5, 0)]
        assert store.conn.execute("SELECT world_size FROM runs").fetchall() == [(None,)]
        with store.transaction():  # a rank's rows land with their rank
            store.apply([("r1", 1, "r3", {"t": "log", "seq": 1, "step": 0, "m": {"loss": 1.5},
                                          "time": 2.0})])
        assert store.conn.execute("SELECT src, rank FROM metrics ORDER BY rank").fetchall() \
            == [("c", 0), ("r3", 3)]
    finally:
        store.close()
