"""Checkpoints, daemon side: commit protocol, reconciliation, verify, gc, export.

A trainer's CKPT message carries the descriptor of its snapshot buffer (an
anonymous memfd, SCM_RIGHTS) and the tensor layout (see
``ckptd_client.checkpoint``). The daemon checks that descriptor at once (it
stays readable even if the trainer dies now), then, in a worker thread:

1. checks free space, and writes ``tensors.bin`` into
   ``runs/<run>/checkpoints/step-<N>.ckptd-tmp/`` while hashing it;
2. fsyncs it, writes ``manifest.json``, fsyncs it and the staging directory;
3. renames the staging directory to ``step-<N>/`` and fsyncs the parent;
4. commits the row through the writer (``daemon.call_writer``);
5. replies CKPT_DONE; only now may the trainer reuse its buffer;
6. applies the run's retention policy (never to the newest checkpoint).

Each step's crash window is named at the step. "Latest" always comes from
committed rows, never from directory listings or modification times.

At start (:func:`reconcile`) staging leftovers are removed, a ``step-<N>/``
without a row is recorded only if it is the one this daemon was publishing
(its commit record names its manifest's hash, and the manifest names this
run and step), and a row whose files are missing or fail their hash is
marked corrupt. A step directory that appeared from anywhere else (copied
from another run or step, planted) is never adopted. Snapshot buffers need no sweeping: the
kernel frees a memfd once its last descriptor is closed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from ckptd_client import paths
from ckptd_client.checkpoint import format as fmt
from ckptd_client.dcp import read_owner
from ckptd_client.errors import CheckpointError, CkptdError, DiskFull, NotFound
from ckptd_client.identity import boot_id, valid_run_id
from ckptd_client.spool import fsync_dir

from ckptd import retention
from ckptd.daemon import validate
from ckptd.daemon.crashpoints import crashpoint, slow_commit
from ckptd.daemon.liveness import process_alive

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon
    from ckptd.store.writer import Store

log = logging.getLogger("ckptd.checkpoints")

#: Test-only: skip the free-space check so a test can hit ENOSPC in the middle
#: of writing (the path a race with another writer takes in production).
SKIP_SPACE_CHECK_ENV = "CKPTD_TEST_SKIP_SPACE_CHECK"
#: Bytes per write() when copying the snapshot to disk. Measured on ext4
#: (Linux 6.x): 1 MiB writes run at dd speed, while 2-16 MiB writes were
#: 2-6x slower at times (large page-cache folios needing compaction).
WRITE_CHUNK = 1 << 20

_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def run_lock(run_id: str) -> threading.RLock:
    """One lock per run: commits, pruning, verify and gc of a run never overlap
    (reentrant: gc holds it while it prunes)."""
    with _locks_guard:
        return _locks.setdefault(run_id, threading.RLock())


@dataclass
class Request:
    """A validated CKPT message."""

    id: int
    run: str
    attempt: int
    step: int
    size: int
    tree: Any
    tensors: list[dict[str, Any]]
    metrics: dict[str, Any]
    blocked_s: float | None


# ------------------------------------------------------------ the request

def parse_request(msg: dict[str, Any], conn: Conn) -> Request:
    """Check a CKPT message from an untrusted peer.

    :raises validate.Invalid: the message is malformed (the connection is closed).
    """
    if conn.run is None:
        raise validate.Invalid("ckpt before hello")
    for key in ("id", "step", "size"):
        validate._int(msg, key, minimum=0)
    validate._num(msg, "blocked_s", optional=True)
    metrics = msg.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise validate.Invalid("ckpt: metrics must be an object of numbers")
    try:
        fmt.check_specs(msg.get("tensors"), msg["size"])
    except ValueError as exc:
        raise validate.Invalid(f"ckpt: {exc}") from None
    return Request(id=msg["id"], run=conn.run, attempt=conn.attempt, step=msg["step"],
                   size=msg["size"], tree=msg.get("tree"),
                   tensors=msg["tensors"], metrics=metrics, blocked_s=msg.get("blocked_s"))


def claim_snapshot(conn: Conn, req: Request) -> int:
    """The snapshot buffer that came with this request, checked before anything
    reads it: a regular memory file of ours, sealed against shrinking (so
    mapping it can never SIGBUS the daemon), holding ``req.size`` bytes.

    Descriptors arrive with the frames, in order; each request with tensors
    takes the oldest one. Nothing is opened by name, so no path in a request
    can make the daemon read another file.

    :raises CheckpointError: no descriptor came, or it is not an acceptable buffer.
    """
    if not conn.fds:
        raise CheckpointError(f"checkpoint step {req.step}: no snapshot buffer came with the "
                              "request (a client older than this daemon? upgrade it)")
    fd = conn.fds.pop(0)
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() \
            or not seals & fcntl.F_SEAL_SHRINK or st.st_size < req.size:
        os.close(fd)
        raise CheckpointError(f"checkpoint step {req.step}: the snapshot buffer sent is not "
                              f"a sealed memory file of ours holding {req.size} bytes")
    return fd


#: Commits in flight per run; a resume waits for them before a step is chosen.
_inflight: dict[str, int] = {}
_inflight_changed = threading.Condition()
#: How long a resume waits for a run's in-flight commits (a multi-GB one on
#: a slow disk takes minutes); after that it goes on with what is committed.
COMMIT_WAIT_S = 300.0


def await_commits(daemon: Daemon, run_id: str, timeout: float = COMMIT_WAIT_S) -> int:
    """Wait until no checkpoint of ``run_id`` is being committed; return how many
    still are when ``timeout`` ran out (0: none).

    A trainer killed right after ``checkpoint()`` returned may have left its
    CKPT message unread in a connection: those of dead peers count too until
    their reader reached the end. Without this wait a resume picked the step
    before the one still committing.
    """
    from ckptd.daemon.liveness import process_alive

    deadline = time.monotonic() + timeout
    with _inflight_changed:
        while True:
            with daemon.conns_lock:
                unread = [c for c in daemon.conns if c.run == run_id and not c.closed]
            pending = _inflight.get(run_id, 0) + sum(
                not process_alive(c.pid, None) for c in unread)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return pending
            _inflight_changed.wait(min(left, 0.1))


def _commit_started(run_id: str, delta: int) -> None:
    with _inflight_changed:
        _inflight[run_id] = _inflight.get(run_id, 0) + delta
        if _inflight[run_id] <= 0:
            del _inflight[run_id]
        _inflight_changed.notify_all()


def on_ckpt(daemon: Daemon, msg: dict[str, Any], conn: Conn) -> None:
    """MESSAGE_HANDLERS[CKPT]: claim the snapshot, commit it in a worker thread."""
    req = parse_request(msg, conn)
    try:
        fd = claim_snapshot(conn, req) if req.size else -1  # no tensors: no buffer
    except CkptdError as exc:
        _reply(conn, req, None, exc)
        return
    _commit_started(req.run, 1)
    # a clean stop waits for this commit (the snapshot was taken: SPEC promise 3)
    daemon.start_worker(_commit_worker, (daemon, conn, req, fd),
                        name=f"ckpt-{req.run}-{req.step}")


def _commit_worker(daemon: Daemon, conn: Conn, req: Request, fd: int) -> None:
    row: dict[str, Any] | None = None
    error: CkptdError | None = None
    with run_lock(req.run):
        try:
            row = commit_checkpoint(daemon, req, fd)
        except CkptdError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the daemon
            log.exception("checkpoint %s step %d failed", req.run, req.step)
            error = CheckpointError(f"checkpoint step {req.step}: internal error: {exc}")
        finally:
            if fd >= 0:
                os.close(fd)  # the last holder once the trainer is gone: the kernel frees it
            _commit_started(req.run, -1)
    if error is not None:
        log.error("run %s: %s", req.run, error)
        _record(daemon, req.run, req.attempt, f"checkpoint step {req.step} failed: {error}",
                "error", step=req.step)
    _reply(conn, req, row, error)
    if row is not None:
        try:
            prune(daemon, req.run)
        except Exception:  # noqa: BLE001 - retention failing must not undo a commit
            log.exception("retention for run %s failed", req.run)


def _reply(conn: Conn, req: Request, row: dict[str, Any] | None,
           error: CkptdError | None) -> bool:
    if error is not None:
        return conn.send({"t": fmt.CKPT_DONE, "id": req.id, "step": req.step, "ok": False,
                          "error": str(error), "kind": type(error).__name__})
    assert row is not None
    return conn.send({"t": fmt.CKPT_DONE, "id": req.id, "ok": True, "step": req.step,
                      "hash": row["hash"], "bytes": row["bytes"],
                      "persist_s": row["persist_s"]})


# ------------------------------------------------------- commit protocol

def commit_checkpoint(daemon: Daemon, req: Request, fd: int,
                      stage: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Make the snapshot in ``fd`` a committed checkpoint; returns its row.

    ``stage(staging_dir)`` puts more files into the staging directory, made
    durable, before the manifest is written; what it returns is stored in
    the manifest as ``"adopted"`` (``ckptd.adopt``: framework checkpoints).

    :raises DiskFull: not enough space (checked first, or ENOSPC mid-write);
        the staging directory is removed and nothing earlier is touched.
    :raises CheckpointError: any other failure, same guarantees.
    """
    t0 = time.monotonic()
    ckpt_root = paths.checkpoints_dir(daemon.home, req.run)
    name = fmt.step_dir_name(req.step)
    staging = ckpt_root / (name + fmt.STAGING_SUFFIX)
    manifest = {
        "format": fmt.FORMAT, "version": fmt.FORMAT_VERSION, "run": req.run,
        "attempt": req.attempt, "step": req.step, "metrics": req.metrics,
        "created": time.time(), "blocked_s": req.blocked_s, "tree": req.tree,
        "tensors": req.tensors,
    }
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.environ.get(SKIP_SPACE_CHECK_ENV) != "1":
            check_space(ckpt_root, req.size + len(json.dumps(req.tree)) * 2, req.step)
        if staging.exists():
            shutil.rmtree(staging)  # a failed earlier try of this step; we hold the run lock
        staging.mkdir(mode=0o700)
        # CRASH WINDOW (until the rename): a crash leaves only step-<N>.ckptd-tmp/,
        # which no reader looks at and reconcile() removes at the next start.
        timings: dict[str, float] = {}
        checks = write_data(fd, req.size, staging / fmt.DATA_FILE, timings)
        if stage is not None:
            manifest["adopted"] = stage(staging)
        crashpoint("ckpt.staged")
        slow_commit()
        manifest["files"] = {fmt.DATA_FILE: {"bytes": req.size, "chunk": fmt.CHUNK,
                                              **checks}}
        body = json.dumps(manifest, separators=(",", ":")).encode()
        fmt.write_durable(staging / fmt.MANIFEST_FILE, body, exclusive=True)
        # The directory entries of both files must be durable before the
        # rename publishes them, or a power cut could leave step-<N>/ empty.
        fsync_dir(staging)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"checkpoint step {req.step}: write {staging}: disk full "
                           f"({exc.strerror}); removed the partial checkpoint, earlier ones "
                           "are untouched. Free space or set a retention policy") from None
        raise CheckpointError(f"checkpoint step {req.step}: write {staging}: "
                              f"{exc.strerror or exc}") from None
    return publish(daemon, req.run, req.attempt, req.step, staging,
                   row_bytes=req.size + len(body), manifest_hash=fmt.content_hash(body),
                   metrics=req.metrics, blocked_s=req.blocked_s,
                   created=manifest["created"], t0=t0, timings=timings)


