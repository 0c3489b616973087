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
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client import protocol
from ckptd_client.distributed import rank_of_src
from ckptd_client.errors import CkptdError, NotFound, ResumeRefused

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 2


class SchemaTooNew(CkptdError):
    """The store was written by a newer ckptd; we refuse rather than corrupt it."""


class StoreError(CkptdError):
    """The store cannot be opened or written (disk full, permissions, corruption)."""


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
        raise StoreError(f"open {path}: not a readable ckptd store ({exc})") from None
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


def _v2_ranks(db: sqlite_utils.Database) -> None:
    """Distributed runs: which rank wrote a row, and how many ranks a run has.

    ``rank`` is derived from the writer identity (``src`` ``r<N>``, see
    ``ckptd_client.distributed``), so replays and spools need no new field.
    """
    db.execute("ALTER TABLE metrics ADD COLUMN rank INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE events ADD COLUMN rank INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE runs ADD COLUMN world_size INTEGER")


MIGRATIONS = {1: _create_v1, 2: _v2_ranks}


def _dumps(value: Any) -> str | None:
    return None if value is None else protocol.dumps(value)


class Store:
    """Owner of the write connection. Used by the daemon's writer thread only."""

    def __init__(self, path: Path) -> None:
        check_version(path)
        self.path = path
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
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"open {path}: {exc}") from None

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"open {self.path}: schema version {version} > {SCHEMA_VERSION}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.db.atomic():
                MIGRATIONS[target](self.db)
                self.conn.execute(f"PRAGMA user_version={target}")

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
        steps: dict[str, int] = {}
        touched: set[tuple[str, int]] = set()
        for run_id, attempt, src, msg in events:
            touched.add((run_id, attempt))
            kind = msg["t"]
            seq = msg["seq"]
            t = msg.get("time") or time.time()
            rank = rank_of_src(src)
            if kind == protocol.LOG:
                step = msg["step"]
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
                message, level = f"attempt {attempt} {msg.get('status')}", "info"
                if msg.get("reason"):
                    message += f": {msg['reason']}"
            elif kind == protocol.CONSOLE:
                message, level = msg.get("text", ""), msg.get("stream", "stdout")
            elif kind == protocol.RESTORED:
                restored = msg.get("step")
                message, level = (
                    f"attempt {attempt} resumed after checkpoint step {restored}"
                    if restored is not None and restored >= 0
                    else f"attempt {attempt} started over: no checkpoint to restore"), "info"
            else:
                message, level = msg.get("msg", ""), msg.get("level", "info")
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (run_id, attempt, src, seq, time, kind, level,"
                " step, message, fields, rank) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, attempt, src, seq, t, kind, level, msg.get("step"), message,
                 _dumps(fields), rank),
            )
            if cur.rowcount != 1:
                continue  # a replay: its side effects were applied the first time
            if kind == protocol.REGISTER:
                self._register(run_id, attempt, msg, t)
            elif kind == protocol.STATUS:
                self._status(run_id, attempt, msg, t)
            elif kind == protocol.RESTORED:
                self._restored(run_id, attempt, msg.get("step"))
        if metrics:
            conn.executemany(
                "INSERT OR IGNORE INTO metrics (run_id, attempt, src, seq, key, step, value,"
                " time, rank) VALUES (?,?,?,?,?,?,?,?,?)",
                metrics,
            )
        for run_id, step in steps.items():
            conn.execute(
                "UPDATE runs SET step = ?, updated = ? WHERE id = ? AND"
                " (step IS NULL OR step < ?)",
                (step, time.time(), run_id, step),
            )
        for run_id, attempt in touched:
            self._supersede_late(run_id, attempt)

    # ------------------------------------------------------------ attempts

    def _restored(self, run_id: str, attempt: int, step: int | None) -> None:
        """Attempt ``attempt`` continues after checkpoint ``step`` (None/-1: from scratch).

        What earlier attempts logged after that step is a timeline this
        attempt replaces: it is marked superseded (kept, hidden by default).
        """
        step = -1 if step is None else step
        self.conn.execute(
            "INSERT INTO attempts (run_id, attempt, restored_step, status) VALUES (?,?,?,?)"
            " ON CONFLICT(run_id, attempt) DO UPDATE SET restored_step = excluded.restored_step",
            (run_id, attempt, step, "running"),
        )
        self._supersede(run_id, "attempt < ?", attempt, step)
        self.conn.execute("UPDATE runs SET step = ? WHERE id = ? AND attempt = ?",
                          (step if step >= 0 else None, run_id, attempt))

    def _supersede(self, run_id: str, which: str, attempt: int, step: int) -> None:
        self.conn.execute(
            f"UPDATE metrics SET superseded = 1 WHERE run_id = ? AND {which} AND src != 'd'"
            " AND step > ? AND superseded = 0", (run_id, attempt, step))
        self.conn.execute(
            f"UPDATE events SET superseded = 1 WHERE run_id = ? AND {which}"
            " AND step > ? AND superseded = 0", (run_id, attempt, step))

    def _supersede_late(self, run_id: str, attempt: int) -> None:
        """Rows of an older attempt that arrive after a newer attempt restored
        (a spool ingested late) are superseded the same way: order-independent."""
        row = self.conn.execute(
            "SELECT MIN(restored_step) FROM attempts WHERE run_id = ? AND attempt > ?"
            " AND restored_step IS NOT NULL", (run_id, attempt)).fetchone()
        if row and row[0] is not None:
            self._supersede(run_id, "attempt = ?", attempt, row[0])

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
                     or run["status"] not in ("interrupted", "failed", "preempted")):
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
        """Runs with auto-resume on whose last attempt ended badly."""
        cur = self.conn.execute(
            "SELECT id, attempt, status, ended, restarts, max_restarts, reason FROM runs"
            " WHERE auto_resume = 1 AND status IN ('interrupted', 'failed', 'preempted')")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def attempt_peaks(self, run_id: str, last: int) -> list[tuple[int, int | None]]:
        """``(attempt, highest step it logged)`` for the newest ``last`` attempts,
        oldest first (only those are judged; older ones would cost a scan each)."""
        rows = self.conn.execute(
            "SELECT a.attempt, (SELECT MAX(step) FROM metrics m WHERE m.run_id = a.run_id"
            " AND m.attempt = a.attempt AND m.src = 'c') FROM attempts a WHERE a.run_id = ?"
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
        row = self.conn.execute("SELECT attempt, name FROM runs WHERE id = ?",
                                (run_id,)).fetchone()
        fields: dict[str, Any] = {
            "boot_id": msg.get("boot_id"), "host": msg.get("host"), "updated": t,
        }
        if msg.get("pid") is not None:
            # a supervisor registers before its child exists: never erase the child's pid
            fields.update(pid=msg["pid"], pid_started=msg.get("pid_started"))
        for key in ("project", "seed", "supervisor_pid", "supervisor_started", "auto_resume",
                    "max_restarts", "world_size"):
            if msg.get(key) is not None:
                fields[key] = msg[key]
        if msg.get("name") and (not msg.get("joined") or row is None or row[1] == run_id):
            fields["name"] = msg["name"]  # `ckptd run --name` wins over init(name=)
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

    def running_runs(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM runs WHERE status = 'running'")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def transaction(self) -> Any:
        return self.db.atomic()
