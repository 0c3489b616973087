"""Read-only queries over the store: what ``ls``, ``show``, ``tail`` and ``metrics`` print.

Readers open the database with ``mode=ro``: in WAL mode they see the last
committed state without ever taking the writer's lock, so following a run
never slows the daemon down.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import signal as _signal
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd_client import paths
from ckptd_client.errors import CkptdError, NotFound

from ckptd.store.writer import check_version, connect_readonly, effective


class UnknownKey(NotFound):
    """``--key`` names a metric the run never logged (a typo, usually)."""


class AmbiguousRun(NotFound):
    """A run name that several runs share: which one is meant is not guessed."""


SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


class Reader:
    """A read-only view of a home's store."""

    def __init__(self, home: Path) -> None:
        self.home = home
        db = paths.db_path(home)
        if not db.exists():
            raise NotFound(
                f"no ckptd store in {home}; run a training script that calls "
                "ckptd_client.init() or `ckptd demo` first (or pass --home)"
            )
        #: schema version: a store not yet migrated by a daemon has no tags table
        self.version = check_version(db)
        self.conn = connect_readonly(db)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout=30000")
        if self.version < 7:
            _legacy_metric_tables(self.conn)

    @property
    def effective_metrics(self) -> str:
        """What to select metrics of the effective timeline FROM: the store's
        ``effective_metrics`` view (schema 4 on), or the same rows for an older
        store a daemon has not migrated yet. The views read metrics only
        through this, so they follow the view when the table under it changes."""
        if self.version >= 4:
            return "effective_metrics"
        return f"(SELECT * FROM metrics WHERE {effective('metrics')})"

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, args).fetchall()]

    # ----------------------------------------------------------------- runs

    def resolve(self, ref: str | None) -> dict[str, Any]:
        """A run by id, unique id prefix, or name (newest of that name); newest if None."""
        if ref is None:
            rows = self.rows("SELECT * FROM runs ORDER BY started DESC, rowid DESC LIMIT 1")
            if not rows:
                raise NotFound(f"no runs yet in {self.home}")
            return rows[0]
        rows = self.rows("SELECT * FROM runs WHERE id = ?", (ref,))
        if rows:
            return rows[0]
        escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.rows("SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\'", (escaped + "%",))
        if len(rows) == 1:
            return rows[0]
        if len(rows) > 1:
            ids = ", ".join(r["id"] for r in rows[:5])
            raise NotFound(f"run prefix {ref!r} is ambiguous: {ids}; give more characters")
        rows = self.rows("SELECT * FROM runs WHERE name = ? ORDER BY started DESC", (ref,))
        if len(rows) == 1:
            return rows[0]
        if rows:
            listed = "; ".join(f"{r['id']} ({r['status']}, started "
                               f"{_stamp(r['started'])})" for r in rows[:10])
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            raise AmbiguousRun(f"{len(rows)} runs are named {printable(ref)!r}: {listed}{more};"
                               " give the run id (or rename one: `ckptd rename ID NEW`)")
        raise NotFound(f"no run {ref!r} in {self.home}; `ckptd ls` lists the runs")

    def list_runs(self, status: str | None = None,
                  group: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if group is not None:
            where.append("group_name = ?")
            args.append(group)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        return [summary(r) for r in self.rows(sql + " ORDER BY started, rowid", tuple(args))]

    def tags(self, run_ids: list[str] | None = None) -> dict[str, list[str]]:
        """Tags per run id (of the given runs, or all)."""
        if self.version < 3:  # tags came with schema version 3
            return {}
        sql, args = "SELECT run_id, tag FROM tags", ()
        if run_ids is not None and len(run_ids) == 1:
            sql, args = sql + " WHERE run_id = ?", (run_ids[0],)
        out: dict[str, list[str]] = {}
        for r in self.conn.execute(sql + " ORDER BY run_id, tag", args):
            out.setdefault(r[0], []).append(r[1])
        return out

    def series(self, run_id: str, *, key: str | None = None, system: bool | None = False,
               rank: int | None = None) -> list[Series]:
        """The run's metric series (one per key, attempt and writer), oldest first.
        ``system``: only the daemon's ``sys/`` samples (True), none of them
        (False), or both (None)."""
        sql = "SELECT id, attempt, src, key, rank FROM metric_series WHERE run_id = ?"
        args: list[Any] = [run_id]
        if key is not None:
            sql += " AND key = ?"
            args.append(key)
        if system is not None:
            sql += " AND src = 'd'" if system else " AND src != 'd'"
        if rank is not None:
            sql += " AND rank = ?"
            args.append(rank)
        return [Series(*r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def cutoffs(self, run_id: str) -> dict[int, int]:
        """The highest effective step of each attempt that a later one resumed
        before (:func:`effective` as a bound: a point is superseded exactly
        when its step is above its attempt's cutoff), so a read is an index
        range per series instead of a subquery per row."""
        rows = dict(self.conn.execute(
            "SELECT attempt, restored_step FROM attempts WHERE run_id = ?", (run_id,)).fetchall())
        out: dict[int, int] = {}
        low: int | None = None
        # every attempt below the newest, also one without a row of its own (a
        # store built by hand, an attempt whose registration never arrived):
        # as in ``effective``, only the later attempts' restored steps count
        for attempt in range(max(rows, default=0), 0, -1):
            if low is not None:
                out[attempt] = low
            restored = rows.get(attempt)
            if restored is not None:
                low = restored if low is None else min(low, restored)
        return out

    def _bound(self, s: Series, cutoffs: dict[int, int]) -> int | None:
        return None if s.src.startswith("d") else cutoffs.get(s.attempt)

    def _last_point(self, series: list[Series], cutoffs: dict[int, int]) -> Any:
        """``(step, attempt, seq, value)`` of the last effective point of these series."""
        best = None
        for s in series:
            bound = self._bound(s, cutoffs)
            row = self.conn.execute(
                "SELECT step, seq, value FROM metric_points WHERE sid = ?"
                + ("" if bound is None else " AND step <= ?")
                + " ORDER BY step DESC, seq DESC LIMIT 1",
                (s.sid,) if bound is None else (s.sid, bound)).fetchone()
            if row is not None and (best is None or (row[0], s.attempt, row[1]) > best[:3]):
                best = (row[0], s.attempt, row[1], row[2])
        return best

    def last_values(self, run_id: str) -> dict[str, float]:
        """The last value of each metric key on the effective timeline.

        One index seek per series (``metric_points (sid, step)`` read
        backwards), so a long run costs its number of keys, not its rows.
        """
        cutoffs = self.cutoffs(run_id)
        by_key: dict[str, list[Series]] = {}
        for s in self.series(run_id):
            if s.src.startswith("c"):
                by_key.setdefault(s.key, []).append(s)
        out: dict[str, float] = {}
        for key in sorted(by_key):
            last = self._last_point(by_key[key], cutoffs)
            if last is not None:
                out[key] = float("nan") if last[3] is None else last[3]
        return out

    def key_stats(self, run_id: str) -> list[dict[str, Any]]:
        """Every metric key of a run (``sys/`` samples of the daemon included):
        how many values on the effective timeline, the last one and its step."""
        cutoffs = self.cutoffs(run_id)
        groups: dict[tuple[bool, str], list[Series]] = {}
        for s in self.series(run_id, system=None):
            groups.setdefault((s.src.startswith("d"), s.key), []).append(s)
        rows = []
        for (system, key), series in sorted(groups.items()):
            count, step = 0, None
            for s in series:
                bound = self._bound(s, cutoffs)
                n, top = self.conn.execute(
                    "SELECT COUNT(*), MAX(step) FROM metric_points WHERE sid = ?"
                    + ("" if bound is None else " AND step <= ?"),
                    (s.sid,) if bound is None else (s.sid, bound)).fetchone()
                count += n
                step = top if step is None or (top is not None and top > step) else step
            if not count:
                continue
            last = self._last_point(series if system else
                                    [s for s in series if s.src.startswith("c")], cutoffs)
            rows.append({"key": key, "system": system, "count": count, "step": step,
                         "last": float("nan") if last is None or last[3] is None else last[3]})
        return rows

    def rank_processes(self, run_id: str, attempt: int) -> list[dict[str, Any]]:
        """Per-rank liveness of one attempt: rank, host, pid, alive, last_seen, ended."""
        if self.version < 6:  # recorded since schema version 6
            return []
        rows = self.rows(
            "SELECT rank, host, pid, last_seen, ended FROM rank_processes WHERE run_id = ?"
            " AND attempt = ? ORDER BY rank", (run_id, attempt))
        for r in rows:
            r["alive"] = r["ended"] is None
        return rows

    def show(self, ref: str | None) -> dict[str, Any]:
        run = self.resolve(ref)
        out = summary(run)
        ranks = self.rank_processes(run["id"], run["attempt"])
        out.update(
            hosts=sorted({r["host"] for r in ranks if r["host"]} | (
                {run["host"]} if run.get("host") else set())),
            ranks=ranks,
            tags=self.tags([run["id"]]).get(run["id"], []),
            note=run.get("note"),
            project=run.get("project"),
            command=_redact_command(_loads(run.get("command"))),
            cwd=run.get("cwd"),
            env=redact(_loads(run.get("env")) or {}),
            provenance=_loads(run.get("provenance")),
            config=_loads(run.get("config")),
            seed=run.get("seed"),
            pid=run.get("pid"),
            exit_code=run.get("exit_code"),
            signal=run.get("signal"),
            reason=run.get("reason"),
            traceback=run.get("traceback"),
            auto_resume=bool(run.get("auto_resume")),
            restarts=run.get("restarts") or 0,
            retention=_loads(run.get("retention")),
            max_restarts=run.get("max_restarts"),
            signal_name=signal_name(run.get("signal")),
            attempts=[a | {"signal_name": signal_name(a["signal"])} for a in self.rows(
                "SELECT attempt, started, ended, status, exit_code, signal, restored_step"
                " FROM attempts WHERE run_id = ? ORDER BY attempt", (run["id"],))],
            checkpoints=self.checkpoints(run["id"]),
        )
        return out

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT step, status, bytes, hash, metrics, blocked_s, persist_s, created, attempt,"
            " path, reason FROM checkpoints WHERE run_id = ? ORDER BY step", (run_id,))
        for r in rows:
            r["metrics"] = _loads(r["metrics"]) or {}
        return rows

    # -------------------------------------------------------------- metrics

    def metrics(self, run_id: str, key: str | None = None,
                all_attempts: bool = False, rank: int | None = 0) -> list[dict[str, Any]]:
        """:meth:`iter_metrics`, as a list."""
        return list(self.iter_metrics(run_id, key, all_attempts, rank))

    def iter_metrics(self, run_id: str, key: str | None = None,
                     all_attempts: bool = False, rank: int | None = 0) -> Iterator[dict[str, Any]]:
        """The effective timeline: superseded values (logged by an attempt after
        the step a later attempt resumed from) are left out unless asked for.
        ``rank``: whose values (None: every rank's, each row saying whose).

        A generator over one index range per series, merged by step: the
        first row comes at once and memory stays constant, whatever the run's
        length (``ckptd metrics | head``, exports).
        """
        # the daemon's own samples (``sys/...``, src 'd') appear when asked for by key
        sys_key = key is not None and key.startswith("sys/")
        # (the daemon's per-rank samples carry the rank they describe)
        series = self.series(run_id, key=key, system=sys_key, rank=rank)
        for step, attempt, _seq, k, value, t, superseded, who in self.points(
                run_id, series, all_attempts):
            row: dict[str, Any] = {"step": step, "key": k, "value": value, "attempt": attempt,
                                   "time": t}
            if all_attempts:
                row["superseded"] = superseded
            if rank is None:
                row["rank"] = who
            yield row

    def points(self, run_id: str, series: list[Series],
               all_attempts: bool) -> Iterator[tuple[Any, ...]]:
        """``(step, attempt, seq, key, value, time, superseded, rank)`` of these
        series in step order (then attempt, seq, key), NaN for a stored NULL."""
        cutoffs = self.cutoffs(run_id)

        def one(s: Series) -> Iterator[tuple[Any, ...]]:
            bound = self._bound(s, cutoffs)
            sql = "SELECT step, seq, value, time FROM metric_points WHERE sid = ?"
            args: tuple[Any, ...] = (s.sid,)
            if bound is not None and not all_attempts:
                sql, args = sql + " AND step <= ?", (s.sid, bound)
            # a cursor of its own per series: they are read side by side
            for step, seq, value, t in self.conn.cursor().execute(
                    sql + " ORDER BY step, seq", args):
                yield (step, s.attempt, seq, s.key, float("nan") if value is None else value,
                       t, int(bound is not None and step > bound), s.rank)

        yield from heapq.merge(*(one(s) for s in series), key=lambda p: p[:4])

    def keys(self, run_id: str) -> list[str]:
        """The metric keys a run logged (its own, not the daemon's ``sys/`` samples)."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT key FROM metric_series WHERE run_id = ? AND src != 'd'"
            " ORDER BY key", (run_id,))]

    # ----------------------------------------------------------------- tail

    def lines(self, run_id: str, *, with_metrics: bool, all_attempts: bool,
              after: Cursor | None = None, rank: int | None = 0,
              last: int | None = None) -> tuple[list[Line], Cursor]:
        """Events, console output and (optionally) metrics, merged by time.

        ``after`` continues from an earlier call (``tail -f``): event rowids
        only grow; metric points come after each series' last ``seq``, plus
        those recorded in ``metric_backfill`` (ingested late, below it), so
        nothing is shown twice or skipped. ``last``: only (at least) the newest
        ``last`` lines, read backwards from the end of each index; the cursor returned then
        still covers everything committed, so a follower starts after it.
        """
        cursor = after or Cursor()
        # one read transaction: the cursor and the lines are of one snapshot
        self.conn.execute("BEGIN")
        try:
            return self._lines(run_id, with_metrics, all_attempts, cursor, rank, last,
                               fresh=after is None or last is not None)
        finally:
            self.conn.execute("COMMIT")

    def _lines(self, run_id: str, with_metrics: bool, all_attempts: bool, cursor: Cursor,
               rank: int | None, last: int | None,
               fresh: bool) -> tuple[list[Line], Cursor]:
        sup = f" AND rank = {int(rank)}" if rank is not None else ""  # int: no quoting
        ev_sup = sup + ("" if all_attempts else f" AND {effective('events')}")
        cols = "rowid AS rid, attempt, time, kind, level, step, message, fields, rank"
        where = f" AND kind != 'register' AND NOT ({_SAID_BEFORE})"
        if last is None:
            ev = self.rows(
                f"SELECT {cols} FROM events WHERE {_run_filter(cursor.event)} AND rowid > ?"
                f"{ev_sup}{where} ORDER BY rowid", (run_id, cursor.event))
            new_event = max([cursor.event, *(r["rid"] for r in ev)])
        else:
            # backwards along (run_id, time); every older row is behind the cursor
            ev = self.rows(
                f"SELECT {cols} FROM events WHERE run_id = ?{ev_sup}{where}"
                " ORDER BY time DESC, rowid DESC LIMIT ?", (run_id, last))[::-1]
            top = self.conn.execute("SELECT MAX(rowid) FROM events").fetchone()[0]
            new_event = max(cursor.event, top or 0)
        out = [Line(r["time"], r["attempt"], r["kind"], r["level"], r["step"],
                    f"[rank {r['rank']}] {r['message']}" if rank is None and r["rank"]
                    else r["message"], _loads(r["fields"])) for r in ev]
        seqs = dict(cursor.metric)
        backfill = cursor.backfill
        if with_metrics:
            cutoffs = {} if all_attempts else self.cutoffs(run_id)
            grouped: dict[tuple[int, str, int], Line] = {}
            series = self.series(run_id, rank=rank)
            late, backfill = self._backfill(series, cursor.backfill, fresh)
            for s in series:
                bound = self._bound(s, cutoffs)
                sql = "SELECT seq, step, value, time FROM metric_points WHERE sid = ?"
                args: list[Any] = [s.sid]
                if bound is not None:
                    sql += " AND step <= ?"
                    args.append(bound)
                if last is None:
                    rows = self.conn.execute(sql + " AND seq > ? ORDER BY seq",
                                             (*args, seqs.get(s.sid, -1))).fetchall()
                    # points that arrived below the cursor (a spool ingested
                    # after live sends); one fetched twice in this look (also
                    # above the cursor) fills the same field of the same line
                    for lo, hi in late.get(s.sid, ()):
                        rows += self.conn.execute(sql + " AND seq BETWEEN ? AND ? ORDER BY seq",
                                                  (*args, lo, hi)).fetchall()
                else:
                    rows = self.conn.execute(sql + " ORDER BY seq DESC LIMIT ?",
                                             (*args, last)).fetchall()[::-1]
                    top = self.conn.execute("SELECT MAX(seq) FROM metric_points WHERE"
                                            " sid = ?", (s.sid,)).fetchone()[0]
                    if top is not None:
                        seqs[s.sid] = max(top, seqs.get(s.sid, -1))
                for seq, step, value, t in rows:
                    line = grouped.get((s.attempt, s.src, seq))
                    if line is None:
                        line = grouped[(s.attempt, s.src, seq)] = Line(
                            t, s.attempt, "log", "metric", step,
                            f"[rank {s.rank}]" if rank is None else "", {})
                    assert line.fields is not None
                    line.fields[s.key] = value if value is not None else float("nan")
                    seqs[s.sid] = max(seq, seqs.get(s.sid, -1))
            out.extend(grouped.values())
        out.sort(key=lambda line: line.time)
        return out, Cursor(new_event, seqs, backfill)

    def _backfill(self, series: list[Series], after: int,
                  fresh: bool) -> tuple[dict[int, list[tuple[int, int]]], int]:
        """Late seq ranges of these series recorded after ``after`` (see
        ``metric_backfill`` in the writer), by series id, and the id to
        continue from. ``fresh`` (a read from the end, or of everything):
        only the id, every point committed so far is behind the cursor.

        The rows of every run are read by id and filtered here: they are
        one per series per spool batch, so a look reads a handful.
        """
        if self.version < 9 and not self._backfill_table():
            return {}, after  # recorded since schema version 9
        if fresh:
            top = self.conn.execute("SELECT MAX(id) FROM metric_backfill").fetchone()[0]
            return {}, max(after, top or 0)
        sids = {s.sid for s in series}
        late: dict[int, list[tuple[int, int]]] = {}
        for rid, sid, lo, hi in self.conn.execute(
                "SELECT id, sid, lo, hi FROM metric_backfill WHERE id > ? ORDER BY id",
                (after,)).fetchall():
            after = rid
            if sid in sids:
                late.setdefault(sid, []).append((lo, hi))
        return late, after

    def _backfill_table(self) -> bool:
        """Whether an older store opened by this reader has ``metric_backfill``
        by now: a daemon of this version that started meanwhile migrated it,
        and a ``tail -f`` begun before must not miss what it records next.
        A store below schema 7 is read through temporary views whose series
        ids are not the real ones: it goes without."""
        if self.version < 7:
            return False
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND"
                                 " name = 'metric_backfill'").fetchone() is not None

    def tail(self, run_id: str, n: int, *, with_metrics: bool, all_attempts: bool,
             rank: int | None = 0,
             keep: Callable[[Line], bool] | None = None) -> tuple[list[Line], Cursor]:
        """The newest ``n`` lines (of those ``keep`` accepts) and the cursor to
        follow from: reads backwards, twice as far each round, until it has
        ``n`` or the run's beginning (``tail -n 100`` of a 20 M-point run
        reads a few hundred rows, not the run)."""
        want = n
        while True:
            lines, cursor = self.lines(run_id, with_metrics=with_metrics,
                                       all_attempts=all_attempts, rank=rank, last=want)
            kept = [ln for ln in lines if keep is None or keep(ln)]
            # fewer lines than asked for: the beginning of every index was reached
            if len(kept) >= n or len(lines) < want or want >= 1 << 40:
                return kept[-n:] if n else [], cursor
            want *= 4
    def still_going(self, run_id: str) -> bool:
        """Running, or ended badly with an auto-resume still to come (``tail -f``
        keeps following it into the next attempt)."""
        row = self.conn.execute("SELECT status, auto_resume FROM runs WHERE id = ?",
                                (run_id,)).fetchone()
        return row is not None and (row[0] == "running" or (
            bool(row[1]) and row[0] in ("interrupted", "failed", "preempted")))

    def data_version(self) -> int:
        """Changes whenever anyone commits to the store (cheap: no I/O)."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]


#: The supervisor's status line of an attempt whose own process already said
#: it ended the same way ("attempt 1 finished" then "attempt 1 finished:
#: exited with status 0"): one line per ending. The supervisor reports last,
#: so ``tail -f`` never has to take back a line it printed.
_SAID_BEFORE = ("events.kind = 'status' AND events.src = 's' AND EXISTS (SELECT 1 FROM"
                " events AS c WHERE c.run_id = events.run_id AND c.attempt = events.attempt"
                " AND c.src GLOB 'c*' AND c.kind = 'status' AND c.rowid < events.rowid AND"
                " substr(events.message, 1, length(c.message)) = c.message)")


def _stamp(t: float | None) -> str:
    import datetime as dt

    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _run_filter(after: int) -> str:
    """The run condition of a tail query.

    Continuing from a cursor (``tail -f``), ``+run_id`` keeps SQLite off the
    run_id index so it seeks by rowid: the cost is that of the new rows, not
    of the whole run's history (49 ms -> 0.0 ms per look at 1M rows).
    """
    return "+run_id = ?" if after > 0 else "run_id = ?"


@dataclass
class Cursor:
    """Where a follower is: the last event rowid, the last ``seq`` of each
    metric series (by ``metric_series.id``), and the last ``metric_backfill``
    id (points that arrived below a series' last seq)."""

    event: int = 0
    metric: dict[int, int] = field(default_factory=dict)
    backfill: int = 0


@dataclass
class Series:
    """One metric key as one writer logged it in one attempt."""

    sid: int
    attempt: int
    src: str
    key: str
    rank: int


def _legacy_metric_tables(conn: sqlite3.Connection) -> None:
    """A store of schema < 7 (no daemon has migrated it yet): its ``metrics``
    table seen as ``metric_series`` + ``metric_points`` (temporary views of
    this connection; the store is not written). Slow on a big store, and
    correct; the daemon migrates it when it next starts."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'metrics'").fetchone() is None:
        return
    rank = "rank" if any(r[1] == "rank" for r in conn.execute("PRAGMA table_info(metrics)")) \
        else "0"
    conn.execute(
        "CREATE TEMP VIEW metric_series AS SELECT MIN(rowid) AS id, run_id, key, attempt, src,"
        f" {rank} AS rank FROM main.metrics GROUP BY run_id, key, attempt, src"
        + (", rank" if rank == "rank" else ""))
    conn.execute(
        "CREATE TEMP VIEW metric_points AS SELECT s.id AS sid, m.seq AS seq, m.step AS step,"
        " m.value AS value, m.time AS time FROM main.metrics m JOIN temp.metric_series s ON"
        " s.run_id = m.run_id AND s.key = m.key AND s.attempt = m.attempt AND s.src = m.src"
        + (" AND s.rank = m.rank" if rank == "rank" else ""))


@dataclass
class Line:
    time: float
    attempt: int
    kind: str
    level: str
    step: int | None
    message: str
    fields: dict[str, Any] | None


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The stable ``ls --json`` shape."""
    return {
        "id": run["id"],
        "name": run.get("name"),
        "status": run.get("status"),
        "attempt": run.get("attempt"),
        "step": run.get("step"),
        "started": run.get("started"),
        "ended": run.get("ended"),
        "group": run.get("group_name"),
        "world_size": run.get("world_size") or 1,
        "nodes": run.get("nodes") or 1,
        "node_rank": run.get("node_rank") or 0,
    }


#: ``scheme://user:password@`` in a URL (DATABASE_URL, REDIS_URL, a --db argument).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*:)[^/?#@\s]*@")
#: ``?token=...``/``&X-Amz-Signature=...``: query parameters with secret-looking names.
_SECRET_PARAM = re.compile(r"([?&;][^=&;#\s]*(?:" + "|".join(
    (*SECRET_WORDS, "SIGNATURE", "SIG", "AUTH")) + r")[^=&;#\s]*=)[^&;#\s]*", re.I)


def redact_text(text: str) -> str:
    """Credentials inside a value hidden: a URL's password, secret query parameters."""
    return _SECRET_PARAM.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def _redact_command(command: Any) -> Any:
    if isinstance(command, list):
        return [redact_text(a) if isinstance(a, str) else a for a in command]
    return command


def redact(env: dict[str, Any]) -> dict[str, Any]:
    """Environment as displayed: values of secret-looking names hidden, and
    credentials inside any other value (``postgres://u:pw@h/db``)."""
    return {k: ("***" if any(w in k.upper() for w in SECRET_WORDS)
                else redact_text(v) if isinstance(v, str) else v)
            for k, v in env.items()}


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


#: What a terminal would act on rather than show: C0 controls (ESC starts
#: cursor moves, OSC title and OSC 52 clipboard writes; CR and LF fake
#: extra rows), DEL, C1 controls (0x9b is a one-byte CSI), and the bidi
#: overrides and isolates that reorder what is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, lines: bool = False) -> str:
    """``text`` safe to write to a terminal: every control character shown
    as a ``\\xNN`` / ``\\uNNNN`` escape.

    Run names, projects, events, console output and metric keys come from
    training scripts; every human-readable output passes them through here
    (JSON output escapes them itself). ``lines`` keeps newlines and tabs, for
    multi-line text such as a traceback.
    """
    return (_CONTROL_KEEP_LINES if lines else _CONTROL).sub(_escape, str(text))


#: Non-finite numbers in JSON output: RFC 8259 has no NaN or Infinity, so they
#: are written as these strings (``float(s)`` reads each back).
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/Infinity float replaced by its :data:`NON_FINITE` string."""
    if isinstance(value, float) and not math.isfinite(value):
        return NON_FINITE[str(value)]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, *, indent: int | None = None) -> str:
    """The one encoder of every ``--json`` / ``jsonl`` output: valid RFC 8259
    (``allow_nan=False`` guards :func:`json_safe`)."""
    return json.dumps(json_safe(value), indent=indent, default=str, allow_nan=False,
                      separators=None if indent else (",", ":"))


def iter_jsonl(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for r in rows:
        yield to_json(r)


def signal_name(number: int | None) -> str | None:
    """``9`` -> ``"SIGKILL"``: what ``show`` prints for an attempt a signal ended."""
    if number is None:
        return None
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


__all__ = ["Reader", "CkptdError", "redact", "summary"]
