"""Checkpoints, daemon side: commit protocol, reconciliation, verify, gc, export.

A trainer's CKPT message names a shared-memory file and its tensor layout
(see ``ckptd_client.checkpoint``). The daemon opens that file at once (so it
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
that verifies but has no row is recorded, and a row whose files are missing
or fail their hash is marked corrupt.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import mmap
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from ckptd_client import checkpoint as fmt
from ckptd_client import paths, protocol
from ckptd_client.errors import CheckpointError, CkptdError, DiskFull, NotFound
from ckptd_client.run import valid_run_id
from ckptd_client.spool import fsync_dir

from . import retention, validate
from .crashpoints import crashpoint
from .daemon import MESSAGE_HANDLERS, PERIODIC_HOOKS, STARTUP_HOOKS, Conn, Daemon, rpc

if TYPE_CHECKING:
    from .store import Store

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
    shm: Path
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
    validate._str(msg, "shm", limit=4096)
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
                   size=msg["size"], shm=Path(msg["shm"]), tree=msg.get("tree"),
                   tensors=msg["tensors"], metrics=metrics, blocked_s=msg.get("blocked_s"))


def open_snapshot(daemon: Daemon, req: Request) -> int:
    """Open the trainer's snapshot file now, before replying to anything.

    Only this home's buffers, owned by us, regular files, no symlinks: the
    CKPT message cannot make the daemon read anything else.

    :raises CheckpointError: the file is not an acceptable snapshot buffer.
    """
    if not req.shm.name.startswith(fmt.shm_prefix(daemon.home)):
        raise CheckpointError(f"checkpoint step {req.step}: {req.shm} is not a snapshot "
                              "buffer of this home")
    try:
        fd = os.open(req.shm, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"checkpoint step {req.step}: open {req.shm}: "
                              f"{exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < req.size:
        os.close(fd)
        raise CheckpointError(f"checkpoint step {req.step}: {req.shm} is not a regular file "
                              f"of ours holding {req.size} bytes")
    return fd


#: Snapshot buffers being committed (never swept).
_reading: set[Path] = set()


def on_ckpt(daemon: Daemon, msg: dict[str, Any], conn: Conn) -> None:
    """MESSAGE_HANDLERS[CKPT]: open the snapshot, commit it in a worker thread."""
    req = parse_request(msg, conn)
    try:
        fd = open_snapshot(daemon, req) if req.size else -1  # no tensors: no buffer
    except CkptdError as exc:
        _reply(conn, req, None, exc)
        return
    with _locks_guard:
        _reading.add(req.shm)
    threading.Thread(target=_commit_worker, args=(daemon, conn, req, fd),
                     name=f"ckpt-{req.run}-{req.step}", daemon=True).start()


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
                os.close(fd)
            with _locks_guard:
                _reading.discard(req.shm)
    if error is not None:
        log.error("run %s: %s", req.run, error)
        _record(daemon, req.run, req.attempt, f"checkpoint step {req.step} failed: {error}",
                "error", step=req.step)
    if not _reply(conn, req, row, error):
        # The trainer is gone (killed right after checkpoint(), or finished
        # while we wrote): nobody will reuse its buffer, so we delete it.
        with contextlib.suppress(OSError):
            os.unlink(req.shm)
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

def commit_checkpoint(daemon: Daemon, req: Request, fd: int) -> dict[str, Any]:
    """Make the snapshot in ``fd`` a committed checkpoint; returns its row.

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
        crashpoint("ckpt.staged")
        manifest["files"] = {fmt.DATA_FILE: {"bytes": req.size, "chunk": fmt.CHUNK,
                                              **checks}}
        body = json.dumps(manifest, separators=(",", ":")).encode()
        write_file(staging / fmt.MANIFEST_FILE, body)
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
        raise CheckpointError(f"checkpoint step {step}: cannot record it in the store: "
                              f"{exc}; the checkpoint was removed") from None
    # CRASH WINDOW: committed, trainer not told yet. Its handle reports a lost
    # connection; `ckptd ckpt ls` shows the checkpoint committed.
    crashpoint("ckpt.after_row")
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


