"""The daemon: one per home, the only writer of the store and the checkpoints.

Threads, each with the same shape (initialize / loop until ``stop`` is set /
shutdown in ``finally``):

* the acceptor (main thread): accepts connections, checks the peer's uid;
* one reader per connection: decodes frames, validates them, queues work;
* the writer: group-commits queued events into SQLite, then acks;
* the spool watcher: notices spool files handed over by clients (watchdog,
  with a periodic scan as fallback) and queues their ingestion;
* the liveness sweeper: marks runs whose process vanished ``interrupted``.

Signal handlers only set flags. SIGTERM reads what the kernel holds, lets
checkpoint commits in flight finish (up to WORKER_DRAIN_TIMEOUT, logged),
commits the queue, and exits; a second SIGTERM exits at once. A spool being
ingested stops between batches and resumes at the next start.

Memory is bounded in bytes, not only in events: the queue (QUEUE_MAX_BYTES,
readers stop reading beyond it), each group commit (BATCH_MAX_BYTES), each
spool batch (SPOOL_BATCH_BYTES); the WAL is truncated past store.WAL_LIMIT.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import logging
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd_client import paths, protocol
from ckptd_client.errors import CkptdError
from ckptd_client.spool import (
    PARTIAL_SUFFIX,
    SUFFIX,
    fsync_dir,
    read_batch,
    stale_partial,
    try_lock,
)

from ckptd import __version__
from ckptd.daemon import handlers, notify, validate
from ckptd.daemon.crashpoints import crashpoint
from ckptd.store.writer import Store

log = logging.getLogger("ckptd.daemon")

#: Queue bounds, in events and in bytes (frame sizes): when the writer falls
#: behind, reader threads stop reading, the kernel socket buffers fill and
#: clients spill to their spool. Memory stays bounded whatever the event size
#: (1 MiB messages under a count bound alone took the daemon to 1.7 GB).
QUEUE_MAX = 200_000
QUEUE_MAX_BYTES = 64 << 20
#: Most events, and bytes, in one transaction: bounds the time a commit holds
#: the lock and the WAL it writes (the WAL holds whole transactions).
BATCH_MAX = 20_000
BATCH_MAX_BYTES = 16 << 20
#: Bytes of a spool file ingested per transaction: the daemon holds one batch,
#: never a whole file (a 391 MB spool took 3.6 GB and outlived its timeout).
SPOOL_BATCH_BYTES = 4 << 20
#: Seconds between attempts to truncate an oversized WAL.
WAL_CHECK_INTERVAL = 1.0
#: Longest a plain event waits for others to share its commit (SPEC 1 allows 100 ms).
GROUP_WINDOW_S = 0.02
#: After a read of plain events, a connection's reader sleeps this long
#: before it reads again, instead of waiting on the socket: a trainer
#: logging every step is read at most once per this many seconds, and its
#: send()s in between wake nobody.
#: One wake-up per logged step took the core from the training loop: log()
#: p50 49 us against 12 us with the daemon stopped (JSON line: 9 us; issue
#: 11). The events wait in the kernel meanwhile (acknowledged per SPEC 1:
#: log() already returned), and the delay plus GROUP_WINDOW_S stays inside
#: the 100 ms power-loss window. The first event after a quiet spell is read
#: at once; a flush or call sent during a sleep waits at most this long more.
READ_COALESCE_S = 0.005
#: Seconds a send to a client may block before that client is dropped.
SEND_TIMEOUT = 2
#: Most descriptors (checkpoint buffers) a connection may send ahead of its frames.
MAX_FDS = 4
#: Seconds a clean stop waits for in-flight work (checkpoint commits). Inside
#: the systemd unit's TimeoutStopSec (90 s), with room for the final commit.
WORKER_DRAIN_TIMEOUT = 60


class DaemonAlreadyRunning(CkptdError):
    """Another daemon holds this home's lock."""


