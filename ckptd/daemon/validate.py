"""Validation of every frame the daemon accepts.

Anything a client sends is untrusted: a message that does not have exactly
the types below is refused before it reaches the store, so a hostile or buggy
peer can close its own connection and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

from ckptd_client import protocol
from ckptd_client.distributed import is_client_src
from ckptd_client.identity import LEVELS, valid_run_id

STATUSES = ("running", "finished", "failed", "interrupted", "preempted")
MAX_TEXT = protocol.MAX_TEXT
MAX_METRICS = protocol.MAX_METRICS


class Invalid(ValueError):
    """A well-formed frame whose content is not acceptable."""


def _int(msg: dict[str, Any], key: str, *, minimum: int | None = None,
         optional: bool = False) -> None:
    v = msg.get(key)
    if v is None and optional:
        return
    if (not isinstance(v, int) or isinstance(v, bool)
            or not protocol.INT_MIN <= v <= protocol.INT_MAX):
        raise Invalid(f"{msg.get('t')}: {key} must be an integer")
    if minimum is not None and v < minimum:
        raise Invalid(f"{msg.get('t')}: {key} must be >= {minimum}")


def _str(msg: dict[str, Any], key: str, *, optional: bool = False,
         limit: int = MAX_TEXT) -> None:
    v = msg.get(key)
    if v is None and optional:
        return
    if not isinstance(v, str) or len(v) > limit or "\0" in v or not protocol.is_utf8(v):
        raise Invalid(f"{msg.get('t')}: {key} must be valid UTF-8 text without NUL of at "
                      f"most {limit} characters")


def _num(msg: dict[str, Any], key: str, *, optional: bool = False) -> None:
    v = msg.get(key)
    if v is None and optional:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise Invalid(f"{msg.get('t')}: {key} must be a number")


#: Latest event time accepted (year 5138): beyond it ``tail`` could not format the time.
MAX_TIME = 1e11
#: A writer's identity: its kind (client, supervisor) and a random id per process.


def _time(msg: dict[str, Any]) -> None:
    """A timestamp every reader can sort and print: NaN would be stored as NULL and
    1e300 overflows ``datetime``; either would break ``ckptd tail`` for the run."""
    _num(msg, "time", optional=True)
    t = msg.get("time")
    if t is not None and not (math.isfinite(t) and 0 <= t < MAX_TIME):
        raise Invalid(f"{msg.get('t')}: time must be seconds since the epoch")


def hello(msg: dict[str, Any]) -> None:
    _str(msg, "run", limit=128)
    if not valid_run_id(msg["run"]):
        raise Invalid(f"hello: {msg['run']!r} is not a valid run id")
    _int(msg, "attempt", minimum=1)
    src = msg.get("src")
    if src != "s" and not is_client_src(src):
        raise Invalid("hello: src must be 's', or 'c' or 'r<rank>' with an optional writer id "
                      "('c-1f2e...')")


def event(msg: dict[str, Any]) -> None:
    """Check one sequenced event's fields against its type."""
    kind = msg["t"]
    _int(msg, "seq", minimum=1)
    _time(msg)
    # Every event row stores ``step``, whatever the kind: unchecked, a string or
    # a list failed the writer's whole group commit (found by tests/faults/test_fuzz.py).
    _int(msg, "step", optional=True, minimum=-1)
    _int(msg, "rank", optional=True, minimum=0)  # honoured from the supervisor only
    if kind == protocol.LOG:
        _int(msg, "step", minimum=0)
        m = msg.get("m")
        if not isinstance(m, dict) or len(m) > MAX_METRICS:
            raise Invalid(f"log: m must be an object of at most {MAX_METRICS} metrics")
        for key, value in m.items():
            if not key or len(key) > protocol.MAX_KEY or "\0" in key or not protocol.is_utf8(key):
                raise Invalid(f"log: bad metric key {key[:40]!r} (empty, too long, NUL or "
                              "not UTF-8)")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise Invalid(f"log: metric {key!r} is not a number")
            if isinstance(value, int) and not protocol.INT_MIN <= value <= protocol.INT_MAX:
                raise Invalid(f"log: metric {key!r} does not fit 64 bits")
    elif kind == protocol.EVENT:
        _str(msg, "msg")
        if msg.get("level") not in LEVELS:
            raise Invalid("event: unknown level")
        _int(msg, "step", optional=True)
        if msg.get("fields") is not None and not isinstance(msg["fields"], dict):
            raise Invalid("event: fields must be an object")
    elif kind == protocol.CONSOLE:
        _str(msg, "text")
        if msg.get("stream") not in ("stdout", "stderr"):
            raise Invalid("console: stream must be stdout or stderr")
    elif kind == protocol.STATUS:
        if msg.get("status") not in STATUSES:
            raise Invalid("status: unknown status")
        _int(msg, "exit_code", optional=True)
        _int(msg, "signal", optional=True)
        _str(msg, "traceback", optional=True)
        _str(msg, "reason", optional=True, limit=4096)
        _int(msg, "auto_resume", optional=True, minimum=0)
        _int(msg, "supervisor_pid", optional=True, minimum=1)
        _num(msg, "supervisor_started", optional=True)
    elif kind == protocol.RESTORED:
        _int(msg, "step", optional=True, minimum=-1)
    elif kind == protocol.REGISTER:
        for key in ("name", "project", "group", "cwd", "boot_id", "host"):
            _str(msg, key, optional=True, limit=4096)
        _int(msg, "seed", optional=True)
        _int(msg, "pid", optional=True)
        _num(msg, "pid_started", optional=True)
        _int(msg, "supervisor_pid", optional=True)
        _num(msg, "supervisor_started", optional=True)
        _int(msg, "auto_resume", optional=True, minimum=0)
        _int(msg, "max_restarts", optional=True, minimum=0)
        _int(msg, "world_size", optional=True, minimum=1)
        _int(msg, "nodes", optional=True, minimum=1)
        _int(msg, "node_rank", optional=True, minimum=0)
        cmd = msg.get("command")
        if cmd is not None and not (isinstance(cmd, list) and all(isinstance(a, str)
                                                                  for a in cmd)):
            raise Invalid("register: command must be a list of strings")
        for key in ("env", "config", "provenance"):
            if msg.get(key) is not None and not isinstance(msg[key], dict):
                raise Invalid(f"register: {key} must be an object")


def spooled(msg: dict[str, Any]) -> None:
    """A spool record: an event plus the identity the connection would carry."""
    if msg.get("t") not in protocol.SEQUENCED:
        raise Invalid(f"spool: {msg.get('t')!r} is not an event")
    hello({"t": "hello", "run": msg.get("run"), "attempt": msg.get("a"),
           "src": msg.get("src")})
    event(msg)
