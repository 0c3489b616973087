"""The daemon: one per home, the only writer of the store and the checkpoints.

Threads, each with the same shape (initialize / loop until ``stop`` is set /
shutdown in ``finally``):

* the acceptor (main thread): accepts connections, checks the peer's uid;
* one reader per connection: decodes frames, validates them, queues work;
* the writer: group-commits queued events into SQLite, then acks;
* the spool watcher: notices spool files handed over by clients (watchdog,
  with a periodic scan as fallback) and queues their ingestion;
* the liveness sweeper: marks runs whose process vanished ``interrupted``.

Signal handlers only set flags. SIGTERM drains the queue, commits, and exits;
a second SIGTERM exits at once.
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
from ckptd_client.spool import PARTIAL_SUFFIX, SUFFIX, fsync_dir, read_records, try_lock

from . import __version__, notify, validate
from .crashpoints import crashpoint
from .store import Store

log = logging.getLogger("ckptd.daemon")

#: Queue bound: when the writer falls behind, reader threads block, the
#: kernel socket buffers fill and clients spill to their spool. Memory stays bounded.
QUEUE_MAX = 200_000
#: Most events in one transaction (bounds the time a commit holds the lock).
BATCH_MAX = 20_000
#: Longest a plain event waits for others to share its commit (SPEC 1 allows 100 ms).
GROUP_WINDOW_S = 0.02
#: Seconds a send to a client may block before that client is dropped.
SEND_TIMEOUT = 2
#: Most descriptors (checkpoint buffers) a connection may send ahead of its frames.
MAX_FDS = 4


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


@dataclass
class _Flush:
    conn: Conn
    seq: int


@dataclass
class _Call:
    fn: Callable[[Store], Any]
    future: Future[Any]


#: RPC handlers: op -> fn(daemon, args, conn) -> result. Feature modules add theirs.
RPC_HANDLERS: dict[str, Callable[[Daemon, dict[str, Any], Conn], Any]] = {}
#: Handlers for non-sequenced message types (e.g. checkpoints): t -> fn(daemon, msg, conn).
MESSAGE_HANDLERS: dict[str, Callable[[Daemon, dict[str, Any], Conn], None]] = {}
#: Called once the daemon is up (store open, socket bound): fn(daemon).
STARTUP_HOOKS: list[Callable[[Daemon], None]] = []
#: Called in the liveness sweeper each period: fn(daemon).
PERIODIC_HOOKS: list[Callable[[Daemon], None]] = []


def rpc(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        RPC_HANDLERS[op] = fn
        return fn

    return deco


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
        #: set at shutdown once every reader has read its connection to EOF;
        #: only then may the writer stop (it commits what they queued)
        self._readers_done = threading.Event()
        self._writer_gate = threading.Lock()
        self._writer_exited = False
        self._signals = 0
        self.started = time.time()
        #: ``--max-concurrent-resumes`` (None: $CKPTD_MAX_CONCURRENT_RESUMES or the default)
        self.max_concurrent_resumes: int | None = None

    # ----------------------------------------------------------- lifecycle

    def acquire_lock(self) -> None:
        """One daemon per home: an flock held for the daemon's lifetime."""
        paths.secure_home(self.home)
        fd = os.open(self.home / paths.LOCK_NAME,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(fd, 32, 0).decode().strip() or "?"
            finally:
                os.close(fd)
            raise DaemonAlreadyRunning(
                f"another ckptd daemon (pid {other}) is already running for {self.home}; "
                "use `ckptd status` or `ckptd stop`"
            ) from None
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
        for hook in STARTUP_HOOKS:
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
                try:
                    if len(conn.fds) > MAX_FDS:
                        raise protocol.ProtocolError("too many descriptors sent")
                    for msg in reader.feed(data):
                        self._dispatch(conn, msg)
                except (protocol.ProtocolError, validate.Invalid) as exc:
                    log.warning("bad frame from pid %d: %s", conn.pid, exc)
                    conn.send({"t": protocol.ERROR, "error": str(exc)})
                    break
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

    def _dispatch(self, conn: Conn, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind in protocol.SEQUENCED:
            if conn.run is None:
                raise validate.Invalid(f"{kind} before hello")
            validate.event(msg)
            self.queue.put(_Event(conn, conn.run, conn.attempt, conn.src, msg))
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
        elif kind in MESSAGE_HANDLERS:
            MESSAGE_HANDLERS[kind](self, msg, conn)
        else:
            raise validate.Invalid(f"unknown message type {kind!r}")

    def _rpc(self, conn: Conn, msg: dict[str, Any]) -> None:
        op, args = msg.get("op"), msg.get("args") or {}
        handler = RPC_HANDLERS.get(op) if isinstance(op, str) else None
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
        while True:
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                if self._readers_done.is_set():
                    late = self._close_writer()
                    if late:
                        self._commit(store, late)
                    return
                continue
            batch = [first]
            # Group commit: take everything already queued (up to a bound);
            # under load, batches grow while the previous commit fsyncs.
            # Plain events also wait up to GROUP_WINDOW_S for company: a
            # training loop logging every few ms otherwise costs one commit,
            # one fsync and one ack (a wake-up of the trainer's link thread)
            # per step, taking cores from torch (issue 11). A flush or call
            # ends the wait: nobody waits on events alone. CRASH WINDOW: events
            # not yet committed are still held by their clients (unacked).
            deadline = time.monotonic() + GROUP_WINDOW_S
            while len(batch) < BATCH_MAX:
                try:
                    if isinstance(batch[-1], _Event):
                        left = deadline - time.monotonic()
                        item = self.queue.get(timeout=left) if left > 0 else \
                            self.queue.get_nowait()
                    else:
                        item = self.queue.get_nowait()
                    batch.append(item)
                except queue.Empty:
                    break
            self._commit(store, batch)

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
        after_commit: list[Callable[[], None]] = []
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
                if flushes:
                    # a flush also covers the spool files its client just handed over
                    after_commit.extend(self._ingest_spools(store))
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
        for fn in after_commit:
            fn()
        if seen_runs or flushes:
            crashpoint("events.before_ack")
        for conn, seq in acks.items():
            if seq > conn.acked:
                conn.acked = seq
            conn.send({"t": protocol.ACK, "seq": conn.acked})
        for f in flushes:
            f.conn.send({"t": protocol.FLUSHED, "seq": f.seq})
        if seen_runs or flushes:
            crashpoint("events.after_ack")
        for call, result, exc in calls:
            if exc is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

    # --------------------------------------------------------------- spool

    def _ingest_spools(self, store: Store) -> list[Callable[[], None]]:
        """Apply every spool file no writer holds; return their deletions.

        Deletion happens only after the transaction commits (the caller
        runs the returned callables then), so a crash in between leaves the
        file to be ingested again: harmless, inserts are idempotent.
        """
        spool = paths.spool_dir(self.home)
        cleanups: list[Callable[[], None]] = []
        try:
            names = sorted(os.listdir(spool))
        except FileNotFoundError:
            return cleanups
        for name in names:
            path = spool / name
            if name.endswith(PARTIAL_SUFFIX):
                fd = try_lock(path)
                if fd is not None:  # a writer died between create and rename: empty
                    os.unlink(path)
                    os.close(fd)
                continue
            if not name.endswith(SUFFIX):
                continue
            fd = try_lock(path)
            if fd is None:
                continue  # still being written
            # The lock only proves that its writer is done (writers never
            # reopen a file). Release it now: held until after the commit, a
            # failed commit (disk full) leaked it, and this daemon then skipped
            # the file as "still being written" until a restart.
            os.close(fd)
            events = []
            for msg in read_records(path):
                try:
                    validate.spooled(msg)
                except validate.Invalid as exc:
                    log.warning("skipping bad spool record in %s: %s", path, exc)
                    continue
                events.append((msg.pop("run"), msg.pop("a"), msg.pop("src"), msg))
            for run, attempt in {(e[0], e[1]) for e in events}:
                store.ensure_run(run, attempt)
            store.apply(events)
            log.info("ingested %d events from %s", len(events), name)

            def cleanup(path: Path = path) -> None:
                # CRASH WINDOW: committed, file still here -> ingested again at
                # restart (idempotent); unlinked but the directory not fsynced ->
                # the file may reappear after power loss, same outcome.
                crashpoint("spool.before_unlink")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                crashpoint("spool.after_unlink")

            cleanups.append(cleanup)
        if cleanups:
            cleanups.append(lambda: fsync_dir(spool))
        return cleanups

    def ingest_spools_now(self) -> None:
        def work(store: Store) -> list[Callable[[], None]]:
            return self._ingest_spools(store)

        for fn in self.call_writer(work):
            fn()

    def _spool_loop(self) -> None:
        """Ingest spool files as clients hand them over (watchdog), or every few seconds."""
        observer = None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            kick = self._spool_kick

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event: Any) -> None:
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
            from . import liveness

            for hook in [liveness.sweep, *PERIODIC_HOOKS]:
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
    from . import features  # noqa: F401 - registers RPC handlers and hooks

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


if __name__ == "__main__":
    # Run the copy of this module that feature modules register into, not
    # the separate ``__main__`` copy that ``python -m`` executes.
    from ckptd import daemon as _daemon

    sys.exit(_daemon.main())


__all__ = ["Daemon", "Conn", "rpc"]