@dataclass(eq=False)
class Conn:
    """One client connection; ``send`` is safe from any thread."""

    sock: socket.socket
    pid: int
    run: str | None = None
    attempt: int = 0
    src: str = "c"
    closed: bool = False
    #: a send failed: the peer died or stopped reading; we only read from now on
    mute: bool = False
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: file descriptors the peer passed (SCM_RIGHTS) that no handler claimed yet
    fds: list[int] = field(default_factory=list)
    #: called (from its reader thread) once the connection has ended
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def send(self, msg: dict[str, Any]) -> bool:
        data = protocol.encode(msg)
        with self.lock:
            if self.closed or self.mute:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                # Never close here: a trainer killed right after log() returned
                # left frames in the kernel that only this connection can still
                # read, and nobody will resend them. Stop sending (SHUT_WR tells a
                # live peer to reconnect and spool what is unacked); the reader
                # reads on to EOF and closes.
                self.mute = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                return False

    def close(self) -> None:
        with self.lock:
            self.close_locked()

    def close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()


@dataclass
class _Event:
    conn: Conn | None
    run: str
    attempt: int
    src: str
    msg: dict[str, Any]
    #: frame bytes, charged to the queue's byte budget until committed
    size: int = 0


@dataclass
class _Flush:
    conn: Conn
    seq: int


@dataclass
class _Call:
    fn: Callable[[Store], Any]
    future: Future[Any]


