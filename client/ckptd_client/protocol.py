"""The wire protocol shared by the client and the daemon.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON encoding one object with a ``"t"`` (type) field. JSON keeps the protocol
debuggable with ``socat`` and safe to parse from hostile peers: there is no
pickle anywhere on the wire.

The daemon imports this module; this module imports nothing of the daemon.
"""

from __future__ import annotations

import json
import struct
from typing import Any

#: Frames larger than this are refused: a hostile or buggy peer cannot make
#: the daemon allocate unbounded memory.
MAX_FRAME = 16 * 1024 * 1024
#: Longest text field (log line, console line, traceback) the daemon accepts.
MAX_TEXT = 1 << 20
#: Most metrics in one log() call.
MAX_METRICS = 10_000

HEADER = struct.Struct(">I")

# Message types, client -> daemon.
HELLO = "hello"  # {run, attempt, src}: binds the connection to a run attempt
REGISTER = "register"  # {run, attempt, seq, ...run fields}: creates/updates a run
LOG = "log"  # {seq, step, time, m: {key: value}}
EVENT = "event"  # {seq, time, level, msg, fields}
CONSOLE = "console"  # {seq, time, stream, text}: captured stdout/stderr lines
STATUS = "status"  # {seq, time, status, exit_code?, signal?, traceback?, reason?}
RESTORED = "restored"  # {seq, time, step}: this attempt continues after checkpoint step (-1: none)
FLUSH = "flush"  # {seq}: reply FLUSHED once everything up to seq is committed
CKPT = "ckpt"  # checkpoint request (see snapshot.py)
PING = "ping"
RPC = "rpc"  # {op, args}: a library call answered by the daemon (CLI commands)

# Daemon -> client.
ACK = "ack"  # {seq}: every event of this connection up to seq is committed
FLUSHED = "flushed"  # {seq}
ERROR = "error"  # {error}: then the daemon closes the connection
REPLY = "reply"  # {id, ok, result | error}
PONG = "pong"

#: Message types that carry an event with a sequence number.
SEQUENCED = frozenset({REGISTER, LOG, EVENT, CONSOLE, STATUS, RESTORED})


class ProtocolError(ValueError):
    """A frame that cannot be decoded; the connection that sent it is closed."""


#: One encoder for every frame: ``json.dumps`` with arguments builds a new
#: encoder per call, a measurable part of ``log()``.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
#: Compact JSON text, as on the wire; one encoder reused (building one per call shows in log()).
dumps = _ENCODER.encode


def encode(msg: dict[str, Any]) -> bytes:
    """Return the framed bytes of ``msg``.

    ``allow_nan`` stays on: a training run that logs ``nan`` must see it
    recorded, not rejected (that is when people need their logs most).
    """
    body = _ENCODER.encode(msg).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse one frame body, refusing anything that is not an object with a type."""
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        # a hostile frame nesting thousands of arrays: refuse it like any bad frame
        raise ProtocolError("frame nests too deeply") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError("frame is not an object with a string 't' field")
    return msg


class FrameReader:
    """Incremental decoder: feed bytes as they arrive, take whole messages out.

    Keeps partial frames between reads so a slow or fragmenting peer is
    handled without a blocking read per frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return [msg for msg, _ in self.feed_sized(data)]

    def feed_sized(self, data: bytes) -> list[tuple[dict[str, Any], int]]:
        """Like :meth:`feed`, with each message's frame size (the daemon's
        queue is bounded in bytes)."""
        self._buf += data
        out: list[tuple[dict[str, Any], int]] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds the {self._max}-byte limit")
            if len(self._buf) < HEADER.size + size:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + size])
            del self._buf[: HEADER.size + size]
            out.append((decode_body(body), HEADER.size + size))
        return out


def recv_message(sock: Any, reader: FrameReader) -> dict[str, Any] | None:
    """Blocking read of exactly one message (used by simple request/reply callers)."""
    while True:
        msgs = reader.feed(b"")
        if msgs:
            return msgs[0]
        data = sock.recv(65536)
        if not data:
            return None
        msgs = reader.feed(data)
        if msgs:
            # Request/reply callers send one request at a time, so at most
            # one reply is ever buffered.
            return msgs[0]


#: The daemon's limits (ckptd/daemon/validate.py). A value it would refuse must be
#: refused (or converted) here: refused there, it costs the whole connection
#: and the event is dropped long after ``log()`` returned.
MAX_KEY = 256
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def _fit(key: str, value: int) -> float | int:
    """An int beyond 64 bits becomes a float (metric values are stored as REAL anyway)."""
    if INT_MIN <= value <= INT_MAX:
        return value
    try:
        return float(value)
    except OverflowError:
        raise TypeError(f"metric {key!r} = {value} is too large to record") from None


def is_utf8(text: str) -> bool:
    """True if SQLite can store ``text``; shared by the client's checks and the daemon's."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON carries it, SQLite cannot store it
        return False
    return True


def check_metric(key: Any, value: Any) -> float | int:
    """Return ``value`` as a plain number, or raise ``TypeError`` naming ``key``.

    numpy scalars and 0-d torch tensors are converted via ``.item()`` so
    users can log ``loss`` straight from the graph without ``float()``.
    """
    if (not isinstance(key, str) or not key or len(key) > MAX_KEY or "\0" in key
            or not (key.isascii() or is_utf8(key))):
        raise TypeError(f"metric key {key!r} must be a non-empty UTF-8 string without NUL "
                        f"of at most {MAX_KEY} characters")
    if type(value) is float:
        return value
    if type(value) is int:
        return _fit(key, value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value.__float__() if isinstance(value, float) else _fit(key, int(value))
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", 0) == 0:
        try:
            v = item()
        except Exception:
            v = None
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            return _fit(key, v)
        if isinstance(v, float):
            return v
    raise TypeError(
        f"metric {key!r} has value {value!r} of type {type(value).__name__}; "
        "log numbers only (int, float, numpy or 0-d torch scalars)"
    )