def write_data(src_fd: int, size: int, path: Path,
               timings: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Copy ``size`` bytes of the snapshot to ``path`` and fsync it; hash while writing.

    Hash threads read the shared memory while this thread writes it out and
    waits for the fsync, so the hashes cost no extra wall time on a disk
    slower than sha256 (about 2 GB/s per core). Returns each chunk check.
    """
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    t0 = time.monotonic()
    # read-only shared mapping: populating it maps the existing pages, no copy
    mm = mmap.mmap(src_fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                   prot=mmap.PROT_READ) if size else None
    futures: dict[str, list[Any]] = {}
    try:
        futures = {algo: fmt.submit_chunk_hashes(mm, size, algo, _hash_pool())
                   if mm is not None else [] for algo in fmt.CHECKS}
        if mm is not None:
            view = memoryview(mm)
            off = 0
            while off < size:
                off += os.write(out, view[off:min(off + WRITE_CHUNK, size)])
            view.release()
        t1 = time.monotonic()
        os.fsync(out)
        t2 = time.monotonic()
        checks = {algo: [f.result() for f in fs] for algo, fs in futures.items()}
        if timings is not None:
            timings.update(write=t1 - t0, fsync=t2 - t1, hash_wait=time.monotonic() - t2)
    finally:
        os.close(out)
        if mm is not None:
            for fs in futures.values():
                for f in fs:
                    f.cancel()
            with contextlib.suppress(BufferError):
                mm.close()
    return checks


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Hash threads for commits: one core fewer than the machine has, so the
    thread writing the data keeps a core (measured on 2 cores: two hash
    threads slowed the write more than they sped up the hashing)."""
    global _pool
    with _locks_guard:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                thread_name_prefix="ckpt-hash")
        return _pool


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


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

def sweep_leftovers(home: Path) -> list[tuple[str, int, Path]]:
    """Synchronous part of the start-up reconcile (no client is connected yet).

    Removes staging directories, finishes interrupted replacements, deletes
    snapshot buffers of dead trainers; returns every ``(run, step, dir)``.
    """
    found: list[tuple[str, int, Path]] = []
    root = home / paths.RUNS_DIR
    for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
        ckpt_root = paths.checkpoints_dir(home, run_dir.name)
        if not ckpt_root.is_dir() or not valid_run_id(run_dir.name):
            continue
        changed = False
        for entry in sorted(ckpt_root.iterdir()):
            if entry.name.endswith(fmt.STAGING_SUFFIX):
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
        for entry in sorted(ckpt_root.iterdir()):
            step = fmt.parse_step_dir(entry.name)
            if step is not None and entry.is_dir():
                found.append((run_dir.name, step, entry))
    _sweep_buffers(home)
    return found


