"""The SQLite store: the only module that writes ``<home>/ckptd.db``.

Durability settings, and why:

* ``journal_mode=WAL``: readers (``ckptd tail -f``, ``ls``) never block the
  writer and never take its lock.
* ``synchronous=FULL``: the WAL is fsynced at every commit. ``NORMAL`` skips
  that fsync and loses acknowledged commits on power loss, which would break
  promise 1 (the daemon acks only after a commit).

Idempotency: every event row has the key ``(run_id, attempt, src, seq)`` and
is inserted with ``INSERT OR IGNORE``. An event's side effects on the ``runs``
table are applied only when its row was new, so a replay (resend, spool
ingested twice) changes nothing.

Bounded WAL: a transaction's pages live in the WAL until a checkpoint copies
them into the database, and SQLite never shrinks the file by itself. The
writer keeps transactions small (byte-bounded batches, see the daemon) and
:meth:`Store.bound_wal` truncates the WAL once it passes :data:`WAL_LIMIT`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client import paths, protocol
from ckptd_client.distributed import rank_of_src
from ckptd_client.errors import CkptdError, NotFound, ResumeRefused

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 10
#: WAL size (bytes) past which the writer truncates it (and SQLite's own
#: ``journal_size_limit``): the WAL holds whole transactions, so this is also
#: about the largest batch the daemon commits, with room to spare.
WAL_LIMIT = 64 << 20


def effective(table: str) -> str:
    """SQL condition: a row of ``table`` (``metrics`` or ``events``) is on the
    effective timeline, i.e. no later attempt of its run resumed from a step
    before it.

    The one definition of "superseded" (the views, ``ckptd metrics`` and
    ``tail`` use it): a resume records its restored step once, in
    ``attempts``, instead of rewriting the earlier attempts' rows (which took
    25 s and a 1.2 GB WAL on a 20 M-point store, blocking every other run).
    The daemon's own samples (src ``d``, ``sys/`` keys) are never replaced.
    """
    src = f"{table}.src GLOB 'd*' OR " if table == "metrics" else ""
    return (f"({src}NOT EXISTS (SELECT 1 FROM attempts sup WHERE sup.run_id = {table}.run_id"
            f" AND sup.attempt > {table}.attempt AND sup.restored_step < {table}.step))")


class SchemaTooNew(CkptdError):
    """The store was written by a newer ckptd; we refuse rather than corrupt it."""

log = logging.getLogger("ckptd.store")


class StoreError(CkptdError):
    """The store cannot be opened or written (disk full, permissions, corruption)."""


def not_a_store(path: Path, exc: sqlite3.Error) -> StoreError:
    """The one message for a store SQLite cannot read (CLI and daemon alike)."""
    return StoreError(
        f"open {path}: not a ckptd store, or a damaged one (SQLite: {exc}); move it aside "
        f"(mv {path} {path}.bad) and restore it from a backup, or start afresh without it")


def _damaged(exc: sqlite3.Error) -> bool:
    """Corruption, as opposed to a locked, full or unwritable store."""
    return type(exc) is sqlite3.DatabaseError


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes the store, for readers (``ls``, ``tail``).

    ``mode=ro`` still opens the WAL index (``-shm``) for writing, which a
    read-only filesystem (a mounted backup, a snapshot) refuses; there the
    file is read as it is (``immutable=1``: no locks, no WAL; nothing can
    write it there, and a daemon that stopped cleanly left no WAL behind).
    """
    uri = "file:" + urllib.parse.quote(os.fspath(path))
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if not _read_only_fs(path):
            raise
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=30)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def private_files(path: Path) -> None:
    """Create the store 0600 (SQLite gives its -wal and -shm the store's mode)
    and take group/other access away from a store left readable: it holds
    every run's environment (tokens, keys, database URLs)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"open {path}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in paths.DB_SIDECARS:
        with contextlib.suppress(FileNotFoundError):
            side = path.with_name(path.name + suffix)
            st = os.lstat(side)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                os.chmod(side, 0o600)


def check_version(path: Path) -> int:
    """Read the schema version without writing; refuse a store from the future."""
    if not path.exists():
        return 0
    try:
        conn = connect_readonly(path)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise not_a_store(path, exc) from None
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"open {path}: store has schema version {version}, newer than this ckptd "
            f"understands ({SCHEMA_VERSION}); upgrade ckptd (pip install -U ckptd)"
        )
    return version


def _create_v1(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {
            "id": str, "name": str, "project": str, "status": str, "attempt": int,
            "step": int, "started": float, "ended": float, "updated": float,
            "command": str, "cwd": str, "env": str, "provenance": str, "config": str,
            "seed": int, "pid": int, "pid_started": float, "boot_id": str, "host": str,
            "supervisor_pid": int, "supervisor_started": float,
            "exit_code": int, "signal": int, "traceback": str, "reason": str,
            "auto_resume": int, "max_restarts": int, "restarts": int, "retention": str,
        },
        pk="id",
        not_null={"status", "attempt"},
        defaults={"status": "running", "attempt": 1, "restarts": 0, "auto_resume": 0},
    )
    db["attempts"].create(
        {
            "run_id": str, "attempt": int, "started": float, "ended": float, "pid": int,
            "status": str, "exit_code": int, "signal": int, "restored_step": int,
        },
        pk=("run_id", "attempt"),
    )
    db["events"].create(
        {
            "run_id": str, "attempt": int, "src": str, "seq": int, "time": float,
            "kind": str, "level": str, "step": int, "message": str, "fields": str,
            "superseded": int,
        },
        pk=("run_id", "attempt", "src", "seq"),
        defaults={"superseded": 0},
    )
    db["metrics"].create(
        {
            "run_id": str, "attempt": int, "src": str, "seq": int, "key": str,
            "step": int, "value": float, "time": float, "superseded": int,
        },
        pk=("run_id", "attempt", "src", "seq", "key"),
        defaults={"superseded": 0},
    )
    db["checkpoints"].create(
        {
            "run_id": str, "step": int, "attempt": int, "status": str, "path": str,
            "bytes": int, "hash": str, "metrics": str, "blocked_s": float,
            "persist_s": float, "created": float, "reason": str,
        },
        pk=("run_id", "step"),
    )
    db["events"].create_index(["run_id", "time"])
    db["metrics"].create_index(["run_id", "key", "step"])
    db["metrics"].create_index(["run_id", "step"])
    db["runs"].create_index(["name"])


def _add_groups_and_sweeps(db: sqlite_utils.Database) -> None:
    """Run groups (``init(group=)``, ``ckptd run --group``) and the sweep queue.

    The queue lives here, not in the ``ckptd sweep`` process, so a power cut in
    the middle of a sweep loses nothing: the daemon that starts after it finds
    every item that was not launched yet. Written to be safe on a store that
    already has any part of it (the lead renumbers migrations at merge).
    """
    if "group_name" not in db["runs"].columns_dict:
        db["runs"].add_column("group_name", str)
    db["runs"].create_index(["group_name"], if_not_exists=True)
    db["sweeps"].create(
        {"name": str, "spec": str, "command": str, "cwd": str, "env": str,
         "parallel": int, "created": float},
        pk="name", if_not_exists=True,
    )
    db["sweep_items"].create(
        {"sweep": str, "idx": int, "params": str, "command": str, "gpus": str,
         "run_id": str, "launched": float, "launcher_pid": int, "launcher_started": float},
        pk=("sweep", "idx"), if_not_exists=True,
    )



def _add_tags_and_notes(db: sqlite_utils.Database) -> None:
    """Run management: tags (a table: a run has any number) and a note."""
    db["tags"].create({"run_id": str, "tag": str}, pk=("run_id", "tag"), if_not_exists=True)
    db["tags"].create_index(["tag"], if_not_exists=True)
    if "note" not in db["runs"].columns_dict:
        db["runs"].add_column("note", str)



#: Tables holding a run's rows, removed together by :meth:`Store.remove_run`.
RUN_TABLES = {"runs": "id", "attempts": "run_id", "events": "run_id", "metrics": "run_id",
              "checkpoints": "run_id", "tags": "run_id"}


def _add_effective_views(db: sqlite_utils.Database) -> None:
    """Supersede on read (views over ``attempts``); spool ingestion progress."""
    for table in ("metrics", "events"):
        db.execute(f"CREATE VIEW IF NOT EXISTS effective_{table} AS SELECT * FROM {table}"
                   f" WHERE {effective(table)}")
    db["spool_progress"].create({"name": str, "offset": int, "updated": float}, pk="name",
                                if_not_exists=True)


def _add_ranks(db: sqlite_utils.Database) -> None:
    """Distributed runs: which rank wrote a row, and how many ranks a run has.

    ``rank`` is derived from the writer identity (``src`` ``r<N>``, see
    ``ckptd_client.distributed``), so replays and spools need no new field.
    """
    for table in ("metrics", "events"):
        if "rank" not in db[table].columns_dict:
            db.execute(f"ALTER TABLE {table} ADD COLUMN rank INTEGER NOT NULL DEFAULT 0")
    if "world_size" not in db["runs"].columns_dict:
        db.execute("ALTER TABLE runs ADD COLUMN world_size INTEGER")


def _add_rank_processes(db: sqlite_utils.Database) -> None:
    """Per-rank liveness of distributed runs: which rank's process runs where,
    whether it still lives, and when the daemon last saw it alive.

    Written by the daemon of the rank's node (``liveness.track_ranks``) from
    the ranks' own connections, so ``ckptd ls``/``show`` tell a hung job with a
    dead rank from a healthy one.
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS rank_processes (run_id TEXT NOT NULL, attempt INTEGER"
        " NOT NULL, rank INTEGER NOT NULL, host TEXT, pid INTEGER, pid_started REAL,"
        " first_seen REAL, last_seen REAL, ended REAL,"
        " PRIMARY KEY (run_id, attempt, rank))")



