"""Run management in the daemon: rename, tag, note and remove runs.

The CLI (:mod:`ckptd.cli_manage`) resolves names to run ids read-only and
sends one RPC per change; every write happens here, in the writer thread
(:meth:`Daemon.call_writer`), so ``store`` stays the only SQLite writer.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client import paths
from ckptd_client.errors import NotFound, UsageError
from ckptd_client.identity import valid_run_id
from ckptd_client.spool import fsync_dir

from ckptd.daemon.checkpoints import run_lock

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon

log = logging.getLogger("ckptd.manage")

#: A run directory being removed: renamed to this first, so a crash half-way
#: through ``rmtree`` never leaves something that looks like a run's files.
REMOVING_SUFFIX = ".ckptd-rm"
MAX_NAME = 200
MAX_TAG = 100
MAX_NOTE = 10_000


def _run_id(op: str, args: dict[str, Any]) -> str:
    run = args.get("run")
    if not isinstance(run, str) or not valid_run_id(run):
        raise NotFound(f"{op}: no run {run!r}")
    return run


def check_text(op: str, what: str, value: object, limit: int, *, spaces: bool = True) -> str:
    """A name, tag or note as given by a person: non-empty, bounded, printable."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{op}: the {what} must be a non-empty string")
    if len(value) > limit:
        raise UsageError(f"{op}: the {what} is {len(value)} characters; at most {limit}")
    allowed = "\n\t" if what == "note" else ""
    if any((ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0) and c not in allowed for c in value):
        raise UsageError(f"{op}: the {what} {value!r} holds control characters")
    if not spaces and any(c.isspace() or c == "," for c in value):
        raise UsageError(f"{op}: the {what} {value!r} holds a space or comma; tags are "
                         "single words (e.g. baseline, lr-sweep)")
    return value


def rpc_rename(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    run = _run_id("rename", args)
    name = check_text("rename", "new name", args.get("name"), MAX_NAME)
    daemon.call_writer(lambda store: store.rename_run(run, name))
    return {"id": run, "name": name}


def rpc_note(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    run = _run_id("note", args)
    text = args.get("text")
    if text == "":
        text = None  # `ckptd note RUN ""` clears it
    else:
        text = check_text("note", "note", text, MAX_NOTE)
    daemon.call_writer(lambda store: store.note_run(run, text))
    return {"id": run, "note": text}


def rpc_tag(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    run = _run_id("tag", args)
    tags = args.get("tags")
    if not isinstance(tags, list) or not tags:
        raise UsageError("tag: give at least one tag")
    tags = [check_text("tag", "tag", t, MAX_TAG, spaces=False) for t in tags]
    untag = bool(args.get("untag"))
    now = daemon.call_writer(lambda store: store.tag_run(run, tags, untag))
    return {"id": run, "tags": now}


def rpc_rm(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    """Remove a run: its files first out of sight, then its rows, then the files.

    CRASH WINDOW (after the rename, before the rows go): the run is still
    listed but its checkpoints are gone; ``rm`` again finishes it, and the
    start-up sweep deletes the renamed directory. CRASH WINDOW (after the
    rows, during the ``rmtree``): only the renamed directory is left; the
    start-up sweep deletes it. No crash leaves rows pointing at torn files
    that ``restore()`` could pick: the rows' files never change, they vanish.

    A run whose checkpoints live in a shared directory (``checkpoints`` is a
    link to ``D/<run-id>``, :mod:`ckptd.daemon.shared_dir`) has that
    directory renamed aside (``D/<run-id>.ckptd-rm``) first, the same way.
    """
    run = _run_id("rm", args)
    with run_lock(run):  # no checkpoint commit, gc or verify of this run meanwhile
        row = daemon.call_writer(lambda store: store.removable(run))
        home = daemon.home
        src = paths.run_dir(home, run)
        gone = src.with_name(src.name + REMOVING_SUFFIX)
        shared = None if row.get("node_rank") else _shared_checkpoints(
            paths.checkpoints_dir(home, run), run)
        if shared is not None and shared.exists():
            # CRASH WINDOW (after this rename, before the home's): the run is
            # still listed, its checkpoints gone; ``rm`` again finishes it.
            os.rename(shared, _aside(shared))
            fsync_dir(shared.parent)
        if src.exists():
            os.rename(src, gone)
            fsync_dir(src.parent)
        removed = daemon.call_writer(lambda store: store.remove_run(run))
        if shared is not None:
            shutil.rmtree(_aside(shared), ignore_errors=True)
            fsync_dir(shared.parent)
        shutil.rmtree(gone, ignore_errors=True)
        if gone.parent.exists():
            fsync_dir(gone.parent)
    return removed


def _aside(path: Path) -> Path:
    return path.with_name(path.name + REMOVING_SUFFIX)


def _shared_checkpoints(link: Path, run: str) -> Path | None:
    """``D/<run-id>`` when ``link`` (a run's ``checkpoints``) points into a shared
    checkpoint directory, else None. Only a link that names ``<run-id>`` in an
    absolute directory counts, and only a real directory there of this user's
    (a link there is never followed out of ``D``): anything else is left alone."""
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link))
    if not target.is_absolute() or target.name != run or ".." in target.parts:
        return None
    for candidate in (target, _aside(target)):  # _aside: a crash in an earlier rm
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return target
    return None


def sweep_removed(home: Path) -> list[Path]:
    """Delete run directories a crash left half-removed (see :func:`rpc_rm`),
    and the shared checkpoint directories their links name."""
    root = home / paths.RUNS_DIR
    found = [p for p in root.iterdir() if p.name.endswith(REMOVING_SUFFIX)] \
        if root.is_dir() else []
    for p in found:
        log.info("removing %s (a crash during `ckptd rm`)", p)
        run = p.name[:-len(REMOVING_SUFFIX)]
        shared = _shared_checkpoints(p / paths.checkpoints_dir(home, run).name, run) \
            if valid_run_id(run) else None
        if shared is not None and _aside(shared).is_dir():
            shutil.rmtree(_aside(shared), ignore_errors=True)
        shutil.rmtree(p, ignore_errors=True)
    return found


def startup(daemon: Daemon) -> None:
    try:
        sweep_removed(daemon.home)
    except OSError as exc:  # a sweep must never stop the daemon from serving
        log.warning("cannot sweep removed runs: %s", exc)



__all__ = ["REMOVING_SUFFIX", "check_text", "sweep_removed"]
