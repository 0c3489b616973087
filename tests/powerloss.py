"""Power-loss simulation: ckptd's home on ext4 on a loop device, cut by copying the image.

The model (see docs/reliability.md):

* the home lives on a fresh ext4 filesystem in an image file, mounted through a
  loop device with ``commit=300`` (the journal commits only when something
  fsyncs) and ``noauto_da_alloc`` (no implicit flush on rename-over);
* kernel writeback is held off (``vm.dirty_writeback_centisecs=0``, a long
  ``dirty_expire_centisecs``), so dirty pages of the loop filesystem reach the
  loop device only when someone fsyncs;
* a power cut = freeze every process writing there (SIGSTOP, wait until all
  their threads stopped and the loop device has no I/O in flight), then copy
  the image file. The copy holds exactly what reached the block device: data
  that was written but never fsynced is not in it, and neither is a rename or
  create whose directory was never synced (unless a later journal commit
  carried it along, as real ext4 would);
* the copy is checked with ``e2fsck -fy`` and mounted elsewhere, read-write,
  like a machine coming back up.

Everything here needs root and ``/dev/loop-control``; :func:`unavailable`
says why a machine cannot run it. All mounts, loop devices and sysctl changes
are undone in ``finally`` blocks, also when a test fails; a SIGTERM (a CI
timeout) while a mount is held is raised as ``KeyboardInterrupt`` so those
blocks run, and a mount whose test process died without them (SIGKILL) is
released by the next mount this module makes (:func:`release_stale`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from helpers import kill_processes_under

T = TypeVar("T")

WRITEBACK = Path("/proc/sys/vm/dirty_writeback_centisecs")
EXPIRE = Path("/proc/sys/vm/dirty_expire_centisecs")
#: Serializes power-loss tests across processes (the sysctls are global).
LOCK = Path("/tmp/ckptd-powerloss.lock")
#: One record per mount held (owner pid and start time, image, mount point):
#: how a later test run finds the mounts of one that was killed.
MOUNTS = Path("/tmp/ckptd-powerloss-mounts")
IMAGE_MB = 64


def unavailable() -> str | None:
    """Why power-loss tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "power-loss tests need root (mount, loop devices, vm sysctls)"
    if not Path("/dev/loop-control").exists():
        return "power-loss tests need /dev/loop-control"
    for tool in ("mkfs.ext4", "e2fsck", "mount", "umount", "losetup"):
        if shutil.which(tool) is None:
            return f"power-loss tests need {tool}"
    if not os.access(WRITEBACK, os.W_OK):
        return f"power-loss tests need a writable {WRITEBACK}"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@contextlib.contextmanager
def writeback_held() -> Iterator[None]:
    """Hold off kernel writeback for the duration; restore the sysctls afterwards.

    An flock serializes holders across processes, so two power-loss tests in
    parallel cannot restore each other's values in the wrong order.
    """
    lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    saved = {p: p.read_text().strip() for p in (WRITEBACK, EXPIRE)}
    try:
        WRITEBACK.write_text("0\n")
        EXPIRE.write_text("360000\n")
        yield
    finally:
        for p, value in saved.items():
            with contextlib.suppress(OSError):
                p.write_text(value + "\n")
        os.close(lock_fd)


