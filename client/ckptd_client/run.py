"""The training-side half of ckptd: ``init()`` and the ``Run`` it returns.

Delivery rules (SPEC promises 1 and 4), in the order ``_emit`` applies them:

1. Every event gets the next sequence number of ``(run, attempt, src)``, where
   ``src`` names this writer: random per ``Run`` and renewed in a forked child,
   so two processes of one attempt never share a key (they overwrote each
   other). The daemon inserts idempotently on it, so sending an event twice is
   harmless; the same key with a different payload is reported, not dropped.
2. Connected and the socket has room: the whole frame goes to the kernel with
   one non-blocking ``send``; the event stays in ``_pending`` until the daemon
   acks its commit. A ``kill -9`` of the trainer now loses nothing (the
   daemon still reads what the kernel holds).
3. Otherwise (daemon down, slow, or mid-reconnect) the event is appended to
   the spool file with one ``write``. The training loop never waits on the
   daemon.
4. When the connection breaks, ``_pending`` is moved to the spool at once, so
   a daemon crash followed by a trainer crash still loses nothing. When it
   outgrows ``MAX_PENDING_BYTES`` (a stalled daemon), the oldest frames move
   there a bounded chunk per call, as raw bytes: no ``log()`` pays for a
   backlog it did not create.
5. ``flush()`` hands the spool to the daemon and waits for its commit; with no
   daemon, it fsyncs the spool instead. Either way, returning means durable.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from . import paths, protocol, transport
from .errors import CheckpointError, CkptdError, DaemonUnavailable
from .identity import (
    LEVELS,
    boot_id,
    new_run_id,
    process_start_time,
    valid_run_id,
)
from .spool import SpoolWriter, encode_record

#: Unacked events kept in memory before the oldest are moved to the spool.
MAX_PENDING = 200_000
#: Bytes of unacked frames kept in memory (1 MiB messages made the count bound
#: alone worth gigabytes).
MAX_PENDING_BYTES = 64 << 20
#: Most bytes (and frames) one call moves from memory to the spool: the work a
#: crossing ``log()`` does is bounded, however large the backlog.
SPILL_CHUNK = 1 << 20
SPILL_FRAMES = 4096
#: Seconds a forked child or worker waits at exit for its own events' commit.
CHILD_EXIT_WAIT = 2.0
#: Longest pause between two attempts to start a daemon that failed to start.
MAX_START_BACKOFF = 300.0
#: How a worker process finds the run of the process that started it
#: (``run-id:attempt``, set by ``init()`` in the main process).
PARENT_RUN_ENV = "CKPTD_PARENT_RUN"
#: Events kept in memory when neither the daemon nor the disk takes them.
MAX_BACKLOG = 1_000_000
#: Kernel send buffer asked for the daemon connection (capped by net.core.wmem_max).
#: A deep buffer lets log() hand frames to the kernel while the daemon commits,
#: instead of spilling them to the spool (slower for both sides).
SEND_BUFFER = 4 << 20


def new_src(kind: str = "c") -> str:
    """A writer identity of its own: random, not the pid (pids repeat across
    hosts and reboots, and a forked child must differ from its parent)."""
    return f"{kind}-{os.urandom(6).hex()}"


def is_worker() -> bool:
    """True in a ``multiprocessing`` child (DataLoader workers, pools): such a
    process may log into the run it joined but never finishes or fails it."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return False
    try:
        # a spawned child imports the main module (and so runs its module-level
        # init()) while "inheriting", before parent_process() is set
        return (mp.parent_process() is not None
                or bool(getattr(mp.current_process(), "_inheriting", False)))
    except Exception:  # noqa: BLE001 - an exotic multiprocessing: assume the main process
        return False


