"""A real machine with a real init, for the boot tests: systemd as PID 1 in systemd-nspawn.

Why a container and not the test host: the host's PID 1 is not systemd, and
what the boot tests prove (the shipped unit starts the daemon at boot through
lingering, ``Type=notify`` reaches active, auto-resume brings the run back
with no command typed) needs a real systemd that boots, is cut, and boots
again.

* The root filesystem is a Debian minbase built once by ``mmdebstrap`` and
  cached under ``/var/tmp/ckptd-boot-rootfs/<key>`` (the key hashes the
  package list and suite). Each machine boots an overlayfs copy of it, so its
  writes (the ckptd home, the unit, lingering) persist across the machine's
  boots and vanish with the test.
* The checkout under test and the Python installation are bind-mounted
  read-only at the same paths, so ``sys.executable`` and the recorded
  commands mean the same thing inside as outside.
* A power cut is ``kill -9`` of nspawn and of the container's PID 1 at once:
  the kernel then SIGKILLs every process in the container's PID namespace, so
  no process runs any code after the cut. What this does not model is the
  loss of unsynced data (the overlay's files stay in the host's page cache);
  ``tests/powerloss.py`` covers that.
* nspawn runs without a host systemd (``--register=no --keep-unit``), so it
  puts the container in the cgroup it was started in. Each boot gets its own
  cgroup (in the ``name=systemd`` and unified hierarchies), removed after the
  boot ends; a killed container would otherwise leave its cgroups behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

SUITE = "bookworm"
#: systemd and logind (lingering needs logind, logind needs dbus); python3-minimal
#: is not used by the tests (they bind the host's Python) but keeps `python3` sane;
#: libsqlite3-0 is what the bound Python's _sqlite3 links against.
PACKAGES = ("systemd", "dbus", "libpam-systemd", "python3-minimal", "libsqlite3-0")
CACHE = Path(os.environ.get("CKPTD_BOOT_ROOTFS_CACHE", "/var/tmp/ckptd-boot-rootfs"))
CGROUP = Path("/sys/fs/cgroup")
#: The hierarchies a booted systemd uses on a hybrid host (and the only one on cgroup v2).
HIERARCHIES = ("systemd", "unified")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why this machine cannot run the boot tests, or None when it can."""
    if os.geteuid() != 0:
        return "boot tests need root (systemd-nspawn, overlay mounts, cgroups)"
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            return (f"boot tests need {tool} (apt-get install -y systemd-container "
                    "mmdebstrap)")
    if not _cached_rootfs().exists() and shutil.which("mmdebstrap") is None:
        return "boot tests need mmdebstrap to build their root filesystem"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "boot tests need overlayfs"
    if not any((CGROUP / h / "cgroup.procs").exists() for h in HIERARCHIES) \
            and not (CGROUP / "cgroup.procs").exists():
        return "boot tests need a cgroup hierarchy for systemd"
    return None


def _mirror() -> str:
    """The Debian mirror apt on this host uses (a CI may point it at a local one)."""
    override = os.environ.get("CKPTD_BOOT_MIRROR")
    if override:
        return override
    for src in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        with contextlib.suppress(OSError):
            m = re.search(r"(?:URIs:|^deb)\s+(\S+/debian)\b", src.read_text(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def _cached_rootfs() -> Path:
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    return CACHE / key / "root"


def rootfs() -> Path:
    """The cached root filesystem, built on first use (~30 s, ~225 MB).

    An flock makes parallel sessions build it once; it is built next to its
    final place and renamed there, so a build cut short is never used.
    """
    root = _cached_rootfs()
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.exists():
            return root
        tmp = root.parent / f"building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
             os.fspath(tmp), _mirror()],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"mmdebstrap failed ({proc.returncode}):\n{tail}")
        os.rename(tmp, root)
    return root


