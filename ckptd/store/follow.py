"""Following a run as it writes (``ckptd tail -f``), cheaply.

A follower looks at most :data:`LOOKS_PER_SECOND` times a second, and each
look first asks SQLite whether anything at all was committed since the last
one (``PRAGMA data_version``: no I/O, it reads the WAL index). Only then does
it run its queries, which seek by rowid to just the new rows.

Waking on every write to ``ckptd.db-wal`` (inotify) instead cost an idle
run's follower ~30% of a core while another run logged (issue 8.16), and a
WAL write comes before its commit is visible anyway.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator

from ckptd.store.query import Cursor, Line, Reader

#: Most looks per second: new lines show up within 1/LOOKS_PER_SECOND s.
LOOKS_PER_SECOND = 10


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
    stop = stop or threading.Event()
    seen: int | None = None
    while not stop.is_set():
        if out_fd is not None and output_closed(out_fd):
            return
        # read the version *before* the queries: a commit landing during them
        # changes it again, so the next look sees that commit
        version = reader.data_version()
        if version != seen:
            seen = version
            # the state is read before the lines: whatever the run wrote before
            # it ended is then in this query, and nothing is cut off at the end
            going = not until_done or reader.still_going(run_id)
            lines, cursor = reader.lines(run_id, with_metrics=with_metrics,
                                         all_attempts=all_attempts, after=cursor, rank=rank)
            yield from lines
            if not going:
                if not lines:
                    return
                # ended: look again at once, not only after the next commit
                # (after the run's last one there may be none: it never exited)
                seen = None
        stop.wait(1.0 / LOOKS_PER_SECOND)