class Daemon:
    def __init__(self, home: Path, *, sweep_interval: float = 2.0,
                 max_frame: int = protocol.MAX_FRAME) -> None:
        self.home = home
        self.socket_path = paths.socket_path(home)
        self.stop = threading.Event()
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_MAX)
        self.sweep_interval = sweep_interval
        self.max_frame = max_frame
        self.conns: set[Conn] = set()
        self.conns_lock = threading.Lock()
        self.store: Store | None = None
        self._lock_fd = -1
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._spool_kick = threading.Event()
        #: one spool pass at a time (spool thread, flushes, RPCs)
        self._spool_mutex = threading.Lock()
        #: flushes answered after the next complete spool pass
        self._spool_waiters: list[_Flush] = []
        self._spool_waiters_lock = threading.Lock()
        #: bytes of events queued or in the writer's batch (see QUEUE_MAX_BYTES)
        self._queued_bytes = 0
        self._budget = threading.Condition()
        #: set at shutdown once every reader has read its connection to EOF;
        #: only then may the writer stop (it commits what they queued)
        self._readers_done = threading.Event()
        self._writer_gate = threading.Lock()
        self._writer_exited = False
        self._signals = 0
        self.started = time.time()
        #: ``--max-concurrent-resumes`` (None: $CKPTD_MAX_CONCURRENT_RESUMES or the default)
        self.max_concurrent_resumes: int | None = None
        #: work a clean stop must finish (checkpoint commits), by thread
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()

    # ----------------------------------------------------------- lifecycle

    def acquire_lock(self) -> None:
        """One daemon per home: an flock held for the daemon's lifetime."""
        paths.secure_home(self.home)
        fd = os.open(self.home / paths.LOCK_NAME,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        asked: set[int] = set()
        deadline = time.monotonic() + TAKEOVER_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                other = os.pread(fd, 32, 0).decode().strip() or "?"
            pid = int(other) if other.isdigit() else None
            # No pid, or a dead one: the holder took the lock and has not yet
            # written its pid over its predecessor's (clients autostart one
            # daemon after another during the gap): look again.
            live = pid is not None and _pid_alive(pid)
            if not _systemds() or (live and not _autostarted(pid)) \
                    or time.monotonic() > deadline:
                os.close(fd)
                raise DaemonAlreadyRunning(
                    f"another ckptd daemon (pid {other}) is already running for {self.home}; "
                    "use `ckptd status` or `ckptd stop`"
                ) from None
            # `systemctl restart ckptd` with runs active: in the gap a client
            # autostarted a daemon that took the lock, and the unit's would
            # exit, fail and leave the home to a daemon nothing stops at
            # shutdown. The unit's wins: the other drains and exits (one
            # SIGTERM each: a second makes a daemon exit at once).
            if live and pid not in asked:
                asked.add(pid)
                log.warning("taking the home over from daemon pid %d, which a client "
                            "autostarted while this unit's daemon was (re)starting", pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def bind(self) -> None:
        """Listen on the socket inside a 0700 directory, the socket itself 0600."""
        sock_dir = self.socket_path.parent
        sock_dir.parent.mkdir(parents=True, exist_ok=True)
        # /tmp/ckptd-<uid> and $XDG_RUNTIME_DIR/ckptd may have been planted
        # (a symlink, another user's directory): never follow or chmod those.
        paths.private_dir(sock_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # stale: we hold the home's lock
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(os.fspath(self.socket_path))
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        s.listen(128)
        s.settimeout(0.2)
        self._listener = s

    def serve(self) -> None:
        """Run until stopped; the caller has installed signal handlers."""
        self.acquire_lock()
        self.store = Store(paths.db_path(self.home))
        paths.spool_dir(self.home).mkdir(parents=True, exist_ok=True, mode=0o700)
        for hook in handlers.STARTUP_HOOKS:
            hook(self)
        self.bind()
        self._start_thread(self._writer_loop, "writer")
        self._start_thread(self._spool_loop, "spool")
        self._start_thread(self._sweep_loop, "sweeper")
        self._spool_kick.set()
        log.info("ckptd %s serving %s on %s (pid %d)", __version__, self.home,
                 self.socket_path, os.getpid())
        notify.ready()
        try:
            self._accept_loop()
        finally:
            self.shutdown()

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def start_worker(self, target: Callable[..., None], args: tuple[Any, ...],
                     name: str) -> None:
        """Run ``target(*args)`` in a thread that a clean stop waits for.

        A checkpoint whose snapshot was taken must be committed even when the
        daemon is told to stop (SPEC promise 3): shutdown joins these threads
        before the writer may exit, since they still need it for their row.
        """

        def body() -> None:
            try:
                target(*args)
            finally:
                with self._workers_lock:
                    self._workers.discard(threading.current_thread())

        t = threading.Thread(target=body, name=name, daemon=True)
        with self._workers_lock:
            self._workers.add(t)
        t.start()

    def _drain_workers(self) -> None:
        """Let in-flight commits finish (bounded), saying so in the log."""
        with self._workers_lock:
            workers = sorted(self._workers, key=lambda t: t.name)
        if not workers:
            return
        names = ", ".join(t.name for t in workers)
        log.info("stopping: finishing %d in-flight commit(s) first (%s); up to %d s",
                 len(workers), names, WORKER_DRAIN_TIMEOUT)
        t0 = time.monotonic()
        deadline = t0 + WORKER_DRAIN_TIMEOUT
        for t in workers:
            t.join(timeout=max(deadline - time.monotonic(), 0))
        left = [t.name for t in workers if t.is_alive()]
        if left:
            # CRASH WINDOW: what is left is cut as a kill -9 would cut it:
            # staging leftovers are removed at the next start, the trainer's
            # handle reports the failure and the previous checkpoint stays.
            log.error("stopping: gave up on %d in-flight commit(s) after %d s (%s); "
                      "they are discarded at the next start", len(left),
                      WORKER_DRAIN_TIMEOUT, ", ".join(left))
        else:
            log.info("stopping: %d in-flight commit(s) finished in %.1f s", len(workers),
                     time.monotonic() - t0)

    def request_stop(self, signum: int = 0, frame: Any = None) -> None:
        """Signal handler: set flags only. A second signal exits at once."""
        self._signals += 1
        if self._signals > 1:
            os._exit(1)
        self.stop.set()

    def shutdown(self) -> None:
        notify.stopping()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self.stop.set()
        self._spool_kick.set()
        # Take no new data from clients (SHUT_RD), but read what the kernel
        # already holds: a trainer killed right after log() returned cannot
        # resend it. Readers stop at the EOF that follows; the writer commits
        # everything they queued, then exits. Live clients keep what is unacked.
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.conns_lock:
                if not self.conns:
                    break
            time.sleep(0.01)
        # The spool watcher and sweeper may still hand work to the writer:
        # let them finish before the writer is told it may stop.
        for t in self._threads:
            if t.name != "writer":
                t.join(timeout=30)
        # Readers are done, so no new checkpoint can start; the ones running
        # still need the writer for their row.
        self._drain_workers()
        self._readers_done.set()
        for t in self._threads:
            t.join(timeout=60)
        for c in conns:
            c.close()
        if self.store is not None:
            self.store.close()
        log.info("ckptd stopped")

    # ------------------------------------------------------------- accept

    def _accept_loop(self) -> None:
        assert self._listener is not None
        last_ping = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - last_ping > 1.0:
                notify.watchdog()
                last_ping = now
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                time.sleep(0.05)
                continue
            pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                log.warning("refused a connection from uid %d (pid %d)", uid, pid)
                with contextlib.suppress(OSError):
                    sock.settimeout(1)
                    sock.sendall(protocol.encode(
                        {"t": protocol.ERROR, "error": "permission denied: not the owner"}))
                sock.close()
                continue
            sock.setblocking(True)
            sock.settimeout(None)
            # A peer that stops reading its acks must not stall the writer
            # thread in sendall: after SEND_TIMEOUT its connection is dropped
            # (the client keeps its unacked events and spools them).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", SEND_TIMEOUT, 0))
            conn = Conn(sock=sock, pid=pid)
            with self.conns_lock:
                self.conns.add(conn)
            threading.Thread(target=self._conn_loop, args=(conn,), name=f"conn-{pid}",
                             daemon=True).start()

    # ------------------------------------------------------- connections

    def _conn_loop(self, conn: Conn) -> None:
        reader = protocol.FrameReader(self.max_frame)
        try:
            while True:  # to EOF, also at shutdown (see shutdown)
                try:
                    data, fds, _, _ = socket.recv_fds(conn.sock, 1 << 18, MAX_FDS,
                                                      socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    break
                conn.fds += fds
                if not data:
                    break
                events_only = not fds
                try:
                    if len(conn.fds) > MAX_FDS:
                        raise protocol.ProtocolError("too many descriptors sent")
                    for msg, size in reader.feed_sized(data):
                        events_only = events_only and msg["t"] in protocol.SEQUENCED
                        self._dispatch(conn, msg, size)
                except (protocol.ProtocolError, validate.Invalid) as exc:
                    log.warning("bad frame from pid %d: %s", conn.pid, exc)
                    conn.send({"t": protocol.ERROR, "error": str(exc)})
                    break
                if events_only:
                    time.sleep(READ_COALESCE_S)  # let the next events gather unannounced
        finally:
            conn.close()
            with self.conns_lock:
                self.conns.discard(conn)
            for fn in conn.on_close:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - one failing hook must not leak the rest
                    log.exception("connection close hook failed")
            for fd in conn.fds:  # descriptors no handler claimed
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.fds.clear()

    def _dispatch(self, conn: Conn, msg: dict[str, Any], size: int = 0) -> None:
        kind = msg["t"]
        if kind in protocol.SEQUENCED:
            if conn.run is None:
                raise validate.Invalid(f"{kind} before hello")
            validate.event(msg)
            self._charge(size)
            self.queue.put(_Event(conn, conn.run, conn.attempt, conn.src, msg, size))
        elif kind == protocol.HELLO:
            validate.hello(msg)
            conn.run, conn.attempt, conn.src = msg["run"], msg["attempt"], msg["src"]
        elif kind == protocol.FLUSH:
            seq = msg.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise validate.Invalid("flush needs an integer seq")
            self.queue.put(_Flush(conn, seq))
        elif kind == protocol.PING:
            conn.send({"t": protocol.PONG, "pid": os.getpid(), "version": __version__})
        elif kind == protocol.RPC:
            self._rpc(conn, msg)
        elif kind in handlers.MESSAGE_HANDLERS:
            handlers.MESSAGE_HANDLERS[kind](self, msg, conn)
        else:
            raise validate.Invalid(f"unknown message type {kind!r}")

    def _rpc(self, conn: Conn, msg: dict[str, Any]) -> None:
        op, args = msg.get("op"), msg.get("args") or {}
        handler = handlers.RPCS.get(op) if isinstance(op, str) else None
        if handler is None or not isinstance(args, dict):
            raise validate.Invalid(f"unknown operation {op!r}")
        try:
            result = handler(self, args, conn)
        except CkptdError as exc:
            conn.send({"t": protocol.REPLY, "ok": False, "error": str(exc),
                       "kind": type(exc).__name__})
            return
        except Exception as exc:  # noqa: BLE001 - an RPC bug must not kill the daemon
            log.exception("rpc %s failed", op)
            conn.send({"t": protocol.REPLY, "ok": False, "error": f"internal error: {exc}"})
            return
        conn.send({"t": protocol.REPLY, "ok": True, "result": result})

    def _charge(self, size: int) -> None:
        """Backpressure by bytes: a reader waits here while the writer is over
        budget, so it stops reading its socket; the kernel buffer fills and
        the client spools. The writer keeps draining, also at shutdown."""
        with self._budget:
            while self._queued_bytes > QUEUE_MAX_BYTES:
                self._budget.wait(1.0)
            self._queued_bytes += size

    def _release(self, size: int) -> None:
        if size:
            with self._budget:
                self._queued_bytes -= size
                self._budget.notify_all()

    def call_writer(self, fn: Callable[[Store], Any], timeout: float | None = 120) -> Any:
        """Run ``fn(store)`` inside the writer's next transaction and return its result.

        Every write that is not an event (liveness verdicts, checkpoint rows)
        goes through here, so the writer thread stays the only SQLite writer.
        """
        fut: Future[Any] = Future()
        with self._writer_gate:
            if self._writer_exited:
                raise CkptdError("the daemon is stopping; try again once it is back")
            self.queue.put(_Call(fn, fut))
        return fut.result(timeout=timeout)

    # ------------------------------------------------------------- writer

    def _writer_loop(self) -> None:
        assert self.store is not None
        store = self.store
        wal_checked = 0.0
        while True:
            now = time.monotonic()
            if now - wal_checked > WAL_CHECK_INTERVAL:
                wal_checked = now
                # between transactions: the WAL only shrinks when we say so
                with contextlib.suppress(Exception):
                    if store.bound_wal():
                        log.debug("truncated the WAL")
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                if self._readers_done.is_set():
                    late = self._close_writer()
                    if late:
                        self._commit_released(store, late)
                    return
                continue
            batch = [first]
            size = getattr(first, "size", 0)
            # Group commit: take everything already queued (up to a bound);
            # under load, batches grow while the previous commit fsyncs.
            # Plain events also wait up to GROUP_WINDOW_S for company: a
            # training loop logging every few ms otherwise costs one commit,
            # one fsync and one ack (a wake-up of the trainer's link thread)
            # per step, taking cores from torch (issue 11). A flush or call
            # ends the wait: nobody waits on events alone. CRASH WINDOW: events
            # not yet committed are still held by their clients (unacked).
            deadline = time.monotonic() + GROUP_WINDOW_S
            while len(batch) < BATCH_MAX and size < BATCH_MAX_BYTES:
                try:
                    if isinstance(batch[-1], _Event):
                        left = deadline - time.monotonic()
                        item = self.queue.get(timeout=left) if left > 0 else \
                            self.queue.get_nowait()
                    else:
                        item = self.queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                size += getattr(item, "size", 0)
            self._commit_released(store, batch)

    def _commit_released(self, store: Store, batch: list[Any]) -> None:
        try:
            self._commit(store, batch)
        finally:
            self._release(sum(getattr(i, "size", 0) for i in batch))

    def _close_writer(self) -> list[Any]:
        """Refuse further calls (so no caller waits on a writer that is gone)
        and return what slipped into the queue meanwhile, for a last commit."""
        with self._writer_gate:
            self._writer_exited = True
            late = []
            while True:
                try:
                    late.append(self.queue.get_nowait())
                except queue.Empty:
                    return late

    def _commit(self, store: Store, batch: list[Any]) -> None:
        events: list[tuple[str, int, str, dict[str, Any]]] = []
        acks: dict[Conn, int] = {}
        flushes: list[_Flush] = []
        calls: list[tuple[_Call, Any, BaseException | None]] = []
        seen_runs: set[tuple[str, int]] = set()
        try:
            with store.transaction():
                for item in batch:
                    if isinstance(item, _Event):
                        if (item.run, item.attempt) not in seen_runs:
                            store.ensure_run(item.run, item.attempt)
                            seen_runs.add((item.run, item.attempt))
                        events.append((item.run, item.attempt, item.src, item.msg))
                        if item.conn is not None:
                            acks[item.conn] = max(acks.get(item.conn, 0), item.msg["seq"])
                    elif isinstance(item, _Flush):
                        flushes.append(item)
                    elif isinstance(item, _Call):
                        if events:
                            store.apply(events)
                            events = []
                        try:
                            calls.append((item, item.fn(store), None))
                        except Exception as exc:  # noqa: BLE001 - reported to the caller
                            calls.append((item, None, exc))
                if events:
                    store.apply(events)
                if seen_runs or flushes:
                    crashpoint("events.before_commit")
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error: report, keep serving
            log.error("commit of %d items failed: %s", len(batch), exc)
            for item in batch:
                if isinstance(item, _Call) and not item.future.done():
                    item.future.set_exception(exc)
            for conn in {i.conn for i in batch if isinstance(i, (_Event, _Flush)) and i.conn}:
                # unacked events stay with their clients, which spool them
                conn.send({"t": protocol.ERROR, "error": f"store commit failed: {exc}"})
                conn.close()
            return
        # CRASH WINDOW: committed but not yet acked. Clients still hold these
        # events and resend them after a reconnect; the inserts are idempotent.
        if seen_runs or flushes:
            crashpoint("events.after_commit")
        if seen_runs or flushes:
            crashpoint("events.before_ack")
        for conn, seq in acks.items():
            if seq > conn.acked:
                conn.acked = seq
            conn.send({"t": protocol.ACK, "seq": conn.acked})
        if flushes:
            # a flush also covers the spool files its client just handed over
            self._after_spool_pass(flushes)
        if seen_runs or flushes:
            crashpoint("events.after_ack")
        for call, result, exc in calls:
            if exc is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

    # --------------------------------------------------------------- spool

    def _after_spool_pass(self, flushes: list[_Flush]) -> None:
        """Answer ``flushes`` now, or once their clients' spool files (which
        may hold what they just handed over) are ingested."""
        with self._spool_waiters_lock:
            self._spool_waiters.extend(flushes)
        if not self._answer_waiters():
            self._spool_kick.set()

    def _answer_waiters(self, everyone: set[int] | None = None) -> bool:
        """Send FLUSHED to each waiting flush whose client has no spool file
        left (or that is in ``everyone``); True when none is left waiting.

        Per client, not per pass: a flush never waits for another client's
        large spool to be ingested.
        """
        try:
            pending = [n for n in os.listdir(paths.spool_dir(self.home)) if n.endswith(SUFFIX)]
        except OSError:
            pending = []
        with self._spool_waiters_lock:
            answer, keep = [], []
            for f in self._spool_waiters:
                prefix = f"{f.conn.run}.{f.conn.attempt}.{f.conn.src}."
                if (everyone is not None and id(f) in everyone) or \
                        not any(n.startswith(prefix) for n in pending):
                    answer.append(f)
                else:
                    keep.append(f)
            self._spool_waiters = keep
        for f in answer:
            f.conn.send({"t": protocol.FLUSHED, "seq": f.seq})
        return not keep

    def ingest_spools_now(self) -> None:
        """Ingest every spool file no writer holds, in bounded batches.

        Each batch of about :data:`SPOOL_BATCH_BYTES` is one writer
        transaction that also records how far the file is done, so memory
        and commit time stay bounded whatever the file's size, and a restart
        (or a stop between batches) resumes where the last commit ended.
        A file is deleted once all of it is committed.
        """
        with self._spool_mutex:
            with self._spool_waiters_lock:
                # a complete pass answers these even if a same-named file
                # stayed locked (its writer is still appending)
                before = {id(f) for f in self._spool_waiters}
            if self._spool_pass():
                self._answer_waiters(before)

    def _spool_pass(self) -> bool:
        """One pass over the spool; False if it stopped early (shutdown)."""
        spool = paths.spool_dir(self.home)
        try:
            names = sorted(os.listdir(spool))
        except FileNotFoundError:
            return True
        offsets: dict[str, int] = self.call_writer(lambda store: store.spool_offsets())
        gone = [n for n in offsets if n not in names]
        if gone:
            # progress of files deleted after their last batch committed
            self.call_writer(lambda store: store.forget_spools(gone))
        for name in names:
            path = spool / name
            if name.endswith(PARTIAL_SUFFIX):
                # a fresh one is a writer between create and lock: leave it alone
                fd = try_lock(path) if stale_partial(path) else None
                if fd is not None:  # a writer died between create and rename: empty
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    os.close(fd)
                continue
            if not name.endswith(SUFFIX):
                continue
            fd = try_lock(path)
            if fd is None:
                continue  # still being written
            # The lock only proves that its writer is done (writers never
            # reopen a file). Release it now: held across commits, a failed
            # commit (disk full) leaked it, and this daemon then skipped the
            # file as "still being written" until a restart.
            os.close(fd)
            recorded = self._ingest_file(path, offsets.get(name, 0))
            if recorded is None:
                return False
            # CRASH WINDOW: all committed, file still here -> its recorded offset
            # is its end: nothing is applied again; unlinked but the directory
            # not fsynced -> it may reappear after power loss and is ingested
            # again (idempotent).
            crashpoint("spool.before_unlink")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            crashpoint("spool.after_unlink")
            fsync_dir(spool)
            if recorded:
                self.call_writer(lambda store, name=name: store.forget_spools([name]))
            self._answer_waiters()
        return True

    def _ingest_file(self, path: Path, offset: int) -> bool | None:
        """Apply one spool file from ``offset``, a batch per transaction.

        Returns whether its progress was recorded in ``spool_progress`` (only
        a file of more than one batch needs it: a small one, the usual case,
        costs no extra write, and an empty one none at all, which matters on a
        full disk); None if the daemon is stopping (what is committed is
        recorded).
        """
        total = 0
        recorded = offset > 0
        while True:
            if self.stop.is_set():
                log.info("stopping: %s ingested up to byte %d; the rest at the next start",
                         path.name, offset)
                return None
            records, end, at_end = read_batch(path, offset, SPOOL_BATCH_BYTES)
            record = recorded or not at_end
            events = []
            for msg in records:
                try:
                    validate.spooled(msg)
                except validate.Invalid as exc:
                    log.warning("skipping bad spool record in %s: %s", path, exc)
                    continue
                events.append((msg.pop("run"), msg.pop("a"), msg.pop("src"), msg))
            del records

            def work(store: Store, events: list[Any] = events, end: int = end,
                     record: bool = record) -> None:
                for run, attempt in {(e[0], e[1]) for e in events}:
                    store.ensure_run(run, attempt)
                store.apply(events)
                if record:
                    # the same transaction records the progress: a crash after
                    # it resumes at ``end``, before it replays this batch
                    store.set_spool_offset(path.name, end)

            if events or record:
                self.call_writer(work)
            recorded = record
            total += len(events)
            offset = end
            if at_end:
                log.info("ingested %d events from %s", total, path.name)
                return recorded

    def _spool_loop(self) -> None:
        """Ingest spool files as clients hand them over (watchdog), or every few seconds."""
        observer = None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            kick = self._spool_kick

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event: Any) -> None:
                    # our own reads of a spool file must not wake us again
                    # (a pass that fails, on a full disk, looped at 20 Hz)
                    if event.event_type not in ("opened", "closed_no_write"):
                        kick.set()

            observer = Observer()
            observer.schedule(Handler(), os.fspath(paths.spool_dir(self.home)))
            observer.start()
        except Exception as exc:  # noqa: BLE001 - fall back to polling
            log.warning("spool watcher unavailable (%s); polling", exc)
            observer = None
        try:
            while not self.stop.is_set():
                self._spool_kick.wait(2.0)
                if self.stop.is_set():
                    break
                self._spool_kick.clear()
                time.sleep(0.05)  # let a burst of file events settle
                try:
                    self.ingest_spools_now()
                except Exception as exc:  # noqa: BLE001
                    log.error("spool ingestion failed: %s", exc)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)

    # ------------------------------------------------------------ liveness

    def _sweep_loop(self) -> None:
        while not self.stop.wait(self.sweep_interval):
            for hook in handlers.PERIODIC_HOOKS:
                try:
                    hook(self)
                except Exception:  # noqa: BLE001 - one failing task must not stop the others
                    log.exception("periodic task failed")

    def connected_runs(self) -> set[tuple[str, int]]:
        with self.conns_lock:
            return {(c.run, c.attempt) for c in self.conns if c.run and not c.closed}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ckptd.daemon`` (what auto-start runs)."""
    parser = argparse.ArgumentParser(prog="ckptd-daemon")
    parser.add_argument("--home", default=None)
    parser.add_argument("--max-concurrent-resumes", type=int, default=None)
    args = parser.parse_args(argv)
    return run_foreground(paths.home_dir(args.home), args.max_concurrent_resumes)


#: How long the unit's daemon waits for an autostarted one to hand the home over.
TAKEOVER_S = 60.0


def _systemds() -> bool:
    """Whether this daemon is the one systemd's unit started (not an autostart)."""
    return bool(os.environ.get("NOTIFY_SOCKET")) and not os.environ.get("CKPTD_AUTOSTARTED")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _autostarted(pid: int) -> bool:
    """Whether process ``pid`` is a daemon a client autostarted (its environment says)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"CKPTD_AUTOSTARTED=1" in f.read().split(b"\0")
    except OSError:
        return False


#: The umask the daemon was started with; what it gives the runs it relaunches.
USER_UMASK = -1


def run_foreground(home: Path, max_concurrent_resumes: int | None = None) -> int:
    global USER_UMASK
    # Everything the daemon creates (store, WAL, logs, checkpoints, run dirs
    # made by mkdir -p) is for the owner's eyes only, whatever umask we got.
    USER_UMASK = os.umask(0o077)
    logging.basicConfig(
        level=os.environ.get("CKPTD_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Under load the queue holds tens of thousands of event dicts; with the
    # default gen-0 threshold (700) the collector rescans them over and over
    # (bench/log_latency.py: about 20% of the durable event rate). The daemon's
    # objects are nearly all acyclic, so collect rarely, and never the modules.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    daemon = Daemon(home)
    daemon.max_concurrent_resumes = max_concurrent_resumes
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        daemon.serve()
    except DaemonAlreadyRunning as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return 0 if os.environ.get("CKPTD_AUTOSTARTED") else 1
    except CkptdError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Daemon", "Conn", "main", "run_foreground"]