#: The ``metrics`` view (schema 7): the columns ``metrics`` had as a table, over
#: the two tables that hold them. Readers that know the schema seek
#: ``metric_points`` per series instead (see ``ckptd.store.query``).
METRICS_VIEW = (
    "CREATE VIEW metrics AS SELECT s.run_id AS run_id, s.attempt AS attempt, s.src AS src,"
    " p.seq AS seq, s.key AS key, p.step AS step, p.value AS value, p.time AS time,"
    " 0 AS superseded, s.rank AS rank FROM metric_points p JOIN metric_series s"
    " ON s.id = p.sid")


def _intern_metric_keys(db: sqlite_utils.Database) -> None:
    """Metric points at ~45 bytes instead of ~205 (issue 11.4).

    A point was a row repeating its run id, writer id and key (~50 bytes of
    text) under three indexes. Now the text lives once per series
    ``(run_id, key, attempt, src, rank)`` in ``metric_series`` (the daemon
    writes every rank's system metrics under its one ``src``); a point is
    ``(sid, seq, step, value, time)`` in a ``WITHOUT ROWID`` table keyed by
    the idempotency key ``(sid, seq)``, with one index ``(sid, step)`` for
    reads in step order. ``metrics`` stays, as a view with its old columns.
    """
    conn = db.conn
    conn.execute(
        "CREATE TABLE metric_series (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL,"
        " key TEXT NOT NULL, attempt INTEGER NOT NULL, src TEXT NOT NULL,"
        " rank INTEGER NOT NULL DEFAULT 0, UNIQUE (run_id, key, attempt, src, rank))")
    conn.execute(
        "CREATE TABLE metric_points (sid INTEGER NOT NULL, seq INTEGER NOT NULL,"
        " step INTEGER NOT NULL, value REAL, time REAL NOT NULL,"
        " PRIMARY KEY (sid, seq)) WITHOUT ROWID")
    if "metrics" in db.table_names():
        conn.execute(
            "INSERT INTO metric_series (run_id, key, attempt, src, rank) SELECT run_id, key,"
            " attempt, src, rank FROM metrics GROUP BY run_id, key, attempt, src, rank"
            " ORDER BY run_id, key, attempt, src, rank")
        conn.execute(
            "INSERT INTO metric_points (sid, seq, step, value, time) SELECT s.id, m.seq,"
            " m.step, m.value, m.time FROM metrics m JOIN metric_series s ON"
            " s.run_id = m.run_id AND s.key = m.key AND s.attempt = m.attempt AND"
            " s.src = m.src AND s.rank = m.rank ORDER BY s.id, m.seq")
        conn.execute("DROP VIEW IF EXISTS effective_metrics")
        conn.execute("DROP TABLE metrics")
    conn.execute("CREATE INDEX metric_points_step ON metric_points (sid, step)")
    conn.execute(METRICS_VIEW)
    conn.execute("CREATE VIEW IF NOT EXISTS effective_metrics AS SELECT * FROM metrics"
                 f" WHERE {effective('metrics')}")


