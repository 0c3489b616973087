"""A transient systemd scope for a supervisor the daemon relaunches.

Why: the shipped unit has ``KillMode=process`` (restarting or upgrading the
daemon must not end training), so a supervisor the daemon starts would live
in ``ckptd.service``'s cgroup. At a clean shutdown systemd then sends
SIGTERM to the daemon only; the run is left over and SIGKILLed at the end
(``user@.service: Killing process ... SIGKILL``): no grace period, the last
checkpoint interval lost, a reboot as bad as a power cut (tests/boot).

In a scope of its own (``systemd-run --scope``: it registers its own pid as
the scope, then execs the command, keeping its stdio, environment, cwd and
umask) the run is a unit of the manager: at shutdown systemd stops it like
a login session's scope, SIGTERM to every process in it, then SIGKILL after
``TimeoutStopSec`` (the supervisor's stop grace plus a margin). The scope
has no dependency on ``ckptd.service``: ``systemctl --user restart ckptd``
does not touch it.

Only where it matters and can work: systemd is init and this process is a
service's (a daemon in a login session's scope shares that scope's stop
already). Anywhere else, or when ``systemd-run`` fails, the caller spawns
the supervisor as before and logs why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

from ckptd_client.identity import systemd_booted

#: How long to wait for ``systemd-run`` to create the scope (it asks the
#: manager over D-Bus and waits for the job).
SCOPE_START_S = 15.0
#: ``TimeoutStopSec`` of the scope beyond the supervisor's own stop grace:
#: the supervisor SIGKILLs its command at the grace, then reports its end.
STOP_MARGIN_S = 10.0
_SERVICE_RE = re.compile(r"user@\d+\.service")


def own_cgroup(text: str) -> str | None:
    """This process's cgroup path as systemd tracks it, from ``/proc/self/cgroup``:
    the ``name=systemd`` hierarchy where there is one (legacy, hybrid), else
    the unified one."""
    unified = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            return path
        if controllers == "":
            unified = path
    return unified


def manager_of(cgroup: str | None) -> str | None:
    """``"user"`` or ``"system"``: the manager whose service owns ``cgroup``;
    None when it is not a service's (a session scope, a container's root)."""
    parts = [p for p in (cgroup or "").split("/") if p]
    if not parts or not parts[-1].endswith(".service"):
        return None
    return "user" if any(_SERVICE_RE.fullmatch(p) for p in parts[:-1]) else "system"


def manager() -> str | None:
    """The systemd manager running this process as a service, where systemd
    is init and ``systemd-run`` is installed; None otherwise."""
    if not systemd_booted() or shutil.which("systemd-run") is None:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            return manager_of(own_cgroup(f.read()))
    except (OSError, ValueError):
        return None


def unit_name(run_id: str, attempt: int) -> str:
    """Run ids are ``[A-Za-z0-9_.-]``, all valid in a unit name."""
    return f"ckptd-run-{run_id}-{attempt}.scope"


def command(cmd: list[str], unit: str, manager: str, stop_timeout: float) -> list[str]:
    """``cmd`` run inside a new transient scope ``unit`` of ``manager``."""
    run = shutil.which("systemd-run") or "systemd-run"
    return [run, *(["--user"] if manager == "user" else []), "--scope", "--quiet",
            "--collect", f"--unit={unit}", f"--description=ckptd run ({unit})",
            "-p", f"TimeoutStopSec={stop_timeout:g}", "--", *cmd]


def wait_entered(proc: subprocess.Popen[bytes], unit: str,
                 timeout: float = SCOPE_START_S) -> str | None:
    """Wait until ``proc`` (started with :func:`command`) is in its scope;
    None then, else why it is not (``systemd-run`` failed or hung: killed).

    ``systemd-run`` moves its own pid into the scope before it execs the
    command, so the scope in ``/proc/<pid>/cgroup`` means it worked; an exit
    not seen there is ``systemd-run``'s own (the supervisor, a Python
    program, cannot start and exit inside one 5 ms poll).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{proc.pid}/cgroup") as f:
                if f"/{unit}" in f.read():
                    return None
        except OSError:
            pass
        code = proc.poll()
        if code is not None:
            return f"systemd-run exited with status {code}"
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return f"systemd-run did not create the scope within {timeout:g} s"
        time.sleep(0.005)


__all__ = ["command", "manager", "manager_of", "own_cgroup", "unit_name", "wait_entered"]
