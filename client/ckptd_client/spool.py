"""The client's on-disk spool: where events go while the daemon is unreachable.

Layout: ``<home>/spool/<run>.<attempt>.<pid>.<n>.spool``, one record a line::

    <crc32 of json, 8 hex digits> <json message>\\n

A writer holds an exclusive ``flock`` on its file for as long as it may still
append. The daemon ingests only files it can lock, so it never reads a file
that is still growing, and a writer killed with ``kill -9`` releases its lock
with its process. A torn last line (power loss mid-append) fails its checksum
and is skipped; every line before it is intact.

Files are created as ``*.partial``, locked, then renamed to ``*.spool``: the
daemon never sees an unlocked ``*.spool``. It removes a ``*.partial`` only once
it is ``STALE_PARTIAL`` seconds old and unlocked (a writer killed between
create and rename); a fresh one is being locked right now, and unlinking it
then made the rename fail and the writer's events fall back to memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUFFIX = ".spool"
PARTIAL_SUFFIX = ".partial"

#: Age after which an unlocked ``*.partial`` is a dead writer's, not one being created.
STALE_PARTIAL = 60.0

_counter = itertools.count()


def encode_record(body: bytes) -> bytes:
    """One spool line for a JSON object ``body`` (its wire frame body plus identity)."""
    return b"%08x %s\n" % (zlib.crc32(body), body)


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a create, rename or unlink in ``path``) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    """One spool file, open and locked while the daemon cannot be reached."""

    def __init__(self, directory: Path, run_id: str, attempt: int, src: str = "c") -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = f"{run_id}.{attempt}.{src}.{os.getpid()}.{next(_counter)}.{os.urandom(3).hex()}"
        partial = directory / (stem + PARTIAL_SUFFIX)
        self.path = directory / (stem + SUFFIX)
        self._dir = directory
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # CRASH WINDOW: killed here, the empty *.partial is removed by the
            # daemon once stale; nothing was written to it yet.
            os.rename(partial, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        self._fd = fd

    def append(self, data: bytes) -> None:
        """Append encoded records. ``os.write`` puts them in the kernel: a
        ``kill -9`` of the trainer after this returns loses nothing."""
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def sync(self) -> None:
        """Make every appended record survive power loss (file and its name)."""
        os.fsync(self._fd)
        fsync_dir(self._dir)

    def forget(self) -> None:
        """Drop this process's descriptor without syncing: a forked child's copy
        of its parent's spool, which the parent still appends to and holds locked
        (the lock lives while any descriptor of the open file does)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def close(self, sync: bool = True) -> None:
        """Release the file to the daemon. Syncing first means a handed-over
        spool file is durable before anyone may rely on it."""
        if self._fd < 0:
            return
        try:
            if sync:
                self.sync()
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = -1


def parse_record(line: bytes) -> dict[str, Any] | None:
    """One spool line's message, or None for a torn or corrupt line."""
    if not line.endswith(b"\n") or len(line) < 10:
        return None  # torn tail
    crc, _, body = line[:-1].partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        msg = json.loads(body)
    except ValueError:
        return None
    if isinstance(msg, dict) and isinstance(msg.get("t"), str):
        return msg
    return None


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the intact records of a spool file, skipping corrupt lines."""
    with open(path, "rb") as f:
        for line in f:
            msg = parse_record(line)
            if msg is not None:
                yield msg


def read_batch(path: Path, offset: int, max_bytes: int) -> tuple[list[dict[str, Any]], int, bool]:
    """The intact records of about ``max_bytes`` of a spool file from ``offset``.

    Returns ``(records, next_offset, at_end)``: a reader holds one batch in
    memory, never the whole file, and can resume at ``next_offset``.
    """
    out: list[dict[str, Any]] = []
    pos = offset
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        for line in f:
            pos += len(line)
            msg = parse_record(line)
            if msg is not None:
                out.append(msg)
            if pos - offset >= max_bytes:
                break
    return out, pos, pos >= size


def try_lock(path: Path) -> int | None:
    """Open and lock ``path`` if no writer holds it; the caller closes the fd."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def stale_partial(path: Path) -> bool:
    """True for a ``*.partial`` old enough to be a dead writer's (see module doc)."""
    try:
        return time.time() - os.stat(path).st_mtime > STALE_PARTIAL
    except FileNotFoundError:
        return False