class Run:
    """One attempt of a run, as seen from the training process.

    Thread-safe: ``log`` may be called from any thread. Nothing here raises
    on an I/O problem; problems are reported once on stderr and the events
    are kept (spool, then memory) until they can be delivered.
    """

    def __init__(
        self,
        home: Path,
        run_id: str,
        attempt: int = 1,
        *,
        name: str | None = None,
        src: str | None = None,
        autostart: bool = True,
        worker: bool = False,
    ) -> None:
        self.home = home
        self.id = run_id
        self.name = name or run_id
        self.attempt = attempt
        self.resumed = attempt > 1
        self._autostart = autostart
        #: the process that may finish this run (exit hooks act only there);
        #: a forked child or a multiprocessing worker only adds its events
        self._owner_pid = 0 if worker else os.getpid()
        self._spool_dir = paths.spool_dir(home)
        self._warned: set[str] = set()
        self._checkpointer: Any = None
        self._dcp_saver: Any = None  # dcp.DcpSaver, under torch.distributed
        self.restored_step: int | None = None  # set by restore()
        self._finished = False
        #: failed daemon starts back off (it was respawned every 2 s for ever)
        self._start_backoff, self._next_start = 1.0, 0.0
        self._new_writer(src or new_src())

    def _new_writer(self, src: str) -> None:
        """Fresh writer state: identity, counters, locks, connection, spool.

        Run at creation and in a forked child, which must not touch its
        parent's socket, counter or locks (a lock held by a parent thread at
        fork time stays held forever in the child).
        """
        self.src = src
        #: what makes a frame body a spool record (the identity a connection carries)
        run, src_json = protocol.dumps(self.id), protocol.dumps(src)
        self._tag = f',"run":{run},"a":{self.attempt},"src":{src_json}}}'.encode()
        self._lock = threading.Lock()
        self._seq = 0
        self._step = getattr(self, "_step", -1)
        # (seq, frame) of events in the kernel but not yet committed; frames, not
        # dicts, so a long ack lag does not feed the garbage collector (its
        # pauses were a visible part of log()'s p99)
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self._pending_bytes = 0
        #: spool records held in memory while the disk takes no writes
        self._backlog: collections.deque[bytes] = collections.deque()
        self._sock: socket.socket | None = None
        self._busy = False  # a partial frame is being completed; do not interleave
        self._spool: SpoolWriter | None = None
        self._closed = False
        self._flushed_seq = 0
        self._flush_cv = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._wake = threading.Event()
        # the link thread sleeps in select() on this pipe too: close() wakes it
        # at once (it waited out a 0.5 s timeout, so every finish() took 0.5 s)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._link = threading.Thread(target=self._link_loop, name="ckptd-link", daemon=True)
        self._hooks_installed = False
        self._checkpointer: Any = None
        self._dcp_saver: Any = None  # dcp.DcpSaver, under torch.distributed
        self.restored_step: int | None = None  # set by restore()
        self._rng_watch: Any = None  # set by restore(): rng.PlacementWatch
        self._link_started = False
        self.rank, self.world_size = 0, 1  # set by init() under torchrun
        self.node_rank, self.nodes = 0, 1  # set by init() under torchrun (GROUP_RANK...)
        #: registers and ends the run's row in this node's store (see distributed.py)
        self._speaks_for_node = True
        #: the directory all nodes share for checkpoints (init(checkpoint_dir=)), or None
        self.checkpoint_dir: Path | None = None
        self._stop_flag = self._watching_stop = False  # see distributed.install_preemption
        self._stop_signal: int | None = None

    @property
    def should_stop(self) -> bool:
        """True once a preemption notice (SIGTERM/SIGUSR1) arrived: checkpoint and exit.

        The first read installs the handlers (see ``distributed.install_preemption``):
        a script that never asks keeps the signals' default actions.
        """
        if not self._watching_stop:
            self._watching_stop = True
            from .distributed import install_preemption

            install_preemption(self)
        return self._stop_flag

    # ------------------------------------------------------------------ public

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record numeric metrics at ``step`` (the next step when left out).

        :raises TypeError: a value is not a number; nothing of the call is logged.
        :raises ValueError: ``step`` is negative, or more than 10,000 metrics at once.
        """
        if not isinstance(metrics, dict):
            raise TypeError(f"log() takes a dict of metrics, not {type(metrics).__name__}")
        if len(metrics) > protocol.MAX_METRICS:
            raise ValueError(f"log() takes at most {protocol.MAX_METRICS} metrics per call, "
                             f"not {len(metrics)}")
        values = {k: protocol.check_metric(k, v) for k, v in metrics.items()}
        if self._rng_watch is not None:
            self._check_rng_placement()
        with self._lock:
            if step is None:
                step = self._step + 1
            elif not isinstance(step, int) or isinstance(step, bool):
                raise TypeError(f"step must be an int, not {type(step).__name__}")
            elif not 0 <= step <= protocol.INT_MAX:
                raise ValueError(f"step must be between 0 and 2**63-1, not {step}")
            self._step = max(self._step, step)
            self._emit_locked({"t": protocol.LOG, "step": step, "time": time.time(), "m": values})

    def event(self, message: str, level: str = "info", **fields: Any) -> None:
        """Record a log line with structured fields (shown by ``ckptd tail``)."""
        level = str(level).lower()
        if level not in LEVELS:
            raise ValueError(f"level {level!r} is not one of {', '.join(LEVELS)}")
        msg = {"t": protocol.EVENT, "time": time.time(), "level": level,
               "msg": _text(str(message))}
        if fields:
            msg["fields"] = {str(k): _plain(v) for k, v in fields.items()}
        with self._lock:
            msg["step"] = self._step if self._step >= 0 else None
            self._emit_locked(msg)

    def console(self, text: str, stream: str = "stdout", when: float | None = None,
                rank: int | None = None) -> None:
        """Record one line of captured terminal output (what ``ckptd run`` sends);
        ``rank``: the torchrun rank that printed it, when the line said so."""
        msg: dict[str, Any] = {"t": protocol.CONSOLE, "time": when or time.time(),
                               "stream": stream, "text": _text(text)}
        if rank is not None:
            msg["rank"] = rank
        with self._lock:
            self._emit_locked(msg)

    def register_process(self, pid: int) -> None:
        """Name the process doing this attempt's work (what a supervisor says of
        its child, so liveness follows a command that never uses the client)."""
        msg = {"t": protocol.REGISTER, "time": time.time(), "joined": True, "pid": pid,
               "pid_started": process_start_time(pid), "boot_id": boot_id(),
               "host": socket.gethostname()}
        with self._lock:
            self._emit_locked(msg)

    def _check_rng_placement(self) -> None:
        """First log()/checkpoint() after restore(): was restore() placed too early?"""
        watch, self._rng_watch = self._rng_watch, None
        if watch is not None:
            try:
                watch.check()
            except Exception:  # noqa: BLE001 - a diagnostic must never stop training
                pass

    def _report_restored(self, step: int | None) -> None:
        """Tell the daemon this attempt continues after checkpoint ``step``
        (``None``: nothing to restore, it starts over), so what earlier
        attempts logged after that step leaves the effective timeline."""
        if step is None and not self.resumed:
            return  # a first attempt with no checkpoint yet: nothing to say
        msg = {"t": protocol.RESTORED, "time": time.time(),
               "step": -1 if step is None else int(step)}
        with self._lock:
            if step is not None:
                self._step = int(step)
            self._emit_locked(msg)

    def checkpoint(self, state: Any, step: int, metrics: dict[str, Any] | None = None) -> Any:
        """Snapshot ``state`` and hand it to the daemon; returns a ``CheckpointHandle``.

        Blocks only while the tensors are copied into shared memory; the
        daemon writes, fsyncs, hashes and commits. Failures (no daemon, disk
        full) come back through the handle, never as a crash of training.

        :raises TypeError: ``state`` holds something that is not a tensor,
            number, string, None or a dict/list/tuple of them (the message
            names its path, e.g. ``state['opt']['foo']``).
        """
        from . import dcp
        from .checkpoint.snapshot import checkpointer_for

        if dcp.in_process_group():  # collective, in torch.distributed.checkpoint format
            return dcp.save(self, state, step, metrics)
        if self.checkpoint_dir is not None:
            try:
                dcp.link_checkpoint_dir(self)  # the daemon writes there through the link
            except CkptdError as exc:
                from .checkpoint.snapshot import CheckpointHandle

                self._warn("ckpt-dir", str(exc))
                handle = CheckpointHandle(step)
                handle._resolve(None, CheckpointError(f"checkpoint step {step}: {exc}"))
                return handle
        return checkpointer_for(self).checkpoint(state, step, metrics)

    def restore(self, map_location: Any = None, into: Any = None) -> Any:
        """The newest checkpoint that verifies (RNG states restored last), or None.

        ``into`` (e.g. ``{"model": model.state_dict(), "opt": opt.state_dict()}``):
        verify and copy straight into those tensors in one pass over the file
        (required under torch.distributed, where DCP needs the target layout;
        a sharded step is loaded with ``torch.distributed.checkpoint``).

        Call it after the model and optimizer are built, right before the
        training loop: the RNG states are put back at once, so the loop
        (dropout, shuffling before its first ``log()``) draws exactly what
        the interrupted run would have. Called earlier, building the model
        would draw from the restored generators and the resumed run would
        diverge; ckptd notices that (a parameter created after ``restore()``
        and the generator moved by the first ``log()``/``checkpoint()``) and
        warns once, on stderr and as a run event, naming this fix.
        """
        from . import dcp
        from .checkpoint.restore import restore

        if dcp.in_process_group():
            if into is None:
                raise TypeError("under torch.distributed, restore needs the target: "
                                "run.restore(into=state)")
            return dcp.restore(self, into)
        return restore(self, map_location, into)

    def adopt_checkpoint(self, path: str | os.PathLike[str], step: int,
                         metrics: dict[str, Any] | None = None) -> Any:
        """Hand a framework's own checkpoint file or folder to the daemon, which
        copies it into the run, makes it durable, hashes, records and retains it
        like a native checkpoint. Returns a handle; ``.wait()`` raises on failure.
        :meth:`latest_checkpoint_path` gives it back after a resume."""
        from .integrations.adopt import adopt

        return adopt(self, path, step, metrics)

    def latest_checkpoint_path(self) -> str | None:
        """The newest adopted checkpoint that verifies (skipping, with a warning,
        those that do not), as a path to give the framework; None if none."""
        from .integrations.adopt import latest_path

        return latest_path(self)

    def logging_handler(self, level: int = logging.INFO) -> logging.Handler:
        """A ``logging.Handler`` that records each log record as a run event."""
        return _RunHandler(self, level)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Return once every earlier event would survive power loss.

        Waits for the daemon's commit; if the daemon cannot confirm within
        ``timeout`` the unconfirmed events are fsynced to the spool instead,
        which is just as durable. Raises ``CkptdError`` only when neither the
        daemon nor the disk can take them.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._seq
            if self._backlog:
                # Events held in memory while the disk was full: the daemon
                # never saw them, so its flush cannot cover them. Spool them
                # now if the disk takes writes again (found by test_diskfull).
                self._spool_locked([])
            spool, self._spool = self._spool, None
        if spool is not None:
            # hand the spool to the daemon before asking it to flush, so the
            # daemon's flush ingests it
            self._close_spool(spool)
        if self._wait_daemon_flush(target, deadline) and not self._backlog:
            return
        with self._lock:
            self._spill_locked()
            spool, self._spool = self._spool, None
            backlog = len(self._backlog)
        if spool is not None:
            self._close_spool(spool)
        if backlog:
            raise CkptdError(
                f"flush: {backlog} events could be neither delivered to the daemon nor "
                f"written to {self._spool_dir}; is the disk full?"
            )

    def finish(self, status: str = "finished", exit_code: int | None = 0,
               timeout: float | None = 30.0, traceback_text: str | None = None,
               **fields: Any) -> None:
        """Mark the attempt ended and make everything durable (idempotent).

        ``fields`` adds facts only a supervisor knows (``signal``, ``reason``).
        """
        if self._finished:
            return
        self._finished = True
        if not self._owns_run():
            # a forked child or a worker: its events, never the run's end
            self._release()
            return
        if self._checkpointer is not None:
            self._checkpointer.close(timeout=timeout)
        if self._dcp_saver is not None:
            self._dcp_saver.close(timeout=timeout)
            if status == "finished" and self._dcp_saver.peer_failed:
                # rank 0 ran its loop to the end, but a peer died inside a checkpoint:
                # torchrun restarts the group, so this attempt did not finish the job
                status = "failed"
                fields.setdefault("reason", self._dcp_saver.peer_failed)
        if status == "finished" and self._stop_flag:
            status = "preempted"  # exited after a preemption notice: to be resumed
        msg: dict[str, Any] = {"t": protocol.STATUS, "time": time.time(), "status": status,
                               "exit_code": exit_code}
        if not self._speaks_for_node:  # rank 0 speaks for the run (local rank 0 for a
            # node's member row); the other ranks' ends are events
            msg = {"t": protocol.EVENT, "time": time.time(), "level": "info",
                   "msg": f"rank {self.rank} {status}"}
        if traceback_text:
            msg["traceback"] = _text(traceback_text)
        msg.update({k: v for k, v in fields.items() if v is not None})
        with self._lock:
            self._emit_locked(msg)
        try:
            self.flush(timeout=timeout)
        except CkptdError as exc:
            self._warn("finish", str(exc))
        self.close()

    def close(self) -> None:
        """Stop the background thread and release the socket and spool."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._poke()
        if self._link.is_alive() and threading.current_thread() is not self._link:
            self._link.join(timeout=5)
        with self._lock:
            self._spill_locked()  # anything unacked, or held in memory, is kept on disk
            if self._sock is not None:
                self._drop_locked()
            spool, self._spool = self._spool, None
        if spool is not None:
            self._close_spool(spool)
        _RUNS.discard(self)

    def _owns_run(self) -> bool:
        return self._owner_pid == os.getpid()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _release(self) -> None:
        """A forked child or worker leaving: make its own events durable with a
        bounded wait (it hung ~10 s waiting for replies meant for its parent)."""
        try:
            self.flush(timeout=CHILD_EXIT_WAIT)
        except Exception as exc:  # noqa: BLE001 - exiting; the spool keeps what it can
            self._warn("finish", str(exc))
        self.close()

    def _after_fork_in_child(self) -> None:
        """This process is a fork of the run's process: become a writer of its own."""
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        sock, spool = self._sock, self._spool
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # our copy of the fd only; the parent's connection lives on
        if spool is not None:
            spool.forget()  # the parent still appends to it and holds its lock
        self._checkpointer = self._dcp_saver = None
        if self._owner_pid:
            self._owner_pid = -1  # a fork never finishes the run
        self._new_writer(new_src(self.src.split("-", 1)[0]))  # same kind: c or r<rank>

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(status="interrupted", exit_code=None, **STOPPED_BY_CTRL_C)
        else:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            self.finish(status="failed", exit_code=1, traceback_text=text)

    # ------------------------------------------------------------- internals

    def start(self, register: dict[str, Any] | None) -> None:
        """Connect (starting a daemon when allowed), register, start the link thread.

        ``register`` is None when the attempt was already begun by the daemon
        (``ckptd resume``): the connection only says who it is.
        """
        try:
            sock = transport.connect_or_start(self.home, autostart=self._autostart)
        except transport.DaemonStartFailed as exc:
            self._start_failed(exc)
            sock = None
        except (CkptdError, OSError) as exc:
            self._warn("connect", f"{exc}; events go to the spool until a daemon appears")
            sock = None
        with self._lock:
            if sock is not None:
                self._attach_locked(sock)
            self._start_link_locked()
            if register is not None:
                self._emit_locked(dict(register, t=protocol.REGISTER, time=time.time()))
        _RUNS.add(self)

    def _start_link_locked(self) -> None:
        if not self._link_started:
            self._link_started = True
            self._link.start()

    def _connect_child_locked(self) -> None:
        """A forked child's first event: its own connection, made now (lazily:
        most forks never log), so its events reach the kernel before log()
        returns, as the parent's do. Exit hooks for the child come with it."""
        self._start_link_locked()
        try:
            sock = transport.connect_or_start(self.home, autostart=False)
        except CkptdError:
            sock = None  # the spool takes the events; the link thread reconnects
        if sock is not None:
            self._attach_locked(sock)
        mp = sys.modules.get("multiprocessing")
        if mp is not None:
            # a multiprocessing child leaves through os._exit: atexit never
            # runs there, its finalizers do
            with contextlib.suppress(Exception):
                mp.util.Finalize(self, self._exit_hook, exitpriority=10)

    def _attach_locked(self, sock: socket.socket) -> bool:
        hello = protocol.encode({"t": protocol.HELLO, "run": self.id, "attempt": self.attempt,
                                 "src": self.src, "pid": os.getpid()})
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            sock.settimeout(5)
            sock.sendall(hello)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return False
        self._sock = sock
        return True

    def _emit_locked(self, msg: dict[str, Any]) -> None:
        """Deliver one event: socket if it takes the whole frame now, else spool."""
        if not self._link_started:
            self._connect_child_locked()
        self._seq += 1
        msg["seq"] = self._seq
        frame = protocol.encode(msg)
        sock = self._sock
        if sock is not None and not self._busy:
            try:
                n = sock.send(frame)
            except BlockingIOError:
                n = 0
            except OSError:
                self._spill_locked()
                self._drop_locked()
                n = -1
            if n == len(frame):
                self._pending.append((self._seq, frame))
                self._pending_bytes += len(frame)
                if (self._pending_bytes > MAX_PENDING_BYTES
                        or len(self._pending) > MAX_PENDING):
                    self._spill_oldest_locked()
                return
            if n > 0:
                # The kernel took part of the frame: the rest must follow
                # before any other frame, so a helper finishes it while
                # events go to the spool.
                self._busy = True
                threading.Thread(target=self._finish_frame, args=(sock, frame[n:]),
                                 daemon=True).start()
        self._spool_locked([self._record(frame)])

    def _record(self, frame: bytes) -> bytes:
        """The spool record of a wire frame, without decoding it: the body is a
        JSON object, so the writer's identity is spliced in before its ``}``."""
        return encode_record(frame[protocol.HEADER.size:-1] + self._tag)

    def _spool_locked(self, msgs: list[bytes]) -> None:
        """Append records ``msgs`` to the spool; ``[]`` retries only the memory backlog."""
        if not msgs:
            if not self._backlog:
                return
            msgs, self._backlog = list(self._backlog), collections.deque()
        try:
            if self._spool is None:
                self._spool = SpoolWriter(self._spool_dir, self.id, self.attempt, self.src)
            self._spool.append(b"".join(msgs))
        except OSError as exc:
            self._warn("spool", f"cannot write the spool in {self._spool_dir}: {exc}; "
                       "keeping events in memory")
            self._backlog.extend(msgs)
            while len(self._backlog) > MAX_BACKLOG:
                self._backlog.popleft()
                self._warn("backlog", "memory backlog full; dropping the oldest events")
            return
        if self._backlog:
            # the disk takes writes again: move the memory backlog there too
            backlog, self._backlog = list(self._backlog), collections.deque()
            self._spool_locked(backlog)

    def _spill_locked(self) -> None:
        """Move unacked events to the spool (connection lost, or closing)."""
        if self._pending:
            msgs = [self._record(frame) for _, frame in self._pending]
            self._pending.clear()
            self._pending_bytes = 0
            self._spool_locked(msgs)
        elif self._backlog:
            self._spool_locked([])

    def _spill_oldest_locked(self) -> None:
        """Memory bound hit: move the oldest unacked frames to the spool, at most
        ``SPILL_CHUNK`` bytes per call, down to three quarters of the bound (the
        crossing call re-spooled 200,000 frames and stalled log() 6-8 s)."""
        low_bytes, low_count = MAX_PENDING_BYTES * 3 // 4, MAX_PENDING * 3 // 4
        msgs: list[bytes] = []
        moved = 0
        while (self._pending and moved < SPILL_CHUNK and len(msgs) < SPILL_FRAMES
               and (self._pending_bytes > low_bytes or len(self._pending) > low_count)):
            _, frame = self._pending.popleft()
            self._pending_bytes -= len(frame)
            moved += len(frame)
            msgs.append(self._record(frame))
        if msgs:
            self._spool_locked(msgs)

    def _drop_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._busy = False
        self._flush_cv.notify_all()
        self._wake.set()

    def _close_spool(self, spool: SpoolWriter) -> None:
        try:
            spool.close(sync=True)
        except OSError as exc:
            self._warn("spool-sync", f"cannot sync spool {spool.path}: {exc}")

    def _finish_frame(self, sock: socket.socket, rest: bytes) -> None:
        ok = _send_all(sock, rest, timeout=30.0)
        with self._lock:
            if self._sock is sock:
                if ok:
                    self._busy = False
                    self._flush_cv.notify_all()
                else:
                    self._spill_locked()
                    self._drop_locked()

    def _wait_daemon_flush(self, target: int, deadline: float | None) -> bool:
        with self._lock:
            while self._busy and self._sock is not None:
                if not self._flush_cv.wait(_remaining(deadline, 1.0)) and _expired(deadline):
                    return False
            if self._sock is None:
                return False
            sock = self._sock
            frame = protocol.encode({"t": protocol.FLUSH, "seq": target})
            self._busy = True
        ok = _send_all(sock, frame, timeout=_remaining(deadline, 30.0))
        with self._lock:
            if self._sock is sock:
                self._busy = False
                self._flush_cv.notify_all()
            if not ok:
                return False
            while self._flushed_seq < target and self._sock is sock:
                if not self._flush_cv.wait(_remaining(deadline, 1.0)) and _expired(deadline):
                    return False
            return self._flushed_seq >= target

    def _link_loop(self) -> None:
        """Read acks; reconnect (and hand over the spool) after a lost connection."""
        reader = protocol.FrameReader()
        delay = 0.05
        while not self._stop.is_set():
            with self._lock:
                sock = self._sock
            if sock is None:
                if self._closed:
                    return
                self._wake.wait(delay)
                self._wake.clear()
                if self._stop.is_set():
                    return
                # Connecting is cheap and retried often; starting a daemon that
                # failed to start is not (it was respawned every 2 s forever).
                may_start = self._autostart and time.monotonic() >= self._next_start
                try:
                    new = transport.connect_or_start(self.home, autostart=may_start,
                                                     wait=5.0)
                except transport.DaemonStartFailed as exc:
                    self._start_failed(exc)
                    delay = min(delay * 2, 2.0)
                    continue
                except Exception:  # noqa: BLE001 - nothing may end this thread
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                self._start_backoff = 1.0
                reader = protocol.FrameReader()
                with self._lock:
                    attached = self._attach_locked(new)
                    spool, self._spool = self._spool, None
                if attached and spool is not None:
                    self._close_spool(spool)  # the daemon ingests it now
                continue
            try:
                ready, _, _ = select.select([sock, self._wake_r], [], [], 0.5)
                if self._wake_r in ready:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                if sock not in ready:
                    continue
                data = sock.recv(65536)
            except (OSError, ValueError):
                data = b""
            try:
                msgs = reader.feed(data) if data else None
            except protocol.ProtocolError:
                msgs = None
            with self._lock:
                if msgs is None:
                    if self._sock is sock:
                        self._spill_locked()
                        self._drop_locked()
                    continue
                for msg in msgs:
                    self._handle_reply_locked(msg)

    def _start_failed(self, exc: Exception) -> None:
        """Report once, and wait longer before each next start (doubling)."""
        self._warn("autostart", f"{exc}; retrying with back-off, events go to the spool "
                   "meanwhile")
        self._next_start = time.monotonic() + self._start_backoff
        self._start_backoff = min(self._start_backoff * 2, MAX_START_BACKOFF)

    def _handle_reply_locked(self, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == protocol.ACK:
            seq = msg.get("seq", 0)
            while self._pending and self._pending[0][0] <= seq:
                self._pending_bytes -= len(self._pending.popleft()[1])
        elif kind == protocol.FLUSHED:
            self._flushed_seq = max(self._flushed_seq, int(msg.get("seq", 0)))
            self._flush_cv.notify_all()
        elif kind == protocol.ERROR:
            self._warn("daemon", f"daemon reported: {msg.get('error')}")

    def _warn(self, key: str, text: str) -> None:
        """One line on stderr per kind of problem; never an exception."""
        if key in self._warned:
            return
        self._warned.add(key)
        try:
            sys.stderr.write(f"ckptd: {text}\n")
        except Exception:
            pass

    def _exit_hook(self) -> None:
        """At exit, or from a multiprocessing child's finalizer: the owning
        process finishes the run; any other only hands over its own events."""
        if self._finished:
            return
        if self._owns_run():
            self.finish(timeout=10)
        else:
            self._finished = True
            self._release()

    def _uncaught(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._finished or not self._owns_run():
            self._exit_hook()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(status="interrupted", exit_code=None, timeout=10, **STOPPED_BY_CTRL_C)
        else:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            self.finish(status="failed", exit_code=1, timeout=10, traceback_text=text)


#: Runs of this process not yet closed: what the exit hooks act on.
_RUNS: set[Run] = set()
_hooks_pid = 0


def _install_process_hooks() -> None:
    """One excepthook and one atexit hook per process, dispatching to the live
    runs (each init() wrapped sys.excepthook again: ~1000 inits in one process
    ended in RecursionError). A forked child inherits them; they know it."""
    global _hooks_pid
    if _hooks_pid:
        return
    _hooks_pid = os.getpid()
    previous = sys.excepthook

    def hook(exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            for run in list(_RUNS):
                try:
                    run._uncaught(exc_type, exc, tb)
                except Exception:  # noqa: BLE001 - the next run and the traceback still count
                    pass
        finally:
            previous(exc_type, exc, tb)

    sys.excepthook = hook
    atexit.register(_at_exit)


def _at_exit() -> None:
    for run in list(_RUNS):
        try:
            run._exit_hook()
        except Exception:  # noqa: BLE001 - exiting
            pass


def _after_fork_in_child() -> None:
    for run in list(_RUNS):
        run._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _RunHandler(logging.Handler):
    def __init__(self, run: Run, level: int) -> None:
        super().__init__(level)
        self._run = run

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            if level not in LEVELS:
                level = "info"
            self._run.event(record.getMessage(), level=level, logger=record.name)
        except Exception:
            self.handleError(record)


#: Ctrl-C (SIGINT) is a person's stop: auto-resume must not bring the run back.
STOPPED_BY_CTRL_C: dict[str, Any] = {"auto_resume": 0,
                                     "reason": "stopped: KeyboardInterrupt (SIGINT)"}


def _utf8(text: str) -> str:
    """Escape lone surrogates (``os.fsdecode`` of a non-UTF-8 file name gives
    them): the store holds UTF-8 only, and the daemon refuses such text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _text(text: str) -> str:
    """Text as the daemon accepts it: UTF-8, no NUL, at most ``MAX_TEXT`` characters.
    Refused there, it would cost the connection and the event, long after the call
    returned (a program printing binary, a log line holding a whole tensor)."""
    text = _utf8(text)
    if "\0" in text:
        text = text.replace("\0", "\\0")
    if len(text) > protocol.MAX_TEXT:
        cut = len(text) - protocol.MAX_TEXT + 64
        text = text[: protocol.MAX_TEXT - 64] + f" ... [{cut} characters cut by ckptd]"
    return text


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", 1) == 0:
        try:
            return item()
        except Exception:
            pass
    return str(value)


def _remaining(deadline: float | None, cap: float) -> float:
    if deadline is None:
        return cap
    return max(0.0, min(cap, deadline - time.monotonic()))


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _send_all(sock: socket.socket, data: bytes, timeout: float) -> bool:
    """Send ``data`` on a non-blocking socket within ``timeout``."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        try:
            n = sock.send(view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        except OSError:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            select.select([], [sock], [], min(left, 0.5))
        except (OSError, ValueError):
            return False
    return True


def init(
    project: str | None = None,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    seed: int | None = None,
    resume: str = "auto",
    home: str | os.PathLike[str] | None = None,
    retention: Any = None,
    autostart: bool = True,
    group: str | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> Run:
    """Start (or join, or resume) a run and return it.

    Inside a process launched by ``ckptd run`` / ``ckptd resume`` the run id
    and attempt come from ``CKPTD_RUN_ID`` / ``CKPTD_ATTEMPT``: the process
    joins that run. Otherwise a new run is registered with everything
    ``ckptd resume`` needs to relaunch it.

    ``checkpoint_dir`` (else ``CKPTD_CHECKPOINT_DIR``): keep the run's
    checkpoints in ``<checkpoint_dir>/<run-id>/`` instead of the home, a
    directory every node of a multi-node job sees (NFS, Lustre); the home
    links to it (see ``ckptd_client.dcp``).
    """
    home_path = paths.checked_home(home)
    shared = checkpoint_dir if checkpoint_dir is not None else \
        os.environ.get("CKPTD_CHECKPOINT_DIR") or None
    if shared is not None and (not os.fspath(shared) or "\0" in os.fspath(shared)):
        raise CkptdError(f"checkpoint_dir {shared!r} must be a directory path")
    try:
        paths.secure_home(home_path)
    except OSError as exc:  # a home that cannot be created (read-only file system)
        raise CkptdError(f"cannot use data home {home_path}: {exc.strerror or exc}; point "
                         "CKPTD_HOME or home= at a writable directory") from None
    worker = is_worker()
    from . import distributed

    ranks = distributed.env_ranks()
    env_id = os.environ.get("CKPTD_RUN_ID") if resume != "never" else None
    attempt_text = os.environ.get("CKPTD_ATTEMPT", "1")
    if not env_id and worker and resume != "never" and os.environ.get(PARENT_RUN_ENV):
        # a spawned worker of a script that called init(): its run, not a new one
        env_id, _, attempt_text = os.environ[PARENT_RUN_ENV].rpartition(":")
    if env_id:
        if not valid_run_id(env_id):
            raise CkptdError(f"CKPTD_RUN_ID={env_id!r} is not a valid run id")
        run_id = env_id
        try:
            attempt = int(attempt_text)
        except ValueError:
            raise CkptdError("CKPTD_ATTEMPT must be an integer") from None
    else:
        run_id, attempt = new_run_id(), 1
    if ranks is not None:  # torchrun: every rank joins one run (see distributed.py)
        if not env_id:
            run_id = distributed.agree_run_id(ranks, run_id)
        attempt += ranks.restart_count
    if name is not None and (not isinstance(name, str) or not name.strip()
                             or "\0" in name or len(name) > 200 or not protocol.is_utf8(name)):
        raise CkptdError(f"run name {name!r} must be non-empty UTF-8 text of at most 200 "
                         "characters without NUL")
    if project is not None and (not isinstance(project, str) or "\0" in project
                                or len(project) > 4096 or not protocol.is_utf8(project)):
        # the daemon refuses such a registration: the run would lose it
        raise CkptdError(f"project {project!r} must be UTF-8 text of at most 4096 "
                         "characters without NUL")
    if group is not None and (not isinstance(group, str) or not group.strip() or "\0" in group
                              or len(group) > 200 or not protocol.is_utf8(group)):
        # the daemon refuses such a registration: the run would lose it
        raise CkptdError(f"group {group!r} must be non-empty UTF-8 text of at most 200 "
                         "characters without NUL")
    if config is not None and not isinstance(config, dict):
        raise TypeError("config must be a dict")
    if seed is not None:
        from .rng import seed_everything

        seed_everything(seed)
    worker = worker and bool(env_id)  # a worker's run of its own is its own to finish
    run = Run(home_path, run_id, attempt, name=name, autostart=autostart, worker=worker,
              src=new_src(distributed.src_kind(ranks.rank)) if ranks else None)
    if shared is not None:
        run.checkpoint_dir = Path(shared).expanduser().absolute()
    if ranks is not None:
        run.rank, run.world_size = ranks.rank, ranks.world_size
        run.node_rank, run.nodes = ranks.node_rank, ranks.nodes
        run._speaks_for_node = ranks.speaks_for_node
    if worker:
        # A worker adds events to the run it joined; registering would make
        # its pid the attempt's (and its exit the run's end).
        run.start(None)
        _install_process_hooks()
        return run
    register: dict[str, Any] = {
        "name": name,
        "project": project,
        "group": group,
        "config": {str(k): _plain(v) for k, v in (config or {}).items()},
        "seed": seed,
        "pid": os.getpid(),
        "pid_started": process_start_time(),
        "boot_id": boot_id(),
        "host": socket.gethostname(),
        "joined": bool(env_id) or (ranks is not None and (ranks.restart_count > 0
                                                          or ranks.rank != 0)),
    }
    if ranks is not None:
        register.update(world_size=ranks.world_size, nodes=ranks.nodes,
                        node_rank=ranks.node_rank)
    if not register["joined"]:
        register.update(
            command=_relaunch_command(),
            cwd=os.getcwd(),
            env={k: v for k, v in os.environ.items() if k != PARENT_RUN_ENV},
            provenance=_provenance(seed),
        )
    if retention is not None:
        register["retention"] = retention.to_dict() if hasattr(retention, "to_dict") else retention
    run.start(register if run._speaks_for_node else None)
    if ranks is not None and ranks.nodes > 1 and run._speaks_for_node:
        run.event(f"node {ranks.node_rank} of {ranks.nodes} ({socket.gethostname()}): "
                  + ("this store owns the run (rank 0's node)" if ranks.rank == 0 else
                     "a member: the run, its checkpoints and rank 0 are in node 0's store")
                  + f"; world size {ranks.world_size}, {ranks.local_world_size} ranks here")
    _install_process_hooks()
    if not worker:
        # what this process's spawned workers join (see is_worker)
        os.environ[PARENT_RUN_ENV] = f"{run_id}:{attempt}"
    return run


def _relaunch_command() -> list[str] | None:
    """How ``ckptd resume`` starts this program again: this interpreter with
    the original command line, so ``python -m pkg.train`` stays ``-m`` (a
    path to the module file would break its relative imports) and options
    like ``-X`` are kept. None for an interactive session (nothing to rerun)."""
    if not sys.argv or not sys.argv[0]:
        return None
    orig = getattr(sys, "orig_argv", None)
    if orig and len(orig) > 1:
        return [sys.executable, *orig[1:]]  # `-c CODE` is kept whole, too
    return [sys.executable, *sys.argv]


def _provenance(seed: int | None) -> dict[str, Any]:
    """What a person needs to trust that a resumed run is the same program."""
    from .provenance import collect

    info = collect()
    info["seed"] = seed
    return info


__all__ = ["Run", "init", "is_worker", "CkptdError", "DaemonUnavailable"]
