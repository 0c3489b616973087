"""Read-only queries over the store: what ``ls``, ``show``, ``tail`` and ``metrics`` print.

Readers open the database with ``mode=ro``: in WAL mode they see the last
committed state without ever taking the writer's lock, so following a run
never slows the daemon down.
"""

from __future__ import annotations

import json
import math
import re
import signal as _signal
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
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

    def last_values(self, run_id: str) -> dict[str, float]:
        """The last value of each metric key on the effective timeline.

        One index seek per key (``metrics (run_id, key, step)`` read backwards),
        so a long run costs its number of keys, not its number of rows.
        """
        out: dict[str, float] = {}
        for key in self.keys(run_id):
            row = self.conn.execute(
                "SELECT value FROM metrics WHERE run_id = ? AND key = ? AND src GLOB 'c*' AND"
                f" {effective('metrics')} ORDER BY step DESC, attempt DESC, seq DESC LIMIT 1",
                (run_id, key)).fetchone()
            if row is not None:
                out[key] = float("nan") if row[0] is None else row[0]
        return out

    def key_stats(self, run_id: str) -> list[dict[str, Any]]:
        """Every metric key of a run (``sys/`` samples of the daemon included):
        how many values on the effective timeline, the last one and its step."""
        rows = self.rows(
            "SELECT key, src GLOB 'd*' AS system, COUNT(*) AS count, MAX(step) AS step"
            f" FROM metrics WHERE run_id = ? AND {effective('metrics')}"
            " GROUP BY system, key ORDER BY system, key", (run_id,))
        for r in rows:
            last = self.conn.execute(
                "SELECT value FROM metrics WHERE run_id = ? AND key = ? AND src GLOB ? AND"
                f" {effective('metrics')} ORDER BY step DESC, attempt DESC, seq DESC LIMIT 1",
                (run_id, r["key"], "d*" if r["system"] else "c*")).fetchone()
            r["last"] = float("nan") if last is None or last[0] is None else last[0]
            r["system"] = bool(r["system"])
        return rows

    def show(self, ref: str | None) -> dict[str, Any]:
        run = self.resolve(ref)
        out = summary(run)
        out.update(
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
        """The effective timeline: superseded values (logged by an attempt after
        the step a later attempt resumed from) are left out unless asked for.
        ``rank``: whose values (None: every rank's, each row saying whose)."""
        # the daemon's own samples (``sys/...``, src 'd') appear when asked for by key
        sys_key = key is not None and key.startswith("sys/")
        sql = (f"SELECT step, key, value, attempt, time, NOT {effective('metrics')}"
               " AS superseded, rank FROM metrics"
               " WHERE run_id = ? AND " + ("src = 'd'" if sys_key else "src != 'd'"))
        args: list[Any] = [run_id]
        if rank is not None and not sys_key:
            sql += " AND rank = ?"
            args.append(rank)
        if key is not None:
            sql += " AND key = ?"
            args.append(key)
        if not all_attempts:
            sql += f" AND {effective('metrics')}"
        sql += " ORDER BY step, attempt, seq, key"
        rows = self.rows(sql, tuple(args))
        for r in rows:
            if r["value"] is None:
                r["value"] = float("nan")
            if not all_attempts:
                del r["superseded"]
            if rank is not None:
                del r["rank"]
        return rows

    def keys(self, run_id: str) -> list[str]:
        """The metric keys a run logged (its own, not the daemon's ``sys/`` samples)."""
        return [r["key"] for r in self.rows(
            "SELECT DISTINCT key FROM metrics WHERE run_id = ? AND src != 'd' ORDER BY key",
            (run_id,))]

    # ----------------------------------------------------------------- tail

    def lines(self, run_id: str, *, with_metrics: bool, all_attempts: bool,
              after: Cursor | None = None, rank: int | None = 0) -> tuple[list[Line], Cursor]:
        """Events, console output and (optionally) metrics, merged by time.

        ``after`` continues from an earlier call (``tail -f``); rowids only
        grow, so nothing is shown twice or skipped.
        """
        cursor = after or Cursor()
        sup = f" AND rank = {int(rank)}" if rank is not None else ""  # int: no quoting
        ev_sup = sup + ("" if all_attempts else f" AND {effective('events')}")
        m_sup = sup + ("" if all_attempts else f" AND {effective('metrics')}")
        ev = self.rows(
            "SELECT rowid AS rid, attempt, time, kind, level, step, message, fields, rank"
            " FROM events"
            f" WHERE {_run_filter(cursor.event)} AND rowid > ?{ev_sup} AND kind != 'register'"
            f" AND NOT ({_SAID_BEFORE}) ORDER BY rowid",
            (run_id, cursor.event),
        )
        out = [Line(r["time"], r["attempt"], r["kind"], r["level"], r["step"],
                    f"[rank {r['rank']}] {r['message']}" if rank is None and r["rank"]
                    else r["message"], _loads(r["fields"])) for r in ev]
        new_event = max([cursor.event, *(r["rid"] for r in ev)])
        new_metric = cursor.metric
        if with_metrics:
            mrows = self.rows(
                "SELECT rowid AS rid, attempt, src, seq, step, key, value, time, rank FROM metrics"
                f" WHERE {_run_filter(cursor.metric)} AND rowid > ? AND src != 'd'{m_sup}"
                " ORDER BY rowid",
                (run_id, cursor.metric),
            )
            grouped: dict[tuple[int, str, int], Line] = {}
            for r in mrows:
                line = grouped.get((r["attempt"], r["src"], r["seq"]))
                if line is None:
                    line = grouped[(r["attempt"], r["src"], r["seq"])] = Line(
                        r["time"], r["attempt"], "log", "metric", r["step"],
                        f"[rank {r['rank']}]" if rank is None else "", {})
                assert line.fields is not None
                line.fields[r["key"]] = r["value"] if r["value"] is not None else float("nan")
            out.extend(grouped.values())
            new_metric = max([cursor.metric, *(r["rid"] for r in mrows)])
        out.sort(key=lambda line: line.time)
        return out, Cursor(new_event, new_metric)

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
    event: int = 0
    metric: int = 0


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


def iter_jsonl(rows: list[dict[str, Any]]) -> Iterator[str]:
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