class Machine:
    """One machine: an overlay root that persists across its boots, booted by nspawn."""

    def __init__(self, lower: Path, workdir: Path, binds: Sequence[Path]) -> None:
        self.lower = lower
        self.workdir = workdir
        self.root = workdir / "root"
        self.binds = [Path(b) for b in binds]
        self.name = f"ckptd-boot-{uuid.uuid4().hex[:8]}"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.boots = 0
        self._cgroups: list[Path] = []
        #: This boot's cgroups: nspawn and the container below them, and
        #: ``login/``, where the processes :meth:`sh` starts live (as a
        #: user's SSH session would be part of the machine).
        self._boot_cgroups: list[Path] = []
        self._mounted = False

    # ---------------------------------------------------------------- disk
    def mount(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.root):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={upper},workdir={work}",
                        os.fspath(self.root)], check=True, capture_output=True, timeout=30)
        self._mounted = True
        # one machine id for all its boots (an empty one would make every boot a first boot)
        (self.root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        # a persistent journal: a failure message can show what earlier boots logged
        (self.root / "var" / "log" / "journal").mkdir(parents=True, exist_ok=True)

    def path(self, inside: str | os.PathLike[str]) -> Path:
        """Where a path inside the machine is on the host (it persists across boots)."""
        return self.root / os.fspath(inside).lstrip("/")

    # ---------------------------------------------------------------- power
    def boot(self, timeout: float = 90) -> float:
        """Power on and wait until systemd says the system is up; return the seconds."""
        assert self.nspawn is None, "already running"
        self.boots += 1
        t0 = time.monotonic()
        cgroups = self._boot_cgroups = self._new_cgroups()
        log = open(self.workdir / f"console-{self.boots}.log", "wb")  # noqa: SIM115
        cmd = ["systemd-nspawn", "-q", "-D", os.fspath(self.root), "-b", "--register=no",
               "--keep-unit", f"--machine={self.name}", "--console=read-only",
               *[f"--bind-ro={b}" for b in self.binds]]

        def enter_cgroups() -> None:  # in the child, before exec
            for cg in cgroups:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        self.nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       preexec_fn=enter_cgroups, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        self.pid1 = self._wait(self._find_pid1, deadline, "the container's PID 1")
        self._wait(lambda: self.path_in_proc("/run/systemd/private").exists(), deadline,
                   "systemd's private socket")
        left = max(deadline - time.monotonic(), 1)
        state = self.sh("systemctl is-system-running --wait", timeout=left,
                        check=False).stdout.strip()
        if state not in ("running", "degraded"):
            raise AssertionError(f"boot {self.boots}: system is {state!r}\n{self.console()}")
        return time.monotonic() - t0

    def power_cut(self) -> float:
        """Everything in the machine stops at once; return the host's wall clock at the cut.

        Frozen first (the cgroup v2 freezer), so no process in it sees another
        die and reacts; then PID 1 is killed, which makes the kernel SIGKILL
        its whole PID namespace, and nspawn too, or it would report the exit
        and clean up politely.
        """
        assert self.nspawn is not None and self.pid1 is not None
        frozen = self.freeze()
        cut = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid1, signal.SIGKILL)
        self.nspawn.kill()
        if frozen:
            self.freeze(False)
        self._ended()
        return cut

    def freeze(self, on: bool = True) -> bool:
        """Stop (or let go on) every process of the machine: its init, its
        services, nspawn, and what :meth:`sh` started. False where there is
        no cgroup v2 freezer."""
        knob = next((cg / "cgroup.freeze" for cg in self._boot_cgroups
                     if (cg / "cgroup.freeze").exists()), None)
        if knob is None:
            return False
        knob.write_text("1\n" if on else "0\n")
        want = "frozen 1" if on else "frozen 0"
        self._wait(lambda: want in (knob.parent / "cgroup.events").read_text(),
                   time.monotonic() + 10, f"the machine to be {'frozen' if on else 'thawed'}")
        return True

    def shutdown(self, timeout: float = 90) -> float:
        """A clean power-off: SIGTERM to nspawn asks the container's systemd to shut
        down. Returns the seconds until nspawn exited (``timeout`` if it never did,
        and the power was cut)."""
        if self.nspawn is None:
            return 0.0
        t0 = time.monotonic()
        self.nspawn.terminate()
        try:
            self.nspawn.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.power_cut()
            return timeout
        took = time.monotonic() - t0
        self._ended()
        return took

    def close(self) -> None:
        """Power off if on, remove the boot's cgroups, unmount the overlay. Idempotent."""
        with contextlib.suppress(Exception):
            if self.nspawn is not None:
                self.power_cut()
        if self._mounted:
            subprocess.run(["umount", "-l", os.fspath(self.root)], capture_output=True,
                           timeout=30)
            self._mounted = False
        with contextlib.suppress(OSError):
            (Path("/run/systemd/nspawn/propagate") / self.name).rmdir()

    def _ended(self) -> None:
        assert self.nspawn is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.nspawn.wait(timeout=30)
        if self.pid1 is not None:
            self._wait(lambda: not Path(f"/proc/{self.pid1}").exists(),
                       time.monotonic() + 30, "the container's PID 1 to be gone")
        self.nspawn = None
        self.pid1 = None
        self._boot_cgroups = []
        self._remove_cgroups()

    # ---------------------------------------------------------------- cgroups
    def _new_cgroups(self) -> list[Path]:
        cgs = []
        for h in HIERARCHIES:
            if (CGROUP / h / "cgroup.procs").exists():
                cg = CGROUP / h / f"{self.name}-boot{self.boots}"
                cg.mkdir()
                cgs.append(cg)
        if not cgs:  # pure cgroup v2
            cg = CGROUP / f"{self.name}-boot{self.boots}"
            cg.mkdir()
            cgs.append(cg)
        self._cgroups += cgs
        return cgs

    def _remove_cgroups(self) -> None:
        for top in self._cgroups:
            if not top.exists():
                continue
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True) + [top]
            for d in dirs:
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            for d in dirs:
                for _ in range(100):  # busy until the killed processes are reaped
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)
        self._cgroups = [cg for cg in self._cgroups if cg.exists()]

    # ---------------------------------------------------------------- inside
    def _find_pid1(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"nspawn exited ({self.nspawn.returncode}):\n{self.console()}")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                status = (entry / "status").read_text()
                ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M).group(1).split()
                if ppid == self.nspawn.pid and nspid[-1] == "1":
                    return int(entry.name)
        return None

    def path_in_proc(self, inside: str) -> Path:
        """A path as the running container sees it (its /run is a tmpfs of its own)."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def _wait(self, pred, deadline: float, what: str):  # type: ignore[no-untyped-def]
        while True:
            value = pred()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"boot {self.boots}: timed out waiting for {what}\n"
                                     f"{self.console()}")
            time.sleep(0.01)

    def sh(self, script: str, *, env: Mapping[str, str] | None = None, timeout: float = 60,
           check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the running machine, as root, with a clean environment."""
        assert self.pid1 is not None, "not running"
        base = {"PATH": CONTAINER_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
                "LANG": "C.UTF-8"}
        base.update(env or {})
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i",
               *[f"{k}={v}" for k, v in base.items()], "/bin/sh", "-c", script]
        logins = [cg / "login" for cg in self._boot_cgroups]
        for cg in logins:
            cg.mkdir(exist_ok=True)

        def enter_login() -> None:  # in the child, before exec
            for cg in logins:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd="/", preexec_fn=enter_login)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the machine: {script!r} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def console(self) -> str:
        """The last lines the machine printed (for failure messages)."""
        with contextlib.suppress(OSError):
            text = (self.workdir / f"console-{self.boots}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-30:])
        return ""


def python_prefix() -> Path:
    """The Python installation to bind (the interpreter, its site-packages)."""
    return Path(sys.base_prefix).resolve()
