"""Promise 6 and SPEC section 6 against a real daemon: hostile input, refusals, permissions.

Each bad input goes to a live daemon on its own connection while a well-behaved
client stays connected on another. The bad connection must get an error reply
(where one can be sent) and be closed; the good client must keep being served;
the store must not change at all.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from ckptd_client import paths, protocol
from helpers import DaemonProc, ckptd, db_rows, run_script, wait_for

HELLO = {"t": protocol.HELLO, "run": "good-run", "attempt": 1, "src": "c"}


def frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return protocol.HEADER.pack(len(body)) + body


def connect(home: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.fspath(paths.socket_path(home)))
    return s


def replies_until_closed(s: socket.socket, timeout: float = 10) -> list[dict]:
    """Every frame the daemon sends before it closes the connection."""
    reader = protocol.FrameReader()
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return out  # closed with our unread bytes in its buffer: closed all the same
        except TimeoutError:
            raise AssertionError(f"the daemon kept the connection open; got {out}") from None
        if not data:
            return out
        out.extend(reader.feed(data))


def log_frame(seq: int, **over: object) -> dict:
    return {"t": protocol.LOG, "seq": seq, "step": seq, "time": 1.7e9, "m": {"x": 1.0}, **over}


def store_dump(home: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{home / paths.DB_NAME}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


DEEP = b'{"t":"log","seq":1,"m":' + b"[" * 200_000 + b"]" * 200_000 + b"}"

#: name -> (bytes sent after connecting, whether an error reply is possible)
BAD_INPUTS: dict[str, tuple[bytes, bool]] = {
    "garbage-bytes": (bytes(range(255, -1, -1)) * 4, True),
    "http-request": (b"GET / HTTP/1.1\r\nHost: ckptd\r\n\r\n", True),
    "not-json": (protocol.HEADER.pack(9) + b"not json!", True),
    "json-not-object": (frame([1, 2, 3]), True),
    "invalid-utf8": (protocol.HEADER.pack(4) + b"\xff\xfe\xfd\xfc", True),
    "deeply-nested": (protocol.HEADER.pack(len(DEEP)) + DEEP, True),
    "oversized-header": (protocol.HEADER.pack(protocol.MAX_FRAME + 1) + b"{}" * 100, True),
    "unknown-type": (frame({"t": "format_disk"}), True),
    "type-not-string": (frame({"t": 7}), True),
    "log-before-hello": (frame(log_frame(1)), True),
    "register-before-hello": (frame({"t": "register", "seq": 1, "name": "x"}), True),
    "hello-attempt-string": (frame({**HELLO, "run": "r2", "attempt": "1"}), True),
    "hello-attempt-huge": (frame({**HELLO, "run": "r2", "attempt": 2**70}), True),
    "hello-src-unknown": (frame({**HELLO, "run": "r2", "src": "daemon"}), True),
    "run-id-dotdot": (frame({**HELLO, "run": "../x"}), True),
    "run-id-nested-dotdot": (frame({**HELLO, "run": "a..b"}), True),
    "run-id-nul": (frame({**HELLO, "run": "a\x00b"}), True),
    "run-id-absolute": (frame({**HELLO, "run": "/etc/passwd"}), True),
    "run-id-slash": (frame({**HELLO, "run": "a/b"}), True),
    "run-id-empty": (frame({**HELLO, "run": ""}), True),
    "run-id-number": (frame({**HELLO, "run": 12}), True),
    "step-string": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, step="3")), True),
    "step-negative": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, step=-1)), True),
    "seq-float": (frame(HELLO | {"run": "r3"}) + frame({**log_frame(1), "seq": 1.5}), True),
    "metric-string": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, m={"x": "1"})), True),
    "metric-bool": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, m={"x": True})), True),
    "metric-null": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, m={"x": None})), True),
    "metric-int-too-big": (frame(HELLO | {"run": "r3"})
                           + frame(log_frame(1, m={"x": 2**64})), True),
    "metrics-not-object": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, m=[1])), True),
    "metric-key-empty": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, m={"": 1})), True),
    "time-string": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, time="now")), True),
    "time-nan": (frame(HELLO | {"run": "r3"})
                 + protocol.encode(log_frame(1, time=float("nan"))), True),
    "time-huge": (frame(HELLO | {"run": "r3"}) + frame(log_frame(1, time=1e300)), True),
    "event-level-unknown": (frame(HELLO | {"run": "r3"}) + frame(
        {"t": "event", "seq": 1, "msg": "hi", "level": "loud"}), True),
    "event-msg-nul": (frame(HELLO | {"run": "r3"}) + frame(
        {"t": "event", "seq": 1, "msg": "a\x00b", "level": "info"}), True),
    "status-unknown": (frame(HELLO | {"run": "r3"}) + frame(
        {"t": "status", "seq": 1, "status": "exploded"}), True),
    "register-command-not-list": (frame(HELLO | {"run": "r3"}) + frame(
        {"t": "register", "seq": 1, "command": "rm -rf /"}), True),
    "flush-seq-string": (frame(HELLO | {"run": "r3"}) + frame({"t": "flush", "seq": "9"}), True),
    "rpc-unknown-op": (frame({"t": "rpc", "op": "drop_tables", "args": {}}), True),
    "rpc-args-not-object": (frame({"t": "rpc", "op": "status", "args": [1]}), True),
}


@pytest.fixture
def served(daemon: DaemonProc, home: Path):
    """A live daemon with one good client connected and one event committed."""
    good = connect(home)
    good.sendall(frame(HELLO) + frame({"t": "register", "seq": 1, "name": "good"})
                 + frame(log_frame(2)) + frame({"t": "flush", "seq": 2}))
    reader = protocol.FrameReader()
    wait_for(lambda: any(m["t"] == "flushed" for m in reader.feed(good.recv(65536))),
             what="good client's first flush")
    yield good
    good.close()


def test_every_bad_input_is_refused_and_others_keep_being_served(
        served: socket.socket, daemon: DaemonProc, home: Path) -> None:
    before = store_dump(home)
    failures = []
    for name, (data, expect_reply) in BAD_INPUTS.items():
        bad = connect(home)
        try:
            bad.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us before we finished: that is a refusal too
        try:
            replies = replies_until_closed(bad, timeout=5)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
            continue
        finally:
            bad.close()
        errors = [m for m in replies if m.get("t") == protocol.ERROR]
        if expect_reply and not (errors and isinstance(errors[0].get("error"), str)):
            failures.append(f"{name}: no error reply, got {replies}")
        if any(m.get("t") in (protocol.ACK, protocol.REPLY) and m.get("ok", True)
               for m in replies if m.get("t") != protocol.ERROR):
            failures.append(f"{name}: accepted: {replies}")
    assert not failures, "\n".join(failures)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert store_dump(home) == before, "a refused frame changed the store"
    # the good client, connected the whole time, is still served
    served.sendall(frame(log_frame(3)) + frame({"t": "flush", "seq": 3}))
    reader, got = protocol.FrameReader(), []
    wait_for(lambda: got.extend(reader.feed(served.recv(65536))) or
             any(m["t"] == "flushed" for m in got), what="good client served after attacks")
    assert db_rows(home, "SELECT seq FROM metrics WHERE run_id = 'good-run' ORDER BY seq") == \
        [(2,), (3,)]


def test_truncated_frame_then_eof_closes_and_changes_nothing(
        served: socket.socket, daemon: DaemonProc, home: Path) -> None:
    before = store_dump(home)
    bad = connect(home)
    body = json.dumps(log_frame(1)).encode()
    bad.sendall(frame(HELLO | {"run": "trunc"}) + protocol.HEADER.pack(len(body)) + body[:10])
    bad.shutdown(socket.SHUT_WR)
    assert replies_until_closed(bad) == []
    bad.close()
    assert store_dump(home) == before
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_bad_frame_after_good_ones_keeps_the_good_ones(daemon: DaemonProc, home: Path) -> None:
    """Frames before the bad one are ordinary events; the connection ends at the bad one."""
    s = connect(home)
    s.sendall(frame(HELLO | {"run": "mixed"}) + frame(log_frame(1)) + frame(log_frame(2))
              + frame({"t": "what"}) + frame(log_frame(3)))
    replies = replies_until_closed(s)
    s.close()
    assert any(m["t"] == protocol.ERROR for m in replies)
    wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM metrics WHERE run_id = 'mixed'")
             == [(2,)], what="the two good events")
    time.sleep(0.3)
    assert db_rows(home, "SELECT seq FROM metrics WHERE run_id = 'mixed' ORDER BY seq") == \
        [(1,), (2,)]


def test_socket_dir_0700_socket_0600(home: Path) -> None:
    sock_dir = paths.socket_path(home).parent
    sock_dir.mkdir(parents=True, mode=0o755)
    os.chmod(sock_dir, 0o755)  # a loose directory left by someone: the daemon tightens it
    d = DaemonProc(home)
    d.start()
    try:
        sock = paths.socket_path(home)
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
    finally:
        d.stop()


def test_second_daemon_on_same_home_says_so_and_exits_nonzero(daemon: DaemonProc,
                                                              home: Path) -> None:
    proc = ckptd(home, "daemon", timeout=30)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already running" in lines[0] and str(daemon.pid) in lines[0]
    assert daemon.proc is not None and daemon.proc.poll() is None


def _future_store(home: Path) -> None:
    conn = sqlite3.connect(home / paths.DB_NAME)
    conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()


def test_store_from_newer_schema_is_refused_by_daemon_and_cli(home: Path) -> None:
    _future_store(home)
    before = (home / paths.DB_NAME).read_bytes()
    proc = ckptd(home, "daemon", timeout=30)
    assert proc.returncode != 0
    assert "schema version 99" in proc.stderr and "upgrade" in proc.stderr
    assert "Traceback" not in proc.stderr
    for args in (["ls"], ["show", "x"], ["metrics", "x"], ["tail"]):
        proc = ckptd(home, *args)
        assert proc.returncode != 0, args
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "schema version 99" in err[0], (args, proc.stderr)
    assert (home / paths.DB_NAME).read_bytes() == before, "the newer store was modified"


def test_non_numeric_metric_raises_type_error_naming_the_key(home: Path) -> None:
    out = run_script(home, """
        import ckptd_client as ckptd
        run = ckptd.init(autostart=False)
        for bad in ("0.5", None, [1.0], {"a": 1}, object()):
            try:
                run.log({"ok": 1.0, "loss": bad}, step=0)
            except TypeError as exc:
                assert "'loss'" in str(exc), exc
            else:
                raise SystemExit(f"{bad!r} was accepted")
        try:
            run.log({"ok": 1.0}, step="3")
        except TypeError as exc:
            assert "step" in str(exc), exc
        else:
            raise SystemExit("a string step was accepted")
        run.finish()
        print("ok")
    """, env={**os.environ, "CKPTD_HOME": os.fspath(home), "CKPTD_NO_AUTOSTART": "1"})
    assert out.stdout.strip() == "ok"
    # nothing of a refused call was logged, not even its good keys
    spooled = b"".join(p.read_bytes() for p in (home / paths.SPOOL_DIR).glob("*.spool"))
    assert b'"ok"' not in spooled and b'"loss"' not in spooled


def _refuse(name: str) -> None:
    raise ValueError(f"bare {name} is not JSON")


def test_nan_and_inf_metrics_are_stored_and_read_back(daemon: DaemonProc, home: Path) -> None:
    run_script(home, """
        import math, ckptd_client as ckptd
        with ckptd.init(name="odd") as run:
            run.log({"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "one": 1}, step=0)
            run.flush()
    """)
    proc = ckptd(home, "metrics", "odd", "--format", "jsonl", check=True)
    # strict RFC 8259 JSON: non-finite values come back as the documented strings
    rows = [json.loads(line, parse_constant=_refuse) for line in proc.stdout.splitlines()]
    values = {r["key"]: r["value"] for r in rows}
    assert values["one"] == 1
    assert values["inf"] == "Infinity" and values["ninf"] == "-Infinity"
    assert values["nan"] == "NaN"
    # NaN is NULL in SQLite (see docs/schema.md); infinities are real values
    assert db_rows(home, "SELECT key, value FROM metrics WHERE key IN ('nan', 'inf')"
                   " ORDER BY key") == [("inf", float("inf")), ("nan", None)]


def test_values_the_daemon_would_refuse_are_handled_in_log(daemon: DaemonProc,
                                                          home: Path) -> None:
    """A value log()/event() accepts must never make the daemon drop the connection later:
    ints beyond 64 bits become floats, bad keys raise TypeError at the call, text with
    NUL is escaped and text beyond the limit is cut."""
    out = run_script(home, """
        import ckptd_client as ckptd
        run = ckptd.init(name="edges")
        run.log({"big": 2**64, "neg": -(2**70), "ok": 1}, step=0)
        for key in ("", "a\\x00b", "k" * 257, "\\udc80", 3):
            try:
                run.log({key: 1.0}, step=1)
            except TypeError as exc:
                assert "key" in str(exc), exc
            else:
                raise SystemExit(f"key {key!r} was accepted")
        try:
            run.log({"huge": 10**400}, step=1)
        except TypeError as exc:
            assert "'huge'" in str(exc)
        else:
            raise SystemExit("10**400 was accepted")
        for step, metrics in ((-1, {"ok": 1}), (2**63, {"ok": 1}),
                              (None, {f"k{i}": 1 for i in range(10_001)})):
            try:
                run.log(metrics, step=step)
            except ValueError:
                pass
            else:
                raise SystemExit(f"step {step} / {len(metrics)} metrics accepted")
        for project in ("a\\x00b", "p" * 5000, 7):
            try:
                ckptd.init(project=project, autostart=False)
            except ckptd.CkptdError:
                pass
            else:
                raise SystemExit(f"project {project!r} accepted")
        run.log({"ok": 2}, step=1)
        run.event("nul\\x00inside")
        run.event("x" * (20 << 20))  # larger than a frame: cut, not an exception
        run.console("binary\\x00output", "stdout")
        run.finish()
        print("ok")
    """)
    assert out.stdout.strip() == "ok" and "daemon reported" not in out.stderr, out.stderr
    assert "bad frame" not in (home / paths.DAEMON_LOG).read_text()
    rows = db_rows(home, "SELECT m.step, key, value FROM metrics m JOIN runs r ON r.id = m.run_id"
                   " WHERE r.name = 'edges' ORDER BY m.step, key")
    assert rows == [(0, "big", float(2**64)), (0, "neg", float(-(2**70))), (0, "ok", 1.0),
                    (1, "ok", 2.0)]
    texts = db_rows(home, "SELECT kind, substr(message, 1, 20), length(message) FROM events e"
                    " JOIN runs r ON r.id = e.run_id WHERE r.name = 'edges' AND kind IN"
                    " ('event', 'console') ORDER BY seq")
    assert [t[:2] for t in texts] == [("event", "nul\\0inside"), ("event", "x" * 20),
                                      ("console", "binary\\0output")]
    assert texts[1][2] <= protocol.MAX_TEXT and "cut by ckptd" in db_rows(
        home, "SELECT substr(message, -40) FROM events WHERE kind = 'event' AND"
        " length(message) > 1000")[0][0]
