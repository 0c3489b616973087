"""The trainer side of ``run.checkpoint()``: snapshot the state into a
sealed memory file, hand it to the daemon, and the handle that reports
the commit. Only the snapshot blocks the training loop (SPEC promise 3).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import errors, protocol, transport
from ..errors import CheckpointError, CkptdError, DaemonUnavailable, DiskFull
from .format import (
    BUFFER_NAME,
    CKPT_DONE,
    SEND_TIMEOUT_S,
    _tensor_views,
    encode_payload,
    human_bytes,
    layout,
)

if TYPE_CHECKING:
    from ..run import Run

# ----------------------------------------------------------------- handles

class CheckpointHandle:
    """The outcome of one ``run.checkpoint()``: resolved when the daemon has
    committed it (durable) or reported why it could not.

    Mirrors ``concurrent.futures.Future``: ``done()``, ``wait(timeout)``,
    ``exception(timeout)``.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.blocked_s = 0.0
        #: seconds per phase, where the writer reports them (a DCP checkpoint's rank)
        self.timings: dict[str, float] = {}
        self.result: dict[str, Any] | None = None
        self._exc: BaseException | None = None
        self._event = threading.Event()
        self._via: Any = None  # the daemon connection it was sent over
        self._msg: dict[str, Any] = {}  # the request, to resend after a daemon restart
        self._resends = 0

    def done(self) -> bool:
        """True once the checkpoint is committed or has failed."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the checkpoint is durable; return its commit facts.

        :raises CheckpointError: (or ``DiskFull``, ``DaemonUnavailable``) when it failed.
        :raises TimeoutError: still being written after ``timeout`` seconds.
        """
        if not self._event.wait(timeout):
            raise TimeoutError(f"checkpoint step {self.step}: not durable after {timeout} s "
                               "(still being written)")
        if self._exc is not None:
            raise self._exc
        assert self.result is not None
        return self.result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error it failed with, None if committed (waits like ``wait``)."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"checkpoint step {self.step}: still being written")
        return self._exc

    def _resolve(self, result: dict[str, Any] | None, exc: BaseException | None) -> None:
        if self._event.is_set():
            return
        self.result, self._exc = result, exc
        self._event.set()

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._exc else "committed")
        return f"<CheckpointHandle step={self.step} {state}>"


# --------------------------------------------------------------- snapshots

