"""The transient scope a relaunch of the daemon runs in (``ckptd.supervise.scope``).

That a shutdown then stops the relaunch with SIGTERM, and that a daemon
restart leaves it alone, needs systemd as init: tests/boot
(``test_clean_reboot_resumes_by_itself``). Here: which daemons ask for a
scope at all, and that a ``systemd-run`` that cannot make one is noticed
(the daemon then spawns the supervisor as before).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ckptd.supervise import scope

#: /proc/self/cgroup of a daemon in the shipped user unit, on a hybrid host
USER_UNIT = ("12:pids:/user.slice/user-0.slice/user@0.service/app.slice/ckptd.service\n"
             "1:name=systemd:/user.slice/user-0.slice/user@0.service/app.slice/ckptd.service\n"
             "0::/user.slice/user-0.slice/user@0.service/app.slice/ckptd.service\n")


@pytest.mark.parametrize(("text", "want"), [
    (USER_UNIT, "user"),
    ("0::/user.slice/user-1000.slice/user@1000.service/ckptd.service\n", "user"),
    ("0::/system.slice/ckptd.service\n", "system"),
    # a daemon autostarted from a login: its session scope's stop reaches the run already
    ("0::/user.slice/user-0.slice/session-3.scope\n", None),
    # a relaunch the daemon made is in a scope: it asks for no other
    ("0::/user.slice/user-0.slice/user@0.service/app.slice/ckptd-run-r-2.scope\n", None),
    ("0::/\n", None),  # a container's init, no systemd
])
def test_only_a_service_daemon_asks_for_a_scope(text: str, want: str | None) -> None:
    assert scope.manager_of(scope.own_cgroup(text)) == want


def test_the_name_hierarchy_decides_on_a_hybrid_host() -> None:
    text = "1:name=systemd:/system.slice/ckptd.service\n0::/\n"
    assert scope.own_cgroup(text) == "/system.slice/ckptd.service"


def test_command_keeps_the_supervisor_argv_last() -> None:
    argv = scope.command(["python", "-m", "ckptd", "run"], "ckptd-run-x-2.scope", "user", 40)
    assert argv[argv.index("--") + 1:] == ["python", "-m", "ckptd", "run"]
    assert "--user" in argv and "--scope" in argv and "TimeoutStopSec=40" in argv
    assert "--user" not in scope.command(["true"], "u.scope", "system", 40)


@pytest.mark.skipif(shutil.which("systemd-run") is None, reason="needs systemd-run")
@pytest.mark.skipif(os.path.isdir("/run/systemd/system"),
                    reason="systemd is init here: systemd-run could succeed")
def test_a_systemd_run_that_fails_is_noticed() -> None:
    """No systemd here: the real ``systemd-run`` fails before it execs the
    command, and the failure is told from a supervisor that started."""
    unit = "ckptd-run-test-1.scope"
    marker = [sys.executable, "-c", "import time; time.sleep(30)"]
    proc = subprocess.Popen(scope.command(marker, unit, "user", 40), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        why = scope.wait_entered(proc, unit, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert why is not None and why.startswith("systemd-run exited with status"), why
    assert scope.manager() is None  # and the daemon would not even have asked