def _add_nodes(db: sqlite_utils.Database) -> None:
    """Multi-node runs: how many nodes, and which node this store's row is of.

    ``node_rank`` 0 (or NULL): this store owns the run (rank 0's node: run,
    attempts, checkpoint rows). ``node_rank`` > 0: a member row, this node's
    ranks' metrics, events and console; the run itself is in node 0's store.
    """
    for col in ("nodes", "node_rank"):
        if col not in db["runs"].columns_dict:
            db.execute(f"ALTER TABLE runs ADD COLUMN {col} INTEGER")



def _add_metric_backfill(db: sqlite_utils.Database) -> None:
    """Metric points that arrive below their series' newest ``seq`` (a client's
    spool ingested after its live sends), recorded so ``tail -f`` shows them.

    A follower continues each series after the highest ``seq`` it has seen, so
    such points were never shown. One row per late range: ``tail -f`` reads the
    rows after its cursor (``id`` only grows: AUTOINCREMENT, so an ``rm`` of the
    newest rows never hands their ids out again) and fetches those ranges.
    In-order points add nothing. Safe on a store that has it already.
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS metric_backfill (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " sid INTEGER NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL)")


#: Columns of ``events`` besides its id, in their order since schema 5.
EVENT_COLUMNS = ("run_id", "attempt", "src", "seq", "time", "kind", "level", "step", "message",
                 "fields", "superseded", "rank")


def _event_ids(db: sqlite_utils.Database) -> None:
    """Event ids that are never handed out twice: ``id INTEGER PRIMARY KEY
    AUTOINCREMENT`` (an alias of ``rowid``) instead of the plain rowid.

    ``tail -f`` continues after the newest event id it has seen, any run's. A
    plain rowid is ``max(rowid) + 1``: after ``ckptd rm`` of the run holding
    the newest rows, the next events (of the run being followed) took their
    ids again, at or below the follower's cursor, and were never shown.
    SQLite cannot add AUTOINCREMENT to a table, so the rows are copied once
    (ids kept: a follower's cursor stays valid across the upgrade), in the
    one transaction of the migration; ``sqlite_sequence`` starts at the
    highest id copied. The key ``(run_id, attempt, src, seq)`` stays, as a
    UNIQUE constraint (the same index: ``INSERT OR IGNORE`` still dedupes).
    """
    conn = db.conn
    cols = ", ".join(EVENT_COLUMNS)
    # the view names the table: dropped and made again around the rename
    conn.execute("DROP VIEW IF EXISTS effective_events")
    conn.execute(
        "CREATE TABLE events_v10 (run_id TEXT, attempt INTEGER, src TEXT, seq INTEGER,"
        " time REAL, kind TEXT, level TEXT, step INTEGER, message TEXT, fields TEXT,"
        " superseded INTEGER DEFAULT 0, rank INTEGER NOT NULL DEFAULT 0,"
        " id INTEGER PRIMARY KEY AUTOINCREMENT, UNIQUE (run_id, attempt, src, seq))")
    conn.execute(f"INSERT INTO events_v10 ({cols}, id) SELECT {cols}, rowid FROM events"
                 " ORDER BY rowid")
    conn.execute("DROP TABLE events")
    conn.execute("ALTER TABLE events_v10 RENAME TO events")
    conn.execute("CREATE INDEX idx_events_run_id_time ON events (run_id, time)")
    conn.execute("CREATE VIEW effective_events AS SELECT * FROM events"
                 f" WHERE {effective('events')}")


MIGRATIONS = {1: _create_v1, 2: _add_groups_and_sweeps, 3: _add_tags_and_notes,
              4: _add_effective_views, 5: _add_ranks, 6: _add_rank_processes,
              7: _intern_metric_keys, 8: _add_nodes, 9: _add_metric_backfill,
              10: _event_ids}


def _dumps(value: Any) -> str | None:
    return None if value is None else protocol.dumps(value)


class Store:
    """Owner of the write connection. Used by the daemon's writer thread only."""

    def __init__(self, path: Path) -> None:
        check_version(path)
        self.path = path
        private_files(path)
        try:
            self.conn = _connect(path)
            # imported here, not at the top: read-only commands (`ckptd ls`,
            # `resume`) need check_version() only and start 0.3 s sooner
            import sqlite_utils

            self.db = sqlite_utils.Database(self.conn)
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"open {path}: cannot switch to WAL (journal_mode={mode})")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._wal = path.with_name(path.name + "-wal")
            #: metric series ids by (run_id, key, attempt, src, rank): see :meth:`_sid`
            self._sids: dict[tuple[str, str, int, str, int], int] = {}
            self._migrate()
        except sqlite3.Error as exc:
            if _damaged(exc):
                raise not_a_store(path, exc) from None
            raise StoreError(f"open {path}: {exc}") from None

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"open {self.path}: schema version {version} > {SCHEMA_VERSION}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.db.atomic():
                MIGRATIONS[target](self.db)
                self.conn.execute(f"PRAGMA user_version={target}")

    def bound_wal(self) -> bool:
        """Truncate the WAL if it grew past :data:`WAL_LIMIT`; True if it did.

        Waits at most 100 ms for readers (``tail -f``) to move to the newest
        snapshot, so the writer is never held up; it tries again later.
        """
        try:
            if os.stat(self._wal).st_size <= WAL_LIMIT:
                return False
        except OSError:
            return False
        self.conn.execute("PRAGMA busy_timeout=100")
        try:
            busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error:
            busy = 1
        finally:
            self.conn.execute("PRAGMA busy_timeout=30000")
        return not busy

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass
        self.conn.close()

    # -------------------------------------------------------------- events

    def apply(self, events: Iterable[tuple[str, int, str, dict[str, Any]]]) -> None:
        """Apply events ``(run_id, attempt, src, msg)``; the caller commits.

        Call inside :meth:`transaction`. Unknown or malformed fields were
        already rejected by the daemon's validation.
        """
        conn = self.conn
        metrics: list[tuple[Any, ...]] = []
        conflicts: dict[tuple[str, int, str], int] = {}
        firsts: list[int] = []  # index in metrics of each log event's first row
        steps: dict[str, int] = {}
        for run_id, attempt, src, msg in events:
            kind = msg["t"]
            seq = msg["seq"]
            t = msg.get("time") or time.time()
            rank = rank_of_src(src)
            if src in ("d", "s") and isinstance(msg.get("rank"), int):
                # the daemon's per-rank samples, a rank's line the supervisor captured
                rank = msg["rank"]
            if kind == protocol.LOG:
                step = msg["step"]
                if msg["m"]:
                    firsts.append(len(metrics))
                for key, value in msg["m"].items():
                    if isinstance(value, float) and math.isnan(value):
                        value = None  # SQLite stores NaN as NULL; documented in schema.md
                    metrics.append((run_id, attempt, src, seq, key, step, value, t, rank))
                if rank == 0 and step > steps.get(run_id, -1):
                    steps[run_id] = step
                continue
            fields = msg.get("fields")
            if kind == protocol.REGISTER:
                message, level = "run registered", "info"
            elif kind == protocol.STATUS:
                ended = self._status_attempt(run_id, attempt, msg)
                message, level = f"attempt {ended} {msg.get('status')}", "info"
                if msg.get("reason"):
                    message += f": {msg['reason']}"
            elif kind == protocol.CONSOLE:
                message, level = msg.get("text", ""), msg.get("stream", "stdout")
            elif kind == protocol.RESTORED:
                restored = msg.get("step")
                # a first attempt that restores (a rollback) never resumed anything
                verb = "resumed after" if attempt > 1 else "restored"
                message, level = (
                    f"attempt {attempt} {verb} checkpoint step {restored}"
                    if restored is not None and restored >= 0
                    else f"attempt {attempt} started over: no checkpoint to restore"), "info"
            else:
                message, level = msg.get("msg", ""), msg.get("level", "info")
            row = (t, kind, level, msg.get("step"), message, _dumps(fields))
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (run_id, attempt, src, seq, time, kind, level,"
                " step, message, fields, rank) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, attempt, src, seq, *row, rank),
            )
            if cur.rowcount != 1:
                # a replay (its side effects were applied the first time), unless
                # the stored row differs: two writers sharing one key
                old = conn.execute(
                    "SELECT time, kind, level, step, message, fields FROM events WHERE"
                    " run_id = ? AND attempt = ? AND src = ? AND seq = ?",
                    (run_id, attempt, src, seq)).fetchone()
                if old is not None and tuple(old) != row:
                    conflicts[(run_id, attempt, src)] = conflicts.get((run_id, attempt, src), 0) + 1
                continue
            if kind == protocol.REGISTER:
                self._register(run_id, attempt, msg, t)
            elif kind == protocol.STATUS:
                self._status(run_id, self._status_attempt(run_id, attempt, msg), msg, t)
            elif kind == protocol.RESTORED:
                self._restored(run_id, attempt, msg.get("step"))
        if metrics:
            points = [(self._sid(r[0], r[4], r[1], r[2], r[8]), r[3], r[5], r[6], r[7])
                      for r in metrics]
            # the same transaction as the points: a crash commits both or neither
            self._record_backfill(points)
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO metric_points (sid, seq, step, value, time)"
                " VALUES (?,?,?,?,?)", points)
            if conn.total_changes - before < len(metrics):
                self._metric_conflicts([metrics[i] for i in firsts], conflicts)
        for (run_id, attempt, src), n in conflicts.items():
            text = (f"{n} events of writer {src} reused a sequence number with different "
                    "content; the first copy was kept, the others dropped (two processes "
                    "sharing one writer identity?)")
            log.error("run %s attempt %d: %s", run_id, attempt, text)
            self.record_event(run_id, attempt, text, level="error")
        for run_id, step in steps.items():
            conn.execute(
                "UPDATE runs SET step = ?, updated = ? WHERE id = ? AND"
                " (step IS NULL OR step < ?)",
                (step, time.time(), run_id, step),
            )

    def _sid(self, run_id: str, key: str, attempt: int, src: str, rank: int) -> int:
        """The id of a metric series, interned on first use (in this transaction)."""
        ident = (run_id, key, attempt, src, rank)
        sid = self._sids.get(ident)
        if sid is None:
            self.conn.execute("INSERT OR IGNORE INTO metric_series (run_id, key, attempt, src,"
                              " rank) VALUES (?,?,?,?,?)", ident)
            sid = self.conn.execute(
                "SELECT id FROM metric_series WHERE run_id = ? AND key = ? AND attempt = ?"
                " AND src = ? AND rank = ?", ident).fetchone()[0]
            if len(self._sids) > 100_000:
                self._sids.clear()
            self._sids[ident] = sid
        return sid

    def _record_backfill(self, points: list[tuple[Any, ...]]) -> None:
        """Record the ranges of ``points`` (``(sid, seq, ...)``, before they are
        inserted) that are new and below their series' highest stored ``seq``:
        ``tail -f`` has moved past those seqs and finds them only here.

        One index seek per series of the batch; a late batch (a spool ingested
        after live sends) one more per stored point met among its seqs, never a
        scan of what lies between them (a spool filled while the socket was
        full now and then spans a week of live points). A range holds no point
        stored before it, so a follower fetching it shows only what this batch
        added (a replayed point is left out: it was shown when it was stored).
        """
        by_sid: dict[int, set[int]] = {}
        for p in points:
            by_sid.setdefault(p[0], set()).add(p[1])
        ranges: list[tuple[int, int, int]] = []
        for sid, seqs in by_sid.items():
            top = self.conn.execute("SELECT MAX(seq) FROM metric_points WHERE sid = ?",
                                    (sid,)).fetchone()[0]
            if top is None or min(seqs) > top:
                continue  # in order: a follower reads these after its cursor
            lo = prev = stored = None  # stored: the lowest stored seq >= the one at hand
            for seq in sorted(s for s in seqs if s < top):
                if lo is not None and stored is not None and stored < seq:
                    ranges.append((sid, lo, prev))  # a stored point lies in between
                    lo = None
                if stored is None or stored < seq:
                    stored = self.conn.execute(
                        "SELECT MIN(seq) FROM metric_points WHERE sid = ? AND seq >= ?",
                        (sid, seq)).fetchone()[0]
                if stored == seq:
                    continue  # a replay: stored (and shown) before
                lo = seq if lo is None else lo
                prev = seq
            if lo is not None:
                ranges.append((sid, lo, prev))
        if ranges:
            self.conn.executemany("INSERT INTO metric_backfill (sid, lo, hi) VALUES (?,?,?)",
                                  ranges)

    def _metric_conflicts(self, metrics: list[tuple[Any, ...]],
                          conflicts: dict[tuple[str, int, str], int]) -> None:
        """Count the log events whose stored copy differs (not a replay), by the
        first row of each (another writer's event differs in its time at least).
        Runs only when some row was ignored: replays after a reconnect."""
        for run_id, attempt, src, seq, key, step, value, t, rank in metrics:
            old = self.conn.execute(
                "SELECT step, value, time FROM metrics WHERE run_id = ? AND attempt = ?"
                " AND src = ? AND seq = ? AND key = ? AND rank = ?",
                (run_id, attempt, src, seq, key, rank)).fetchone()
            if old is not None and tuple(old) != (step, value, t):
                conflicts[(run_id, attempt, src)] = conflicts.get((run_id, attempt, src), 0) + 1

    # ------------------------------------------------------------ attempts

    def _restored(self, run_id: str, attempt: int, step: int | None) -> None:
        """Attempt ``attempt`` continues after checkpoint ``step`` (None/-1: from scratch).

        What earlier attempts logged after that step is a timeline this
        attempt replaces: recording the step here is all it takes to hide it
        (see :func:`effective`); the rows are kept, and a late spool of an
        older attempt is hidden the same way, whatever the order.
        """
        step = -1 if step is None else step
        self.conn.execute(
            "INSERT INTO attempts (run_id, attempt, restored_step, status) VALUES (?,?,?,?)"
            " ON CONFLICT(run_id, attempt) DO UPDATE SET restored_step = excluded.restored_step",
            (run_id, attempt, step, "running"),
        )
        self.conn.execute("UPDATE runs SET step = ? WHERE id = ? AND attempt = ?",
                          (step if step >= 0 else None, run_id, attempt))

    def begin_attempt(self, run_id: str, *, force: bool, auto: bool,
                      after_attempt: int | None, supervisor_pid: int,
                      supervisor_started: float | None, boot_id: str,
                      host: str) -> dict[str, Any]:
        """Start the next attempt of ``run_id`` (``ckptd resume``, auto-resume).

        Atomic in the writer's transaction, so two resumers (a person and the
        daemon's auto-resume) can never both start one.

        :raises ResumeRefused: the run is running or finished (unless ``force``),
            or ``after_attempt`` is no longer the current attempt.
        """
        cur = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,))
        cols = [d[0] for d in cur.description]
        found = cur.fetchone()
        if found is None:
            raise NotFound(f"resume: no run {run_id!r}")
        run = dict(zip(cols, found, strict=True))
        if after_attempt is not None and run["attempt"] != after_attempt:
            raise ResumeRefused(f"resume {run_id}: attempt {run['attempt']} already "
                                f"replaced attempt {after_attempt}")
        if auto and (not run["auto_resume"]
                     or run["status"] not in ("interrupted", "failed", "queued", "preempted")):
            raise ResumeRefused(f"resume {run_id}: auto-resume no longer applies "
                                f"(status {run['status']})")
        if not force and run["status"] == "running":
            raise ResumeRefused(
                f"resume {run_id}: the run is running (attempt {run['attempt']}, pid "
                f"{run['pid'] or run['supervisor_pid']}); stop it first, or pass --force "
                "if you are sure its process is gone")
        if not force and run["status"] == "finished":
            raise ResumeRefused(
                f"resume {run_id}: the run finished (exit code {run['exit_code']}); "
                "there is nothing to resume. Pass --force to run it again from its newest "
                "checkpoint")
        if not run["command"]:
            raise ResumeRefused(f"resume {run_id}: no command was recorded for this run, "
                                "so it cannot be relaunched")
        attempt = run["attempt"] + 1
        now = time.time()
        fields: dict[str, Any] = {
            "attempt": attempt, "status": "running", "pid": None, "pid_started": None,
            "supervisor_pid": supervisor_pid, "supervisor_started": supervisor_started,
            "boot_id": boot_id, "host": host, "ended": None, "exit_code": None,
            "signal": None, "traceback": None, "reason": None, "updated": now,
        }
        if auto:
            fields["restarts"] = (run["restarts"] or 0) + 1
        elif run["max_restarts"] is not None:
            # a person resumed it: auto-resume (paused by a stop or a give-up) is back on
            fields.update(auto_resume=1, restarts=0)
        self.db["runs"].update(run_id, fields)
        self.conn.execute(
            "INSERT INTO attempts (run_id, attempt, started, status) VALUES (?,?,?,?)"
            " ON CONFLICT(run_id, attempt) DO UPDATE SET started = excluded.started",
            (run_id, attempt, now, "running"),
        )
        return {"id": run_id, "name": run["name"], "attempt": attempt,
                "command": json.loads(run["command"]), "cwd": run["cwd"],
                "env": json.loads(run["env"]) if run["env"] else {}}

    def auto_resume_candidates(self) -> list[dict[str, Any]]:
        """Runs with auto-resume on whose last attempt ended badly (or that wait
        for a resume slot: ``queued``)."""
        cur = self.conn.execute(
            "SELECT id, attempt, status, ended, restarts, max_restarts, reason FROM runs"
            " WHERE auto_resume = 1 AND status IN ('interrupted', 'failed', 'queued', 'preempted')")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def settling_resumes(self, now: float, settle: float) -> list[str]:
        """Auto-resumed runs still starting up: their attempt began less than
        ``settle`` s ago (or has no process yet) and has logged no step past
        the one it restored. Each holds a resume slot."""
        rows = self.conn.execute(
            "SELECT r.id FROM runs r JOIN attempts a ON a.run_id = r.id AND"
            " a.attempt = r.attempt WHERE r.status = 'running' AND r.restarts > 0"
            " AND a.started > ? AND (r.pid IS NULL OR a.started > ?)"
            " AND NOT (a.restored_step IS NOT NULL AND r.step IS NOT NULL"
            " AND r.step > a.restored_step)",
            (now - 10 * max(settle, 60.0), now - settle)).fetchall()
        return [r[0] for r in rows]

    def attempt_peaks(self, run_id: str, last: int) -> list[tuple[int, int | None]]:
        """``(attempt, highest step it logged)`` for the newest ``last`` attempts,
        oldest first (only those are judged; older ones would cost a scan each)."""
        rows = self.conn.execute(
            "SELECT a.attempt, (SELECT MAX((SELECT MAX(step) FROM metric_points p WHERE"
            " p.sid = s.id)) FROM metric_series s WHERE s.run_id = a.run_id AND"
            " s.attempt = a.attempt AND s.src GLOB 'c*') FROM attempts a WHERE a.run_id = ?"
            " ORDER BY a.attempt DESC LIMIT ?", (run_id, last)).fetchall()
        return [tuple(r) for r in reversed(rows)]  # type: ignore[misc]

    def record_event(self, run_id: str, attempt: int, message: str, level: str = "info",
                     **fields: Any) -> None:
        """An event the daemon itself says about a run (src ``d``)."""
        seq = time.time_ns() // 1000
        self.conn.execute(
            "INSERT OR IGNORE INTO events (run_id, attempt, src, seq, time, kind, level,"
            " message, fields) VALUES (?,?,?,?,?,?,?,?,?)",
            (run_id, attempt, "d", seq, time.time(), protocol.EVENT, level, message,
             _dumps(fields or None)),
        )

    def ensure_run(self, run_id: str, attempt: int) -> None:
        """Make sure a run row exists for events that arrive before (or without)
        their registration, e.g. a spool whose first lines were torn."""
        now = time.time()
        self.conn.execute(
            "INSERT OR IGNORE INTO runs (id, name, status, attempt, started, updated)"
            " VALUES (?,?,?,?,?,?)",
            (run_id, run_id, "running", attempt, now, now),
        )

    def _register(self, run_id: str, attempt: int, msg: dict[str, Any], t: float) -> None:
        row = self.conn.execute("SELECT attempt, name, group_name FROM runs WHERE id = ?",
                                (run_id,)).fetchone()
        fields: dict[str, Any] = {
            "boot_id": msg.get("boot_id"), "host": msg.get("host"), "updated": t,
        }
        if msg.get("pid") is not None:
            # a supervisor registers before its child exists: never erase the child's pid
            fields.update(pid=msg["pid"], pid_started=msg.get("pid_started"))
        for key in ("project", "seed", "supervisor_pid", "supervisor_started", "auto_resume",
                    "max_restarts", "world_size", "nodes", "node_rank"):
            if msg.get(key) is not None:
                fields[key] = msg[key]
        if msg.get("name") and (not msg.get("joined") or row is None or row[1] == run_id):
            fields["name"] = msg["name"]  # `ckptd run --name` wins over init(name=)
        if msg.get("group") and (not msg.get("joined") or row is None or not row[2]):
            fields["group_name"] = msg["group"]  # `ckptd run --group` wins over init(group=)
        if msg.get("config"):
            fields["config"] = _dumps(msg["config"])
        if msg.get("retention") is not None:
            fields["retention"] = _dumps(msg["retention"])
        if not msg.get("joined"):
            fields.update(command=_dumps(msg.get("command")), cwd=msg.get("cwd"),
                          env=_dumps(msg.get("env")), provenance=_dumps(msg.get("provenance")))
        if row is None:
            fields.update(id=run_id, status="running", attempt=attempt, started=t)
            fields.setdefault("name", run_id)
            self.db["runs"].insert(fields)
        elif attempt >= row[0]:
            fields.update(status="running", attempt=attempt, ended=None, exit_code=None,
                          signal=None, traceback=None, reason=None)
            self.db["runs"].update(run_id, fields)
            if attempt > row[0]:
                # a TorchElastic restart begins the next attempt itself: the one it
                # replaced (its workers were killed) never reported an end
                self.conn.execute(
                    "UPDATE attempts SET status = 'interrupted', ended = ? WHERE run_id = ?"
                    " AND attempt < ? AND status = 'running'", (t, run_id, attempt))
        self.conn.execute(
            "INSERT INTO attempts (run_id, attempt, started, pid, status) VALUES (?,?,?,?,?)"
            " ON CONFLICT(run_id, attempt) DO UPDATE SET pid = COALESCE(excluded.pid, pid)",
            (run_id, attempt, t, msg.get("pid"), "running"),
        )

    def _status_attempt(self, run_id: str, attempt: int, msg: dict[str, Any]) -> int:
        """The attempt a status ends: its own, except for a supervisor's report.

        ``ckptd run -- torchrun --max-restarts N`` supervises attempt A, but each
        TorchElastic restart inside the command begins the next attempt itself
        (the ranks register A + ``TORCHELASTIC_RESTART_COUNT``). How torchrun
        exited is then the end of the run's current attempt: applied to A, it
        overwrote A's own end and left the current one ``running`` until
        liveness guessed ``interrupted``. Only while the run is still this
        supervisor's (same pid and start time; ``ckptd resume`` records its own),
        so a late report from a superseded supervisor never ends a newer attempt.
        """
        pid = msg.get("supervisor_pid")
        if pid is None:
            return attempt
        row = self.conn.execute("SELECT attempt, supervisor_pid, supervisor_started FROM runs"
                                " WHERE id = ?", (run_id,)).fetchone()
        if row is None or row[0] <= attempt or row[1] != pid:
            return attempt
        started = msg.get("supervisor_started")
        if started is not None and row[2] is not None and abs(row[2] - started) > 0.05:
            return attempt  # a recycled pid: another supervisor
        return int(row[0])

    def _status(self, run_id: str, attempt: int, msg: dict[str, Any], t: float) -> None:
        status = msg.get("status")
        if status == "finished":
            # The trainer said ``preempted`` (it exited cleanly after a
            # preemption notice); the supervisor's "exit 0" must not undo that.
            row = self.conn.execute("SELECT status FROM attempts WHERE run_id = ? AND"
                                    " attempt = ?", (run_id, attempt)).fetchone()
            if row and row[0] == "preempted":
                status = "preempted"
        self.conn.execute(
            "UPDATE attempts SET status = ?, ended = ?, exit_code = ?,"
            " signal = COALESCE(?, signal) WHERE run_id = ? AND attempt = ?",
            (status, t, msg.get("exit_code"), msg.get("signal"), run_id, attempt),
        )
        # Only the newest attempt decides the run's state: a late spool from an
        # older attempt must not overwrite the state of the one running now.
        # The supervisor reports after the training process: it adds the
        # signal and keeps the traceback the process sent.
        self.conn.execute(
            "UPDATE runs SET status = ?, ended = ?, exit_code = ?,"
            " traceback = COALESCE(?, traceback), signal = COALESCE(?, signal),"
            " reason = COALESCE(?, reason), auto_resume = COALESCE(?, auto_resume),"
            " updated = ? WHERE id = ? AND attempt = ?",
            (status, t, msg.get("exit_code"), msg.get("traceback"), msg.get("signal"),
             msg.get("reason"), msg.get("auto_resume"), t, run_id, attempt),
        )

    def mark_run(self, run_id: str, attempt: int | None = None, **fields: Any) -> None:
        """Update a run's columns (liveness verdicts, supervisor facts)."""
        fields["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE runs SET {sets} WHERE id = ?"
        args: list[Any] = [*fields.values(), run_id]
        if attempt is not None:
            sql += " AND attempt = ?"
            args.append(attempt)
        self.conn.execute(sql, args)
        if "status" in fields and attempt is not None:
            self.conn.execute(
                "UPDATE attempts SET status = ?, ended = COALESCE(ended, ?) WHERE run_id = ?"
                " AND attempt = ? AND status = 'running'",
                (fields["status"], fields.get("ended"), run_id, attempt),
            )

    # --------------------------------------------------------- checkpoints

    def put_checkpoint(self, row: dict[str, Any]) -> None:
        """Record a checkpoint (a re-committed step replaces its earlier row)."""
        row = dict(row, metrics=_dumps(row.get("metrics") or {}))
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.conn.execute(f"INSERT OR REPLACE INTO checkpoints ({cols}) VALUES ({marks})",
                          list(row.values()))

    def mark_checkpoint(self, run_id: str, step: int, status: str, reason: str | None) -> None:
        self.conn.execute("UPDATE checkpoints SET status = ?, reason = ? WHERE run_id = ?"
                          " AND step = ?", (status, reason, run_id, step))

    def delete_checkpoint(self, run_id: str, step: int) -> None:
        self.conn.execute("DELETE FROM checkpoints WHERE run_id = ? AND step = ?",
                          (run_id, step))

    def checkpoint_rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Checkpoint rows (of one run, or all), oldest step first; metrics decoded."""
        sql, args = "SELECT * FROM checkpoints", ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        cur = self.conn.execute(sql + " ORDER BY run_id, step", args)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        for r in rows:
            r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
        return rows

    def run_retention(self, run_id: str) -> Any:
        """The retention policy a run registered (decoded), or None."""
        row = self.conn.execute("SELECT retention FROM runs WHERE id = ?", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def rank_processes(self, open_only: bool = False) -> list[dict[str, Any]]:
        """Rank process rows (``open_only``: those not yet seen to end)."""
        sql = "SELECT * FROM rank_processes" + (" WHERE ended IS NULL" if open_only else "")
        cur = self.conn.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def see_rank(self, run_id: str, attempt: int, rank: int, host: str, pid: int,
                 pid_started: float | None, now: float) -> None:
        """A rank's process is alive now (its connection is open)."""
        self.conn.execute(
            "INSERT INTO rank_processes (run_id, attempt, rank, host, pid, pid_started,"
            " first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(run_id, attempt,"
            " rank) DO UPDATE SET last_seen = excluded.last_seen, ended = NULL,"
            " host = excluded.host, pid = excluded.pid, pid_started = excluded.pid_started",
            (run_id, attempt, rank, host, pid, pid_started, now, now))

    def mark_rank(self, run_id: str, attempt: int, rank: int, *, last_seen: float | None = None,
                  ended: float | None = None) -> None:
        self.conn.execute(
            "UPDATE rank_processes SET last_seen = COALESCE(?, last_seen), ended = ? WHERE"
            " run_id = ? AND attempt = ? AND rank = ?", (last_seen, ended, run_id, attempt, rank))

    def running_runs(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM runs WHERE status = 'running'")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # ------------------------------------------------------------- sweeps

    def create_sweep(self, row: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        """Record a sweep and its queue in one transaction; False when a sweep of
        that name with the same spec exists already (asking again resumes it).

        :raises CkptdError: a sweep of that name exists with another spec.
        """
        found = self.conn.execute("SELECT spec, command FROM sweeps WHERE name = ?",
                                  (row["name"],)).fetchone()
        spec, command = _dumps(row["spec"]), _dumps(row["command"])
        if found is not None:
            if found[0] == spec and found[1] == command:
                return False
            raise CkptdError(f"sweep {row['name']!r} exists with other seeds, grid or command; "
                             "pick another --name (`ckptd sweep status NAME` shows it)")
        self.db["sweeps"].insert(dict(row, spec=spec, command=command, env=_dumps(row["env"])))
        self.db["sweep_items"].insert_all(
            {"sweep": row["name"], "idx": i, "params": _dumps(it["params"]),
             "command": _dumps(it["command"])} for i, it in enumerate(items))
        return True

    def sweeps(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM sweeps ORDER BY created")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def sweep_items(self, sweep: str) -> list[dict[str, Any]]:
        """A sweep's items with the state of their runs (NULL before the run registered)."""
        cur = self.conn.execute(
            "SELECT i.*, r.status AS run_status, r.auto_resume AS run_auto_resume"
            " FROM sweep_items i LEFT JOIN runs r ON r.id = i.run_id"
            " WHERE i.sweep = ? ORDER BY i.idx", (sweep,))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def update_sweep_item(self, sweep: str, idx: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE sweep_items SET {sets} WHERE sweep = ? AND idx = ?",
                          [*fields.values(), sweep, idx])

    # ------------------------------------------------------- run management

    def _run_row(self, op: str, run_id: str) -> dict[str, Any]:
        cur = self.conn.execute("SELECT id, name, status, pid FROM runs WHERE id = ?",
                                (run_id,))
        row = cur.fetchone()
        if row is None:
            raise NotFound(f"{op}: no run {run_id!r}; `ckptd ls` lists the runs")
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def rename_run(self, run_id: str, name: str) -> None:
        self._run_row("rename", run_id)
        self.conn.execute("UPDATE runs SET name = ?, updated = ? WHERE id = ?",
                          (name, time.time(), run_id))

    def note_run(self, run_id: str, text: str | None) -> None:
        self._run_row("note", run_id)
        self.conn.execute("UPDATE runs SET note = ?, updated = ? WHERE id = ?",
                          (text, time.time(), run_id))

    def tag_run(self, run_id: str, tags: list[str], untag: bool) -> list[str]:
        """Add (or remove) tags; returns the run's tags afterwards."""
        self._run_row("tag", run_id)
        if untag:
            self.conn.executemany("DELETE FROM tags WHERE run_id = ? AND tag = ?",
                                  [(run_id, t) for t in tags])
        else:
            self.conn.executemany("INSERT OR IGNORE INTO tags (run_id, tag) VALUES (?,?)",
                                  [(run_id, t) for t in tags])
        self.conn.execute("UPDATE runs SET updated = ? WHERE id = ?", (time.time(), run_id))
        return [r[0] for r in self.conn.execute(
            "SELECT tag FROM tags WHERE run_id = ? ORDER BY tag", (run_id,))]

    def removable(self, run_id: str) -> dict[str, Any]:
        """The run's row, unless it is running (its process would write on).

        :raises CkptdError: the run is running.
        """
        run = self._run_row("rm", run_id)
        if run["status"] == "running":
            raise CkptdError(f"rm {run_id}: the run is running (pid {run['pid']}); stop "
                             "it first (Ctrl-C its `ckptd run`, or kill its process)")
        return run

    def remove_run(self, run_id: str) -> dict[str, Any]:
        """Delete every row of a run (not its files: the caller removes those).

        :raises CkptdError: the run is running.
        """
        run = self.removable(run_id)
        counts = {}
        for table, column in RUN_TABLES.items():
            if table == "metrics":  # a view: its rows are the run's series' points
                counts[table] = self.conn.execute(
                    "DELETE FROM metric_points WHERE sid IN (SELECT id FROM metric_series"
                    " WHERE run_id = ?)", (run_id,)).rowcount
                self.conn.execute("DELETE FROM metric_backfill WHERE sid IN (SELECT id FROM"
                                  " metric_series WHERE run_id = ?)", (run_id,))
                self.conn.execute("DELETE FROM metric_series WHERE run_id = ?", (run_id,))
                self._sids.clear()
                continue
            counts[table] = self.conn.execute(f"DELETE FROM {table} WHERE {column} = ?",
                                              (run_id,)).rowcount
        return {"id": run_id, "name": run["name"], "rows": counts}
    # --------------------------------------------------------------- spool

    def spool_offsets(self) -> dict[str, int]:
        """Bytes of each spool file already committed (a restart resumes there)."""
        return dict(self.conn.execute("SELECT name, offset FROM spool_progress"))

    def set_spool_offset(self, name: str, offset: int) -> None:
        self.conn.execute(
            "INSERT INTO spool_progress (name, offset, updated) VALUES (?,?,?)"
            " ON CONFLICT(name) DO UPDATE SET offset = excluded.offset,"
            " updated = excluded.updated", (name, offset, time.time()))

    def forget_spools(self, names: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM spool_progress WHERE name = ?",
                              [(n,) for n in names])

    @contextlib.contextmanager
    def transaction(self) -> Any:
        """One transaction; a rolled-back one forgets the series ids it interned
        (they were rolled back with it)."""
        try:
            with self.db.atomic():
                yield
        except BaseException:
            self._sids.clear()
            raise
