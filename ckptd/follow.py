"""Following a run as it writes (``ckptd tail -f``) without busy polling.

The daemon's commits touch ``ckptd.db-wal``; a watchdog observer on the home
wakes the follower on each change. Where inotify is unavailable (some network
filesystems, exhausted watches) it falls back to polling every 200 ms.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .query import Cursor, Line, Reader

#: Longest wait between checks even when watchdog reports nothing (a safety
#: net for missed events); the fallback poll interval when watchdog is absent.
SAFETY_INTERVAL = 1.0
POLL_INTERVAL = 0.2
#: Pause between looks right after a change was signalled but not yet visible.
SETTLE_INTERVAL = 0.02
#: How many such looks before going back to waiting for the next change.
SETTLE_LOOKS = 25


class _Waker:
    def __init__(self, home: Path) -> None:
        self.event = threading.Event()
        self.interval = POLL_INTERVAL
        self._observer: Any = None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            event = self.event

            class Handler(FileSystemEventHandler):
                def on_modified(self, ev: Any) -> None:
                    if os.path.basename(ev.src_path).startswith("ckptd.db"):
                        event.set()

                on_created = on_modified
                on_closed = on_modified

            observer = Observer()
            observer.schedule(Handler(), os.fspath(home))
            observer.start()
            self._observer = observer
            self.interval = SAFETY_INTERVAL
        except Exception:  # noqa: BLE001 - no inotify: poll instead
            self._observer = None

    def arm(self) -> None:
        """Forget earlier wake-ups; called right *before* each query, so a
        change that lands during the query still wakes the next ``wait``."""
        self.event.clear()

    def wait(self, settling: bool) -> bool:
        """Wait for a change; True if woken by one.

        A WAL write wakes us before SQLite has fsynced and published the
        commit in its index, so a query right after the event can still see
        the old snapshot. While ``settling`` (a change was seen but no new row
        yet) we look again after a short pause instead of sleeping the whole
        safety interval.
        """
        return self.event.wait(SETTLE_INTERVAL if settling else self.interval)

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)


def output_closed(fd: int) -> bool:
    """True once the reader of our stdout pipe went away (``| head`` exited).

    ``tail -f`` with nothing new to print would otherwise only learn of it at
    its next write, which may never come on a quiet run.
    """
    try:
        poller = select.poll()
        poller.register(fd, select.POLLERR)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def follow(reader: Reader, run_id: str, cursor: Cursor, *, with_metrics: bool,
           all_attempts: bool, until_done: bool = False,
           stop: threading.Event | None = None, out_fd: int | None = None,
           rank: int | None = 0) -> Iterator[Line]:
    """Yield new lines of ``run_id`` as they are committed, forever (or until
    the run ends, with ``until_done``, or ``out_fd``'s reader goes away)."""
    waker = _Waker(reader.home)
    settle = 0
    try:
        while stop is None or not stop.is_set():
            if out_fd is not None and output_closed(out_fd):
                return
            waker.arm()
            # the state is read before the lines: whatever the run wrote before
            # it ended is then in this query, and nothing is cut off at the end
            going = not until_done or reader.still_going(run_id)
            lines, cursor = reader.lines(run_id, with_metrics=with_metrics,
                                         all_attempts=all_attempts, after=cursor, rank=rank)
            yield from lines
            if not going and not lines:
                return
            if lines:
                settle = 0
            woken = waker.wait(settling=settle > 0)
            if woken:
                settle = SETTLE_LOOKS
            elif settle:
                settle -= 1
    finally:
        waker.close()