def publish(daemon: Daemon, run: str, attempt: int, step: int, staging: Path, *,
            row_bytes: int, manifest_hash: str, metrics: dict[str, Any], blocked_s: float,
            created: float, t0: float, timings: dict[str, float]) -> dict[str, Any]:
    """Rename a durable staging directory to ``step-<N>/`` and commit its row
    (steps 3-5 of the module docstring; shared by the DCP commit of many ranks).
    The caller has fsynced every file in ``staging`` and ``staging`` itself.
    """
    ckpt_root = staging.parent
    name = fmt.step_dir_name(step)
    final = ckpt_root / name
    crashpoint("ckpt.before_rename")
    digest = manifest_hash
    intent = ckpt_root / (name + fmt.INTENT_SUFFIX)
    # CRASH WINDOW: a commit record without step-<N>/ (or with the old one):
    # reconcile finds no directory holding that manifest and removes the record.
    # Its directory entry becomes durable with the fsync after the rename; a
    # power cut that loses it loses only this unacknowledged checkpoint.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(intent)
    fmt.write_durable(intent, digest.encode(), exclusive=True)
    replaced = ckpt_root / (name + fmt.REPLACED_SUFFIX)
    if final.exists():
        # Same step committed before (by an attempt that was later resumed
        # from an older step): move it aside instead of deleting it first.
        # CRASH WINDOW: step-<N>/ absent, .ckptd-old present -> reconcile
        # moves it back.
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    else:
        replaced = None  # type: ignore[assignment]
    os.rename(staging, final)
    # CRASH WINDOW: renamed but the parent not fsynced: after a power cut the
    # rename may be lost (back to a staging leftover: removed) or kept (no
    # row yet: recorded by reconcile, because it verifies).
    crashpoint("ckpt.after_rename")
    fsync_dir(ckpt_root)
    crashpoint("ckpt.before_row")
    timings["publish"] = time.monotonic() - t0 - sum(timings.values())
    row = {
        "run_id": run, "step": step, "attempt": attempt, "status": "committed",
        "path": os.fspath(final.relative_to(daemon.home)), "bytes": row_bytes,
        "hash": manifest_hash, "metrics": metrics, "blocked_s": blocked_s,
        "persist_s": round(time.monotonic() - t0, 6), "created": created,
        "reason": None,
    }

    def insert(store: Store) -> None:
        store.put_checkpoint(row)
        store.record_event(run, attempt,
                           f"checkpoint step {step} committed "
                           f"({fmt.human_bytes(row['bytes'])}, blocked {blocked_s or 0:.3f}"
                           f" s, durable after {row['persist_s']:.3f} s)", step=step)

    try:
        daemon.call_writer(insert)
    except Exception as exc:  # noqa: BLE001 - the store is full or broken
        # Without its row the checkpoint must not stay visible as a directory
        # either (reconcile would record it while the trainer was told it failed).
        unpublish(final, ckpt_root)
        if replaced is not None:
            os.rename(replaced, final)
            fsync_dir(ckpt_root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(intent)
        raise CheckpointError(f"checkpoint step {step}: cannot record it in the store: "
                              f"{exc}; the checkpoint was removed") from None
    # CRASH WINDOW: committed, trainer not told yet. Its handle reports a lost
    # connection; `ckptd ckpt ls` shows the checkpoint committed.
    crashpoint("ckpt.after_row")
    # a record left by a crash here is harmless (the row matches) and removed at start
    with contextlib.suppress(FileNotFoundError):
        os.unlink(intent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    timings["row"] = time.monotonic() - t0 - sum(timings.values())
    log.info("run %s: checkpoint step %d committed, %s in %.3f s (%s)", run, step,
             fmt.human_bytes(row["bytes"]), time.monotonic() - t0,
             ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
    return row


def check_space(where: Path, needed: int, step: int) -> None:
    """Refuse before staging when the disk cannot take the checkpoint plus a margin
    (the store and the spool live on the same disk and must keep working)."""
    usage = psutil.disk_usage(os.fspath(where))
    margin = min(64 << 20, usage.total // 100)
    if usage.free < needed + margin:
        raise DiskFull(
            f"checkpoint step {step}: needs {fmt.human_bytes(needed)} but only "
            f"{fmt.human_bytes(usage.free)} is free on {where} (keeping "
            f"{fmt.human_bytes(margin)} for the store); free space or set a retention "
            "policy (`ckptd ckpt gc`)")


#: Bytes hashed per hand-over to the hashing thread: large enough that the
#: hand-overs cost nothing, small enough that the writer is never far behind.
HASH_BATCH = 16 << 20
#: Batches the hasher may be ahead of the writer (bounds nothing but time:
#: both read the same snapshot mapping).
HASH_AHEAD = 4


def write_data(src_fd: int, size: int, path: Path,
               timings: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Copy ``size`` bytes of the snapshot to ``path`` and fsync it, hashing as it goes.

    Two threads, one pass each: this one writes the snapshot in PIECEs,
    starting writeback of each finished CHUNK at once (sync_file_range) so
    the final fsync waits only for the tail; a second thread hashes it
    (blake3, ~7 GB/s a core, for ``ckpt verify``; xxh3-128, ~30 GB/s, for
    restore), HASH_BATCH at a time, both hashes releasing the GIL. Hashing
    in the writer's own loop left the disk idle while it hashed: at 4 GiB
    that was 1.2x dd of the same bytes against 1.0x for the bare writes
    (issue 11). The snapshot does not change while it is written (the
    trainer's next checkpoint waits for this one), so both threads read the
    same bytes. Returns the manifest's chunk checks (without the xxhash
    package: blake3 alone, and restore checks that).
    """
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    t0 = time.monotonic()
    # read-only shared mapping: populating it maps the existing pages, no copy
    mm = mmap.mmap(src_fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                   prot=mmap.PROT_READ) if size else None
    hasher = fmt.ChunkHasher(tuple(a for a in fmt.WRITE_CHECKS if fmt.available(a)))
    view = memoryview(mm) if mm is not None else memoryview(b"")
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptd-write-hash")
    hashed: collections.deque[concurrent.futures.Future[None]] = collections.deque()
    try:
        off = 0
        started = 0  # bytes whose writeback was started
        queued = 0  # bytes handed to the hashing thread, in order
        piece = view[0:0]
        while off < size:
            while queued < size and queued < off + HASH_AHEAD * HASH_BATCH:
                end = min(queued + HASH_BATCH, size)
                hashed.append(pool.submit(hasher.update, view[queued:end]))
                queued = end
            piece = view[off:min(off + fmt.PIECE, size)]
            while piece:
                n = os.write(out, piece)
                piece, off = piece[n:], off + n
            if off - started >= fmt.CHUNK:
                fmt.start_writeback(out, started, off - started)
                started = off
            while hashed and hashed[0].done():
                hashed.popleft().result()  # a hashing error surfaces here
        del piece
        while hashed:
            hashed.popleft().result()
        t1 = time.monotonic()
        # CRASH WINDOW closed here: after fsync every byte the hashes describe is on disk.
        os.fsync(out)
        if timings is not None:
            timings.update(write_hash=t1 - t0, fsync=time.monotonic() - t1)
    finally:
        for f in hashed:
            f.cancel()
        pool.shutdown(wait=True)
        os.close(out)
        view.release()
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
    return hasher.all_digests()


def unpublish(ckpt_dir: Path, ckpt_root: Path) -> None:
    """Remove a checkpoint directory without ever leaving a half-deleted ``step-<N>/``."""
    doomed = ckpt_root / (ckpt_dir.name + fmt.STAGING_SUFFIX)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(ckpt_dir, doomed)
    # CRASH WINDOW: renamed, not deleted: a staging leftover, removed at start.
    fsync_dir(ckpt_root)
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------- retention

def prune(daemon: Daemon, run_id: str) -> list[int]:
    """Apply the run's retention policy; returns the deleted steps.

    Called after a commit, so a newer checkpoint exists; the newest committed
    checkpoint is never deleted (:func:`retention.to_delete`).
    """
    rows, spec = daemon.call_writer(
        lambda store: (store.checkpoint_rows(run_id), store.run_retention(run_id)))
    if spec is None:
        return []
    try:
        policy = retention.from_dict(spec)
    except (ValueError, TypeError) as exc:
        log.warning("run %s: retention %r is invalid (%s); keeping everything", run_id, spec,
                    exc)
        return []
    committed = [r for r in rows if r["status"] == "committed"]
    steps = retention.to_delete(policy, committed)
    with run_lock(run_id):
        for step in steps:
            delete_checkpoint(daemon, run_id, step, "retention policy")
    return steps


def delete_checkpoint(daemon: Daemon, run_id: str, step: int, why: str) -> None:
    """Row first, then files: a crash in between leaves a directory without a
    row, which reconcile records again (it verifies) and the next prune deletes."""
    daemon.call_writer(lambda store: store.delete_checkpoint(run_id, step))
    ckpt_root = paths.checkpoints_dir(daemon.home, run_id)
    ckpt_dir = ckpt_root / fmt.step_dir_name(step)
    if ckpt_dir.exists():
        unpublish(ckpt_dir, ckpt_root)
    log.info("run %s: deleted checkpoint step %d (%s)", run_id, step, why)


# ----------------------------------------------------------- reconcile

#: What start-up found on disk: ``(run, step, dir or None, commit record or None)``.
Found = list[tuple[str, int, "Path | None", "str | None"]]


def sweep_leftovers(home: Path) -> Found:
    """Synchronous part of the start-up reconcile (no client is connected yet).

    Removes staging directories, finishes interrupted replacements; returns
    every step directory and commit record (see :data:`Found`).
    """
    found: Found = []
    root = home / paths.RUNS_DIR
    for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
        ckpt_root = paths.checkpoints_dir(home, run_dir.name)
        if not ckpt_root.is_dir() or not valid_run_id(run_dir.name):
            continue
        changed = False
        for entry in sorted(ckpt_root.iterdir()):
            if entry.name.endswith(fmt.STAGING_SUFFIX) and _writer_lives(entry):
                log.info("keeping %s: its writer (rank 0 of a DCP checkpoint) runs", entry)
            elif entry.name.endswith(fmt.STAGING_SUFFIX):
                log.info("removing staging leftover %s (a crash during a commit)", entry)
                shutil.rmtree(entry, ignore_errors=True)
                changed = True
            elif entry.name.endswith(fmt.REPLACED_SUFFIX):
                base = ckpt_root / entry.name[: -len(fmt.REPLACED_SUFFIX)]
                if base.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    log.info("restoring %s (a crash while replacing it)", base)
                    os.rename(entry, base)
                changed = True
        if changed:
            fsync_dir(ckpt_root)
        records: dict[int, str | None] = {}
        dirs: dict[int, Path] = {}
        for entry in sorted(ckpt_root.iterdir()):
            if entry.name.endswith(fmt.INTENT_SUFFIX):
                step = fmt.parse_step_dir(entry.name[: -len(fmt.INTENT_SUFFIX)])
                if step is not None:
                    records[step] = _read_record(entry)
                continue
            step = fmt.parse_step_dir(entry.name)
            if step is not None and entry.is_dir() and not entry.is_symlink():
                dirs[step] = entry
        for step in sorted(dirs.keys() | records.keys()):
            found.append((run_dir.name, step, dirs.get(step), records.get(step)))
    return found


def _writer_lives(staging: Path) -> bool:
    """Whether the process that writes a DCP staging directory still runs
    (``ckptd_client.dcp.OWNER_FILE``): the ranks write it, not a daemon, and
    outlive this daemon's predecessor. A writer on another host cannot be
    judged here: its own node's daemon removes it once it is gone."""
    owner = read_owner(staging)
    if owner is None or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("host") != socket.gethostname():
        return True
    return owner.get("boot") == boot_id() and process_alive(owner["pid"], owner.get("started"))


def _read_record(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(200).decode("ascii", "replace").strip() or None
    except OSError:
        return None


def _adoptable(run: str, step: int, d: Path, record: str | None) -> tuple[dict[str, Any], str]:
    """Check a step directory the store has no (matching) row for before recording it.

    Only what this daemon was publishing qualifies: its commit record names
    this manifest's hash, and the manifest names this run and step. A
    directory copied from another run or step, or planted, is refused.

    :raises CheckpointError: saying why it is not adopted.
    """
    if record is None:
        raise CheckpointError(f"{d}: no commit record (ckptd did not write it here)")
    manifest, digest = fmt.verify_dir(d, record)
    if manifest.get("run") != run or manifest.get("step") != step:
        raise CheckpointError(f"{d}: its manifest is of run {manifest.get('run')!r} step "
                              f"{manifest.get('step')!r}, not this run and step")
    return manifest, digest


def reconcile_rows(daemon: Daemon, found: Found) -> dict[str, int]:
    """Make rows agree with directories (see the module docstring); returns counts.

    The newest committed checkpoint of each run (the one a restore picks)
    is re-hashed in full; older ones get the cheap checks (manifest hash,
    file size); ``ckptd ckpt verify`` re-hashes everything.
    """
    rows = daemon.call_writer(lambda store: store.checkpoint_rows(None))
    by_key = {(r["run_id"], r["step"]): r for r in rows}
    on_disk = {(run, step): d for run, step, d, _ in found if d is not None}
    records = {(run, step): rec for run, step, _, rec in found if rec is not None}
    newest: dict[str, int] = {}
    for r in rows:
        if r["status"] == "committed":
            newest[r["run_id"]] = max(newest.get(r["run_id"], -1), r["step"])
    counts = {"recorded": 0, "corrupt": 0, "not adopted": 0}
    for (run, step), d in sorted(on_disk.items()):
        row = by_key.get((run, step))
        if row is not None:
            continue
        with run_lock(run):
            try:
                manifest, digest = _adoptable(run, step, d, records.get((run, step)))
            except CheckpointError as exc:
                # Not ours to vouch for (planted, copied, or torn before its
                # record): never listed, never restored; left for a person to look at.
                log.warning("run %s: not adopting %s: %s", run, d, exc)
                counts["not adopted"] += 1
                continue
            log.info("run %s: recording checkpoint step %d (committed on disk, no row: a "
                     "crash right before its row)", run, step)
            _put(daemon, _row_for(daemon, run, step, d, manifest, digest, "committed", None))
            counts["recorded"] += 1
    for (run, step), row in sorted(by_key.items()):
        if row["status"] != "committed":
            continue
        d = on_disk.get((run, step))
        with run_lock(run):
            reason = None
            if d is None:
                reason = "files missing"
            else:
                try:
                    if step == newest.get(run):
                        fmt.verify_dir(d, row["hash"])
                    else:
                        manifest, _ = fmt.read_manifest(d, row["hash"])
                        size = manifest["files"][fmt.DATA_FILE]["bytes"]
                        if (d / fmt.DATA_FILE).stat().st_size != size:
                            reason = f"{d / fmt.DATA_FILE}: wrong size"
                        else:  # adopted or DCP files: present, with their sizes
                            fmt.verify_extra_files(d, manifest, sizes_only=True)
                except CheckpointError as exc:
                    reason = str(exc)
                    with contextlib.suppress(CheckpointError):
                        # a replacement committed on disk whose row was not yet updated
                        manifest, digest = _adoptable(run, step, d, records.get((run, step)))
                        _put(daemon, _row_for(daemon, run, step, d, manifest, digest,
                                              "committed", None))
                        continue
                except OSError as exc:
                    reason = f"{d}: {exc.strerror}"
            if reason is not None:
                log.warning("run %s: checkpoint step %d is corrupt: %s", run, step, reason)
                _mark(daemon, run, step, reason)
                counts["corrupt"] += 1
    for (run, step), rec in records.items():
        # every record is settled now: adopted, or nothing of it left to adopt
        # (unless a new commit of that step, which holds the run lock, wrote it anew)
        path = paths.checkpoints_dir(daemon.home, run) / (fmt.step_dir_name(step)
                                                           + fmt.INTENT_SUFFIX)
        with run_lock(run), contextlib.suppress(OSError):
            if _read_record(path) == rec:
                os.unlink(path)
    return counts


def _row_for(daemon: Daemon, run: str, step: int, d: Path, manifest: dict[str, Any] | None,
             digest: str | None, status: str, reason: str | None) -> dict[str, Any]:
    size = None
    if manifest is not None:
        size = manifest["files"][fmt.DATA_FILE]["bytes"] + \
            (d / fmt.MANIFEST_FILE).stat().st_size
    m = manifest or {}
    return {"run_id": run, "step": step, "attempt": m.get("attempt"), "status": status,
            "path": os.fspath(d.relative_to(daemon.home)), "bytes": size, "hash": digest,
            "metrics": m.get("metrics") or {}, "blocked_s": m.get("blocked_s"),
            "persist_s": None, "created": m.get("created"), "reason": reason}


def _put(daemon: Daemon, row: dict[str, Any]) -> None:
    def work(store: Store) -> None:
        store.ensure_run(row["run_id"], row["attempt"] or 1)
        store.put_checkpoint(row)

    daemon.call_writer(work)


def _mark(daemon: Daemon, run: str, step: int, reason: str) -> None:
    def work(store: Store) -> None:
        store.mark_checkpoint(run, step, "corrupt", reason)
        store.record_event(run, _attempt_of(store, run), f"checkpoint step {step} is corrupt: "
                           f"{reason}", "error", step=step)

    daemon.call_writer(work)


def _attempt_of(store: Store, run: str) -> int:
    row = store.conn.execute("SELECT attempt FROM runs WHERE id = ?", (run,)).fetchone()
    return row[0] if row else 1


def _record(daemon: Daemon, run: str, attempt: int, message: str, level: str,
            **fields: Any) -> None:
    """A run event from the daemon; best effort (the store may be what failed)."""
    try:
        daemon.call_writer(lambda store: store.record_event(run, attempt, message, level,
                                                            **fields), timeout=30)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record event for run %s: %s", run, exc)


def startup(daemon: Daemon) -> None:
    """STARTUP_HOOK: sweep files now (before any client connects), fix rows once
    the writer runs (in the background: hashing can take a while)."""
    found = sweep_leftovers(daemon.home)

    def later() -> None:
        try:
            counts = reconcile_rows(daemon, found)
            if any(counts.values()):
                log.info("checkpoint reconcile: %s", counts)
        except Exception:  # noqa: BLE001
            log.exception("checkpoint reconcile failed")

    threading.Thread(target=later, name="ckpt-reconcile", daemon=True).start()


# ------------------------------------------------------------------- RPCs

def _run_ids(daemon: Daemon, args: dict[str, Any]) -> list[str]:
    run = args.get("run")
    if run is None:
        rows = daemon.call_writer(lambda store: store.checkpoint_rows(None))
        return sorted({r["run_id"] for r in rows})
    if not isinstance(run, str) or not valid_run_id(run):
        raise NotFound(f"no run {run!r}")
    return [run]


#: ``ckpt_verify`` status of a checkpoint that retention deleted while the
#: verify ran: gone on purpose, not corrupt.
PRUNED = "pruned"


def rpc_verify(daemon: Daemon, args: dict[str, Any], conn: Conn) -> list[dict[str, Any]]:
    """Re-hash every committed checkpoint of a run (or all runs); mark failures corrupt.

    Each row is read again under the run's lock, which pruning holds while
    it deletes: a checkpoint retention removed after the listing is reported
    ``pruned``, never corrupt (its files are gone on purpose).
    """
    out = []
    for run in _run_ids(daemon, args):
        rows = daemon.call_writer(lambda store, run=run: store.checkpoint_rows(run))
        for listed in rows:
            step = listed["step"]
            with run_lock(run):
                row = _row(daemon, run, step)
                if row is None:
                    out.append({"run": run, "step": step, "status": PRUNED,
                                "reason": "deleted by the retention policy while verifying"})
                    continue
                status, reason = row["status"], row["reason"]
                if status == "committed":
                    d = paths.checkpoints_dir(daemon.home, run) / fmt.step_dir_name(step)
                    try:
                        fmt.verify_dir(d, row["hash"])
                    except CheckpointError as exc:
                        status, reason = "corrupt", str(exc)
                        _mark(daemon, run, step, reason)
            out.append({"run": run, "step": step, "status": status, "reason": reason})
    return out


def _row(daemon: Daemon, run: str, step: int) -> dict[str, Any] | None:
    rows = daemon.call_writer(lambda store: store.checkpoint_rows(run))
    return next((r for r in rows if r["step"] == step), None)


def rpc_await_commits(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, int]:
    """``restore()`` in a new attempt: wait (bounded) for the run's in-flight commits."""
    run, timeout = args.get("run"), args.get("timeout", COMMIT_WAIT_S)
    if not isinstance(run, str) or not valid_run_id(run):
        raise NotFound(f"no run {run!r}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise CkptdError("ckpt_await_commits: timeout must be a number of seconds")
    return {"pending": await_commits(daemon, run, min(float(timeout), COMMIT_WAIT_S))}


def rpc_mark_corrupt(daemon: Daemon, args: dict[str, Any], conn: Conn) -> bool:
    """A restore found a checkpoint failing verification; check it ourselves, then mark."""
    run, step = args.get("run"), args.get("step")
    if not isinstance(run, str) or not valid_run_id(run) or not isinstance(step, int):
        raise NotFound("ckpt_mark_corrupt needs a run id and a step")
    with run_lock(run):
        row = _row(daemon, run, step)
        if row is None or row["status"] != "committed":
            return False
        try:
            fmt.verify_dir(paths.checkpoints_dir(daemon.home, run) / fmt.step_dir_name(step),
                           row["hash"])
            return False
        except CheckpointError as exc:
            _mark(daemon, run, step, str(exc))
            return True


def rpc_gc(daemon: Daemon, args: dict[str, Any], conn: Conn) -> list[dict[str, Any]]:
    """Delete corrupt checkpoints and apply retention now; returns what was deleted."""
    out = []
    for run in _run_ids(daemon, args):
        rows = daemon.call_writer(lambda store, run=run: store.checkpoint_rows(run))
        with run_lock(run):
            for row in rows:
                if row["status"] == "corrupt":
                    delete_checkpoint(daemon, run, row["step"], "corrupt")
                    out.append({"run": run, "step": row["step"], "reason": "corrupt"})
            for step in prune(daemon, run):
                out.append({"run": run, "step": step, "reason": "retention policy"})
    return out


# ------------------------------------------------------------------ export

#: How often ``export`` lists again when retention deleted what it listed.
EXPORT_RELISTS = 20


def export(home: Path, run_id: str, list_rows: Callable[[], list[dict[str, Any]]],
           step: int | None, out: Path,
           write: Callable[[dict[str, Any], Any], None] | None = None,
           write_dir: Callable[[dict[str, Any], Path, dict[str, Any], Path], None] | None
           = None) -> dict[str, Any]:
    """Write one plain ``torch.save`` file of a checkpoint (newest committed that
    verifies, or ``step``); loadable with ``torch.load(weights_only=True)``.
    ``write(obj, file)`` writes another format instead (``ckptd.exports.safetensors``);
    ``write_dir(obj, step_dir, manifest, out)`` writes a directory
    (``ckptd.exports.dcp``; a DCP step is not loaded for it: its files are copied).
    A DCP step (many ranks' shards) exports to a file as its whole state.

    Reads the files directly; the daemon is not needed. The daemon may prune
    meanwhile (retention): a checkpoint whose directory vanished and whose row
    is gone when listed again was deleted on purpose, so it is skipped, never
    reported as failing verification. Once its files are open they stay
    readable (Linux keeps unlinked files for their readers).

    :raises NotFound: no such (committed) checkpoint.
    :raises CheckpointError: it fails verification.
    """
    import torch  # first: importing it takes seconds, during which retention may prune

    vanished: set[int] = set()
    for _ in range(EXPORT_RELISTS):
        found = _load_newest(home, run_id, list_rows(), step, vanished,
                             load_dcp=write_dir is None)
        if found is not None:
            break
    else:
        raise CheckpointError(f"export: retention deleted the checkpoints of run {run_id} "
                              f"{EXPORT_RELISTS} times while they were being read; try again")
    row, payload, step_dir, manifest = found
    # clone: each tensor gets its own storage, not a view of the whole data file
    obj = {"format": "ckptd-export/1", "run": run_id, "step": row["step"],
           "metrics": row.get("metrics") or {},
           "state": fmt.clone_tensors(payload["state"]) if payload else None,
           "rng": fmt.clone_tensors(payload.get("rng")) if payload else None}
    out = out.absolute()
    if write_dir is not None:
        write_dir(obj, step_dir, manifest, out)
        size = sum(p.stat().st_size for p in out.iterdir())
        return {"run": run_id, "step": row["step"], "path": os.fspath(out), "bytes": size}
    tmp = out.with_name(out.name + ".ckptd-tmp")
    with open(tmp, "wb") as f:
        (write or torch.save)(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, out)
    with contextlib.suppress(OSError):
        fsync_dir(out.parent)
    return {"run": run_id, "step": row["step"], "path": os.fspath(out),
            "bytes": out.stat().st_size}


def _load_newest(home: Path, run_id: str, rows: list[dict[str, Any]], step: int | None,
                 vanished: set[int], load_dcp: bool = True
                 ) -> tuple[dict[str, Any], Any, Path, dict[str, Any]] | None:
    """The newest listed checkpoint that loads and verifies, as (row, payload,
    its directory, manifest); None when one vanished (pruned since the listing:
    list again). A step that is listed again after its directory vanished is
    truly missing: an error. A DCP step is verified in full (every shard's
    sha256), then loaded whole unless ``load_dcp`` is False (payload None)."""
    candidates = [r for r in rows if r["status"] == "committed"]
    if step is not None:
        candidates = [r for r in candidates if r["step"] == step]
        if not candidates:
            raise NotFound(f"export: run {run_id} has no committed checkpoint at step {step} "
                           "(retention may have deleted it); `ckptd ckpt ls` lists them")
    if not candidates:
        raise NotFound(f"export: run {run_id} has no committed checkpoint")
    errors = []
    for row in sorted(candidates, key=lambda r: -r["step"]):
        d = paths.checkpoints_dir(home, run_id) / fmt.step_dir_name(row["step"])
        try:
            manifest, _ = fmt.read_manifest(d, row["hash"])
            if manifest.get("dcp"):
                fmt.verify_dir(d, row["hash"])
                payload = None
                if load_dcp:
                    from ckptd.exports.dcp import load_payload

                    payload = load_payload(d)
            else:
                payload, manifest = fmt.load_dir(d, row["hash"], verify=fmt.FULL)
            return row, payload, d, manifest
        except CheckpointError as exc:
            if not d.exists() and row["step"] not in vanished:
                vanished.add(row["step"])
                return None
            errors.append(str(exc))
    raise CheckpointError(f"export: no checkpoint of run {run_id} verifies: "
                          + "; ".join(errors))



__all__ = ["commit_checkpoint", "reconcile_rows", "sweep_leftovers", "prune", "export"]
