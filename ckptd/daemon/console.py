"""The daemon's copy of a supervised command's output pipes.

``ckptd run`` reads its command's stdout/stderr through pipes (or a pty).
If only the supervisor held their read ends, a ``kill -9`` of the
supervisor would leave the pipes without a reader, and the command would
die at its next ``print`` (EPIPE, ``BrokenPipeError``): the supervisor's
death would kill the training. So the supervisor hands the daemon a
duplicate of each read end (SCM_RIGHTS, on a connection of its own) as soon
as the command started. While the supervisor lives the daemon only holds
them. When that connection ends without a ``console_release`` (the
supervisor died), the daemon starts reading them itself and records every
later line as console output of the attempt, until the command and its
children have closed their ends. The supervisor re-hands them to a
restarted daemon.

Only when the supervisor and the daemon are both gone does the command lose
its last reader (a double fault); a daemon stopping while it reads for an
orphaned command closes its copies too (say so in the stop warning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

from ckptd_client import paths, protocol
from ckptd_client.distributed import line_rank
from ckptd_client.identity import valid_run_id

from ckptd.daemon import validate

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon
    from ckptd.store.writer import Store

log = logging.getLogger("ckptd.console")

#: {run, attempt, streams: ["stdout", "stderr"]} with one passed fd per stream.
CONSOLE_FDS = "console_fds"
#: The supervisor read everything itself: the daemon closes its copies.
CONSOLE_RELEASE = "console_release"
STREAMS = ("stdout", "stderr")

_released: set[Conn] = set()
_guard = threading.Lock()
_seq_last = 0


def on_console_fds(daemon: Daemon, msg: dict[str, Any], conn: Conn) -> None:
    """Keep the supervisor's read ends; adopt them if its connection dies unreleased."""
    run, attempt, streams = msg.get("run"), msg.get("attempt"), msg.get("streams")
    if not isinstance(run, str) or not valid_run_id(run):
        raise validate.Invalid("console_fds: run must be a run id")
    validate._int(msg, "attempt", minimum=1)
    if not isinstance(streams, list) or not 0 < len(streams) <= len(conn.fds) \
            or any(s not in STREAMS for s in streams):
        raise validate.Invalid("console_fds: streams must name one passed fd each")
    fds = conn.fds[:len(streams)]
    del conn.fds[:len(streams)]
    pairs = list(zip(fds, streams, strict=True))

    def closed() -> None:
        with _guard:
            released = conn in _released
            _released.discard(conn)
        if released or daemon.stop.is_set():
            for fd, _ in pairs:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return
        threading.Thread(target=adopt, args=(daemon, run, int(attempt), pairs),  # type: ignore[arg-type]
                         name=f"console-{run}", daemon=True).start()

    conn.on_close.append(closed)


def on_console_release(daemon: Daemon, msg: dict[str, Any], conn: Conn) -> None:
    with _guard:
        _released.add(conn)


def _next_seq() -> int:
    """Sequence numbers of the daemon's console lines: nanoseconds, so they
    never meet :meth:`Store.record_event`'s microsecond ones."""
    global _seq_last
    with _guard:
        _seq_last = max(_seq_last + 1, time.time_ns())
        return _seq_last


def adopt(daemon: Daemon, run: str, attempt: int, pairs: list[tuple[int, str]]) -> None:
    """Read an orphaned command's output to its end, recording every line."""
    from ckptd.supervise.supervisor import LineSplitter

    where = paths.run_dir(daemon.home, run)
    _record(daemon, run, attempt, [], note=(
        f"the supervisor of attempt {attempt} went away; the command runs on, and ckptd "
        f"records its output itself from now on (run dir {where})"))
    log.info("run %s attempt %d: supervisor gone, reading its command's output", run, attempt)
    live = {fd: (stream, LineSplitter()) for fd, stream in pairs}
    try:
        while live and not daemon.stop.is_set():
            try:
                ready, _, _ = select.select(list(live), [], [], 1.0)
            except InterruptedError:
                continue
            lines: list[tuple[str, str]] = []
            for fd in ready:
                stream, splitter = live[fd]
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: a pty whose other side closed
                    data = b""
                if data:
                    lines += [(stream, ln) for ln in splitter.feed(data)]
                else:
                    lines += [(stream, ln) for ln in splitter.close()]
                    del live[fd]
                    os.close(fd)
            if lines:
                _record(daemon, run, attempt, lines)
    finally:
        for fd in live:
            with contextlib.suppress(OSError):
                os.close(fd)


def _record(daemon: Daemon, run: str, attempt: int, lines: list[tuple[str, str]],
            note: str | None = None) -> None:
    now = time.time()
    events = []
    for stream, line in lines:
        rank, text = line_rank(line)  # a torchrun rank's line, as the supervisor reads it
        msg = {"t": protocol.CONSOLE, "seq": _next_seq(), "time": now, "stream": stream,
               "text": text}
        if rank is not None:
            msg["rank"] = rank
        events.append((run, attempt, "d", msg))

    def work(store: Store) -> None:
        if note:
            store.record_event(run, attempt, note, "warning")
        if events:
            store.apply(events)

    try:
        daemon.call_writer(work, timeout=60)
    except Exception as exc:  # noqa: BLE001 - the store may be what failed; keep reading
        log.warning("run %s: could not record console output: %s", run, exc)



__all__ = ["CONSOLE_FDS", "CONSOLE_RELEASE", "adopt"]