def _sweep_buffers(home: Path, connected: set[int] | None = None) -> None:
    """Delete snapshot buffers of this home whose trainer is dead (a trainer
    killed after its last checkpoint was confirmed leaves its buffer behind)."""
    shm = fmt.shm_dir(home)
    prefix = fmt.shm_prefix(home)
    try:
        names = os.listdir(shm)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if shm / name in _reading:
            continue  # its trainer may be dead, but we are committing it right now
        if not pid_text.isdigit() or int(pid_text) in (connected or ()):
            # A connection of that trainer is still open: it may hold a CKPT
            # message we have not read yet (the trainer died right after sending).
            continue
        if not psutil.pid_exists(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(shm / name)


def reconcile_rows(daemon: Daemon, found: list[tuple[str, int, Path]]) -> dict[str, int]:
    """Make rows agree with directories (see the module docstring); returns counts.

    The newest committed checkpoint of each run (the one a restore picks)
    is re-hashed in full; older ones get the cheap checks (manifest hash,
    file size); ``ckptd ckpt verify`` re-hashes everything.
    """
    rows = daemon.call_writer(lambda store: store.checkpoint_rows(None))
    by_key = {(r["run_id"], r["step"]): r for r in rows}
    on_disk = {(run, step): d for run, step, d in found}
    newest: dict[str, int] = {}
    for r in rows:
        if r["status"] == "committed":
            newest[r["run_id"]] = max(newest.get(r["run_id"], -1), r["step"])
    counts = {"recorded": 0, "corrupt": 0}
    for (run, step), d in sorted(on_disk.items()):
        row = by_key.get((run, step))
        if row is not None:
            continue
        with run_lock(run):
            try:
                manifest, digest = fmt.verify_dir(d)
            except CheckpointError as exc:
                log.warning("run %s: %s has no row and fails verification: %s", run, d, exc)
                _put(daemon, _row_for(daemon, run, step, d, None, None, "corrupt", str(exc)))
                counts["corrupt"] += 1
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
                except CheckpointError as exc:
                    reason = str(exc)
                    with contextlib.suppress(CheckpointError):
                        # a replacement committed on disk whose row was not yet updated
                        manifest, digest = fmt.verify_dir(d)
                        _put(daemon, _row_for(daemon, run, step, d, manifest, digest,
                                              "committed", None))
                        continue
                except OSError as exc:
                    reason = f"{d}: {exc.strerror}"
            if reason is not None:
                log.warning("run %s: checkpoint step %d is corrupt: %s", run, step, reason)
                _mark(daemon, run, step, reason)
                counts["corrupt"] += 1
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


@rpc("ckpt_verify")
def rpc_verify(daemon: Daemon, args: dict[str, Any], conn: Conn) -> list[dict[str, Any]]:
    """Re-hash every committed checkpoint of a run (or all runs); mark failures corrupt."""
    out = []
    for run in _run_ids(daemon, args):
        rows = daemon.call_writer(lambda store, run=run: store.checkpoint_rows(run))
        for row in rows:
            status, reason = row["status"], row["reason"]
            if status == "committed":
                with run_lock(run):
                    d = paths.checkpoints_dir(daemon.home, run) / fmt.step_dir_name(row["step"])
                    try:
                        fmt.verify_dir(d, row["hash"])
                    except CheckpointError as exc:
                        status, reason = "corrupt", str(exc)
                        _mark(daemon, run, row["step"], reason)
            out.append({"run": run, "step": row["step"], "status": status, "reason": reason})
    return out


@rpc("ckpt_mark_corrupt")
def rpc_mark_corrupt(daemon: Daemon, args: dict[str, Any], conn: Conn) -> bool:
    """A restore found a checkpoint failing verification; check it ourselves, then mark."""
    run, step = args.get("run"), args.get("step")
    if not isinstance(run, str) or not valid_run_id(run) or not isinstance(step, int):
        raise NotFound("ckpt_mark_corrupt needs a run id and a step")
    with run_lock(run):
        rows = daemon.call_writer(lambda store: store.checkpoint_rows(run))
        row = next((r for r in rows if r["step"] == step), None)
        if row is None or row["status"] != "committed":
            return False
        try:
            fmt.verify_dir(paths.checkpoints_dir(daemon.home, run) / fmt.step_dir_name(step),
                           row["hash"])
            return False
        except CheckpointError as exc:
            _mark(daemon, run, step, str(exc))
            return True


@rpc("ckpt_gc")
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

def export(home: Path, run_id: str, rows: list[dict[str, Any]], step: int | None,
           out: Path) -> dict[str, Any]:
    """Write one plain ``torch.save`` file of a checkpoint (newest committed that
    verifies, or ``step``); loadable with ``torch.load(weights_only=True)``.

    Reads the files directly; the daemon is not needed.

    :raises NotFound: no such (committed) checkpoint.
    :raises CheckpointError: it fails verification.
    """
    import torch

    candidates = [r for r in rows if r["status"] == "committed"]
    if step is not None:
        candidates = [r for r in candidates if r["step"] == step]
        if not candidates:
            raise NotFound(f"export: run {run_id} has no committed checkpoint at step {step}; "
                           "`ckptd ckpt ls` lists them")
    if not candidates:
        raise NotFound(f"export: run {run_id} has no committed checkpoint")
    errors = []
    for row in sorted(candidates, key=lambda r: -r["step"]):
        d = paths.checkpoints_dir(home, run_id) / fmt.step_dir_name(row["step"])
        try:
            payload, manifest = fmt.load_dir(d, row["hash"], verify=fmt.HASH_ALGO)
            break
        except CheckpointError as exc:
            errors.append(str(exc))
    else:
        raise CheckpointError(f"export: no checkpoint of run {run_id} verifies: "
                              + "; ".join(errors))
    # clone: each tensor gets its own storage, not a view of the whole data file
    obj = {"format": "ckptd-export/1", "run": run_id, "step": row["step"],
           "metrics": row.get("metrics") or {},
           "state": fmt.clone_tensors(payload["state"]),
           "rng": fmt.clone_tensors(payload.get("rng"))}
    out = out.absolute()
    tmp = out.with_name(out.name + ".ckptd-tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, out)
    with contextlib.suppress(OSError):
        fsync_dir(out.parent)
    return {"run": run_id, "step": row["step"], "path": os.fspath(out),
            "bytes": out.stat().st_size}


def sweep_buffers(daemon: Daemon) -> None:
    """PERIODIC_HOOK: remove snapshot buffers left by dead trainers."""
    with daemon.conns_lock:
        connected = {c.pid for c in daemon.conns}
    _sweep_buffers(daemon.home, connected)


MESSAGE_HANDLERS[protocol.CKPT] = on_ckpt
STARTUP_HOOKS.append(startup)
PERIODIC_HOOKS.append(sweep_buffers)

__all__ = ["commit_checkpoint", "reconcile_rows", "sweep_leftovers", "prune", "export"]