@contextlib.contextmanager
def loop_mounted(image: Path, mountpoint: Path, options: str) -> Iterator[None]:
    """``image`` mounted at ``mountpoint`` through a loop device for the
    duration, released on every way out (:func:`release`): an exception in
    the body, a SIGTERM (raised as ``KeyboardInterrupt``), and, through the
    owner record, a SIGKILL of this process (the next call releases it)."""
    release_stale()
    MOUNTS.mkdir(mode=0o700, exist_ok=True)
    record = MOUNTS / f"{os.getpid()}-{time.monotonic_ns()}.json"
    record.write_text(json.dumps({"pid": os.getpid(), "started": _started(os.getpid()),
                                  "image": os.fspath(image), "mnt": os.fspath(mountpoint)}))
    try:
        with _sigterm_raises():
            mountpoint.mkdir(parents=True, exist_ok=True)
            _run("mount", "-t", "ext4", "-o", f"loop,{options}", os.fspath(image),
                 os.fspath(mountpoint))
            yield
    finally:
        release(image, mountpoint)
        record.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` here (pytest then stops after running
    the ``finally`` blocks and teardowns) instead of ending the process on the
    spot with the mount still held. Once the body is left the old handler is
    back: a SIGTERM during :func:`release` ends the process, and the next
    mount releases what is left (:func:`release_stale`). Only the main thread
    can set a handler: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the unwinding is not cut short
        raise KeyboardInterrupt(f"signal {signum} while a power-loss mount was held")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def release(image: Path, mountpoint: Path) -> None:
    """Unmount and detach the loop device, whatever state it was left in.

    Processes still working below the mount point (a daemon or trainer of a
    killed test run) are killed first, or the unmount could only be lazy; a
    busy one is unmounted lazily. ``mount -o loop`` detaches its loop device
    on unmount; ``losetup -d`` detaches one that is still there (the image
    may be deleted by now: found by name in ``losetup --list``).
    """
    kill_processes_under(mountpoint)
    if mounted(mountpoint) and _run("umount", os.fspath(mountpoint), check=False).returncode:
        _run("umount", "-l", os.fspath(mountpoint), check=False)
    for dev in loop_devices(image):
        _run("losetup", "-d", dev, check=False)


def loop_devices(image: Path) -> list[str]:
    """The loop devices backed by ``image`` (also once it was deleted)."""
    out = _run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE", check=False).stdout
    want = os.fspath(image)
    return [d["name"] for d in (json.loads(out)["loopdevices"] if out.strip() else [])
            if (d.get("back-file") or "").removesuffix(" (deleted)") == want]


def mounted(mountpoint: Path) -> bool:
    return _run("mountpoint", "-q", os.fspath(mountpoint), check=False).returncode == 0


def _started(pid: int) -> str | None:
    """A process's start time (field 22 of its stat): tells it from a recycled pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _records() -> list[dict[str, Any]]:
    out = []
    for path in MOUNTS.glob("*.json") if MOUNTS.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            out.append(dict(json.loads(path.read_text()), path=path))
    return out


def release_stale() -> list[Path]:
    """Release the mounts of test processes that died holding them (SIGKILL,
    a CI runner killed): their records name a process that is gone. Mounts
    of live processes (another test run in parallel) are left alone."""
    released = []
    for rec in _records():
        if rec["started"] is not None and _started(rec["pid"]) == rec["started"]:
            continue
        release(Path(rec["image"]), Path(rec["mnt"]))
        rec["path"].unlink(missing_ok=True)
        released.append(Path(rec["mnt"]))
    return released


class LoopHome:
    """An ext4 image mounted through a loop device, with a ckptd home inside."""

    def __init__(self, workdir: Path, size_mb: int = IMAGE_MB) -> None:
        self.workdir = workdir
        self.image = workdir / "disk.img"
        self.mnt = workdir / "mnt"
        self.home = self.mnt / "home"
        self.size_mb = size_mb
        self.cuts: list[Path] = []

    def __enter__(self) -> LoopHome:
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb << 20)
        _run("mkfs.ext4", "-q", "-F", os.fspath(self.image))
        self._mount = loop_mounted(self.image, self.mnt, "commit=300,noauto_da_alloc")
        self._mount.__enter__()
        try:
            self.home.mkdir(mode=0o700)
            dev = next(iter(loop_devices(self.image)), None)
            self.inflight = Path(f"/sys/block/{Path(dev).name}/inflight") if dev else None
        except BaseException as exc:
            self._mount.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mount.__exit__(*exc)

    def _quiet(self, timeout: float = 10.0) -> None:
        """Wait until the loop device has no request in flight, twice in a row."""
        if self.inflight is None:
            time.sleep(0.05)
            return
        deadline = time.monotonic() + timeout
        calm = 0
        while calm < 2 and time.monotonic() < deadline:
            try:
                reads, writes = (int(x) for x in self.inflight.read_text().split())
            except (OSError, ValueError):
                return
            calm = calm + 1 if reads == 0 and writes == 0 else 0
            time.sleep(0.01)

    def cut(self, pids: list[int], name: str,
            observe: Callable[[], T] | None = None) -> tuple[Path, T | None]:
        """Power cut: freeze ``pids``, copy the image (what reached the disk), thaw.

        ``observe()`` runs while everything is frozen: what the processes had
        been told (acks, flushes, durable checkpoints) before the cut. Returns
        the copy and that observation. The processes continue afterwards, so
        one workload yields many cut points.
        """
        frozen = freeze(pids)
        try:
            seen = observe() if observe is not None else None
            self._quiet()
            copy = self.workdir / f"{name}.img"
            shutil.copyfile(self.image, copy)
        finally:
            thaw(frozen)
        self.cuts.append(copy)
        return copy, seen


def _threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


def freeze(pids: list[int], timeout: float = 10.0) -> list[int]:
    """SIGSTOP ``pids`` and wait until every thread of each is stopped.

    A thread inside ``fsync`` stops only when the call returns, so a frozen
    process has no write half-issued by its own thread.
    """
    frozen = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
    deadline = time.monotonic() + timeout
    while not all(_threads_stopped(p) for p in frozen):
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return frozen


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def mounted_cut(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Repair the cut image like a booting machine would, and mount it read-write.

    ``e2fsck`` exit codes: 0 clean, 1 errors fixed (normal after a crash: the
    journal is replayed), 2 fixed and reboot advised; 4 and up mean the file
    system was left damaged, which no power cut may cause.
    """
    fsck = _run("e2fsck", "-fy", os.fspath(image), check=False)
    if fsck.returncode >= 4:
        raise AssertionError(f"e2fsck could not repair {image} ({fsck.returncode}):\n"
                             f"{fsck.stdout}\n{fsck.stderr}")
    with loop_mounted(image, mountpoint, "noauto_da_alloc"):
        yield mountpoint