class _SharedBuffer:
    """One anonymous memory file, mapped for the life of the training process.

    Reused by every checkpoint; grown (never shrunk) when the state grows.
    Sealed against shrinking, so the daemon may map it without risking a
    SIGBUS; space is reserved with ``posix_fallocate`` so running out of
    memory is an error here, not a SIGBUS in the middle of the copy.
    """

    def __init__(self) -> None:
        self.fd = -1
        self.mm: mmap.mmap | None = None
        self.base: Any = None
        self.capacity = 0
        self.pinned_ptr = 0

    def ensure(self, size: int) -> None:
        """:raises CheckpointError: (``DiskFull`` for ENOSPC) whatever the kernel refused."""
        import torch

        if self.mm is not None and size <= self.capacity:
            return
        capacity = max(-(-size // (1 << 20)) * (1 << 20), 1 << 20)
        try:
            if self.fd < 0:
                fd = os.memfd_create(BUFFER_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                try:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
                except OSError:
                    os.close(fd)
                    raise
                self.fd = fd
            self.unmap()
            os.posix_fallocate(self.fd, 0, capacity)
            self.mm = mmap.mmap(self.fd, capacity,
                                flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            cls = DiskFull if getattr(exc, "errno", None) in (28, 122) else CheckpointError
            raise cls(f"checkpoint: cannot reserve {human_bytes(capacity)} of memory for the "
                      f"snapshot: {getattr(exc, 'strerror', None) or exc}; free memory or "
                      "checkpoint less state") from None
        self.base = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.capacity = capacity

    def pin(self) -> None:
        """Page-lock the mapping so device-to-host copies are DMA (CUDA only)."""
        import torch

        if self.pinned_ptr or self.base is None:
            return
        ptr = self.base.data_ptr()
        # flag 1: cudaHostRegisterPortable (pinned for every device)
        if int(torch.cuda.cudart().cudaHostRegister(ptr, self.capacity, 1)) == 0:
            self.pinned_ptr = ptr

    def unmap(self) -> None:
        if self.pinned_ptr:
            import torch

            int(torch.cuda.cudart().cudaHostUnregister(self.pinned_ptr))
            self.pinned_ptr = 0
        self.base = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with it
            self.mm = None

    def close(self) -> None:
        """Ours goes; a checkpoint in flight keeps the daemon's descriptor alive."""
        self.unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: How often a checkpoint is handed to a new daemon after the one it was sent
#: to died without confirming it (each time bounded by ``connect_wait``).
MAX_RESENDS = 3


#: Sends of one snapshot before checkpoint() gives up (each reconnect is bounded).
SEND_TRIES = 4


class Checkpointer:
    """The checkpoint side of a ``Run``: one dedicated daemon connection, one
    shared buffer, at most one checkpoint in flight."""

    #: How long a new checkpoint waits for the previous one to be committed.
    previous_timeout = 600.0
    #: How long a checkpoint waits for a daemon to start or come back (bounded:
    #: training must not hang on a daemon that cannot start).
    connect_wait = 15.0

    def __init__(self, run: Run) -> None:
        self.run = run
        self._lock = threading.Lock()  # one checkpoint() at a time
        self._sock: socket.socket | None = None
        self._mu = threading.Lock()  # guards _sock, _inflight and sends
        self._inflight: dict[int, CheckpointHandle] = {}
        self._last: CheckpointHandle | None = None
        self._next_id = 0
        self._buffer = _SharedBuffer()
        self._closed = False

    # ------------------------------------------------------------- public

    def checkpoint(self, state: Any, step: int, metrics: dict[str, Any] | None) -> \
            CheckpointHandle:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"checkpoint step must be a non-negative int, not {step!r}")
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"checkpoint metrics must be a dict, not {type(metrics).__name__}")
        values = {k: protocol.check_metric(k, v) for k, v in (metrics or {}).items()}
        self.run._check_rng_placement()
        from .. import rng

        t0 = time.perf_counter()
        tree, tensors = encode_payload(state, rng.capture())
        encode_s = time.perf_counter() - t0
        handle = CheckpointHandle(step)
        with self._lock:
            if self._closed:
                raise CkptdError("checkpoint: the run is finished")
            last = self._last
            if last is not None and not last._event.wait(self.previous_timeout):
                return self._fail(handle, CheckpointError(
                    f"checkpoint step {step}: the previous checkpoint (step {last.step}) is "
                    f"still being written after {self.previous_timeout:.0f} s; skipped"))
            t1 = time.perf_counter()  # waiting for the previous one is not the snapshot
            try:
                msg = self._snapshot_locked(tree, tensors, step, values)
                handle.blocked_s = encode_s + time.perf_counter() - t1
                msg["blocked_s"] = handle.blocked_s
                for attempt in range(SEND_TRIES):
                    try:
                        self._send_locked(msg, handle)
                        break
                    except DaemonUnavailable:
                        # The daemon died under a connection that looked alive (a
                        # kill -9 or restart whose EOF the reader has not seen
                        # yet; under load the next one may still be starting).
                        # The snapshot is in the buffer already: reconnect
                        # (starting a daemon, bounded) and hand it over again.
                        if attempt == SEND_TRIES - 1:
                            raise
                        time.sleep(0.1 * (attempt + 1))
                        self._connect_locked()
            except CkptdError as exc:
                return self._fail(handle, exc)
            self._last = handle
        return handle

    def close(self, timeout: float | None = 30.0) -> None:
        """Wait (bounded) for the checkpoint in flight, then release the buffer
        (the daemon holds its own descriptor of it while it writes)."""
        with self._lock:
            self._closed = True
            last = self._last
        if last is not None:
            last._event.wait(timeout if timeout is not None else 30.0)
        self._buffer.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # ---------------------------------------------------------- internals

    def _snapshot_locked(self, tree: Any, tensors: list[tuple[str, Any]], step: int,
                         metrics: dict[str, Any]) -> dict[str, Any]:
        """Copy every tensor into the shared buffer: the only part the loop waits for."""
        self._connect_locked()  # fail fast, before copying, when no daemon is there
        specs, size = layout(tensors)
        if tensors:
            import torch

            self._buffer.ensure(size)
            views = _tensor_views(self._buffer.base, specs)
            cuda = [t for _, t in tensors if t.device.type == "cuda"]
            if cuda:
                try:
                    self._buffer.pin()
                except Exception:  # noqa: BLE001 - pageable copies are slower, still correct
                    pass
            with torch.no_grad():
                for dst, (_, src) in zip(views, tensors, strict=True):
                    dst.copy_(src.detach(), non_blocking=src.device.type == "cuda")
            del views
            for dev in {t.device for t in cuda}:
                torch.cuda.synchronize(dev)
        else:
            size = 0
        self._next_id += 1
        return {"t": protocol.CKPT, "id": self._next_id, "step": step, "metrics": metrics,
                "size": size, "tree": tree,
                "tensors": specs, "time": time.time(), "pid": os.getpid()}

    def _send_locked(self, msg: dict[str, Any], handle: CheckpointHandle) -> None:
        try:
            frame = protocol.encode(msg)
        except protocol.ProtocolError as exc:
            raise CheckpointError(f"checkpoint step {handle.step}: the state's structure is "
                                  f"too large to describe ({exc})") from None
        with self._mu:
            sock = self._sock
            if sock is None:
                raise DaemonUnavailable(f"checkpoint step {handle.step}: the daemon "
                                        "connection closed")
            self._inflight[msg["id"]] = handle
            handle._via, handle._msg = sock, msg
            try:
                # Blocking sends: when they return, the request and the
                # buffer's descriptor are in the kernel and survive our death
                # (the daemon still reads them). The descriptor rides on the
                # frame's first bytes, so it reaches the daemon before the frame ends.
                if msg["size"]:
                    sent = socket.send_fds(sock, [frame], [self._buffer.fd])
                    if sent < len(frame):
                        sock.sendall(frame[sent:])
                else:
                    sock.sendall(frame)
                return
            except OSError as exc:
                self._inflight.pop(msg["id"], None)
                error = exc
        self._drop(sock, None)
        raise DaemonUnavailable(f"checkpoint step {handle.step}: lost the daemon "
                                f"connection while sending ({error})")

    def _connect_locked(self) -> socket.socket:
        with self._mu:
            if self._sock is not None:
                return self._sock
        try:
            # Start one (or wait for one being started, e.g. by log() after a
            # daemon crash) for a bounded time, like log() does: a checkpoint
            # asked for while the daemon restarts is not dropped.
            sock = transport.connect_or_start(self.run.home, autostart=self.run._autostart,
                                              wait=self.connect_wait)
            sock.settimeout(10)
            sock.sendall(protocol.encode({"t": protocol.HELLO, "run": self.run.id,
                                          "attempt": self.run.attempt, "src": self.run.src,
                                          "pid": os.getpid()}))
        except DaemonUnavailable as exc:
            raise DaemonUnavailable(f"checkpoint: {exc}; the daemon must be running to take "
                                    "checkpoints (`ckptd start`; none started within "
                                    f"{self.connect_wait:.0f} s)") from None
        except OSError as exc:
            raise DaemonUnavailable(f"checkpoint: cannot reach the daemon: {exc}") from None
        # The reader thread blocks in recv() with no timeout; sends still get
        # one, so a hung daemon cannot hold the training loop for ever.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", SEND_TIMEOUT_S, 0))
        with self._mu:
            self._sock = sock
        threading.Thread(target=self._read_loop, args=(sock,), name="ckptd-ckpt",
                         daemon=True).start()
        return sock

    def _read_loop(self, sock: socket.socket) -> None:
        reader = protocol.FrameReader()
        sock.settimeout(None)
        while True:
            try:
                data = sock.recv(65536)
                msgs = reader.feed(data) if data else None
            except (OSError, protocol.ProtocolError):
                msgs = None
            if msgs is None:
                resend = self._take_resendable(sock)
                self._drop(sock, DaemonUnavailable(
                    "checkpoint: the daemon connection closed before the commit was "
                    "confirmed; it may or may not be committed (see `ckptd ckpt ls`)"))
                if resend:
                    self._resend(resend)
                return
            for msg in msgs:
                if msg.get("t") == CKPT_DONE:
                    self._on_done(msg)
                elif msg.get("t") == protocol.ERROR:
                    self.run._warn("ckpt-daemon", f"daemon refused a checkpoint: "
                                   f"{msg.get('error')}")

    def _take_resendable(self, sock: socket.socket) -> list[CheckpointHandle]:
        """Checkpoints sent over ``sock`` that its daemon died without confirming.

        Their snapshot is still in the buffer (the next checkpoint waits for
        them before it copies), so they can be handed to the next daemon: a
        daemon killed (or restarting) just after it read the request would
        otherwise lose a checkpoint the loop was told was taken. A few times
        each (:data:`MAX_RESENDS`); not while the run finishes. A step the dead daemon did commit is
        committed again, which replaces it with the same content.
        """
        with self._mu:
            if self._closed:
                return []
            handles = {k: h for k, h in self._inflight.items()
                       if h._via is sock and h._resends < MAX_RESENDS}
            for k in handles:
                del self._inflight[k]
        return list(handles.values())

    def _resend(self, handles: list[CheckpointHandle]) -> None:
        """Hand ``handles`` to a daemon within ``connect_wait``: one that is still
        dying may take the connection and then close it, so try again."""
        deadline = time.monotonic() + self.connect_wait
        for h in handles:
            h._resends += 1
        while True:
            try:
                self._connect_locked()
                for h in handles:
                    self._send_locked(h._msg, h)
                return
            except DaemonUnavailable as exc:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                error: CkptdError = exc
            except CkptdError as exc:
                error = exc
            for h in handles:
                if not h.done():
                    h._resolve(None, DaemonUnavailable(
                        f"checkpoint step {h.step}: the daemon went away before confirming "
                        f"the commit, and handing it to a new one failed: {error}"))
            return

    def _on_done(self, msg: dict[str, Any]) -> None:
        with self._mu:
            handle = self._inflight.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if handle is None:
            return
        if msg.get("ok"):
            handle._resolve({k: msg.get(k) for k in ("step", "hash", "bytes", "persist_s")}
                            | {"blocked_s": handle.blocked_s}, None)
            return
        exc = errors.error_for(msg.get("kind"), str(msg.get("error")), CheckpointError)
        self.run._warn(f"ckpt-{type(exc).__name__}", str(exc))
        handle._resolve(None, exc)

    def _drop(self, sock: socket.socket, exc: CkptdError | None) -> None:
        with self._mu:
            if self._sock is sock:
                self._sock = None
            pending: dict[int, CheckpointHandle] = {}
            if exc is not None:
                # only what went over this connection: a checkpoint resent over
                # a newer one (after a daemon restart) is still in flight
                pending = {k: h for k, h in self._inflight.items() if h._via is sock}
                for k in pending:
                    del self._inflight[k]
        try:
            sock.close()
        except OSError:
            pass
        for handle in pending.values():
                handle._resolve(None, exc)

    def _fail(self, handle: CheckpointHandle, exc: CkptdError) -> CheckpointHandle:
        """A checkpoint that could not be handed over: say so, keep training."""
        self.run._warn(f"ckpt-{type(exc).__name__}", str(exc))
        try:
            self.run.event(f"checkpoint step {handle.step} failed: {exc}", level="error",
                           step=handle.step)
        except Exception:  # noqa: BLE001 - the event is a courtesy; training goes on
            pass
        handle._resolve(None, exc)
        return handle


def checkpointer_for(run: Run) -> Checkpointer:
    if run._checkpointer is None:
        run._checkpointer = Checkpointer(run)
    return run._checkpointer


__all__ = ["CheckpointHandle", "Checkpointer", "checkpointer_for"]
