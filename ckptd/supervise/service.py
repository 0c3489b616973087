"""``ckptd service``: run the daemon under systemd's user manager, at boot.

Why a *user* unit: the daemon must run as the owner of the runs (the socket
admits only that uid) and needs no privileges. ``loginctl enable-linger``
makes the user manager start at boot without a login, which is what lets
auto-resume bring runs back after a power cut.

Unit choices (see :func:`render_unit`):

* ``Type=notify``: systemd counts the daemon started once it sent
  ``READY=1`` (store open, socket bound), not when the process exists.
* ``WatchdogSec``: the daemon pings ``WATCHDOG=1`` every second; a daemon
  that hangs is killed and restarted.
* ``Restart=always``: whatever ends it, it comes back.
* ``KillMode=process``: stopping or restarting the service ends the daemon
  only. Runs relaunched by auto-resume were started by the daemon, so they
  live in its cgroup; the default (``control-group``) would kill the very
  training runs ckptd exists to protect. (Under systemd the daemon puts
  each relaunch in a transient scope of its own, :mod:`ckptd.supervise.scope`,
  so a shutdown stops it with SIGTERM; only a relaunch whose scope could
  not be made stays in the unit's cgroup.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ckptd_client import paths

UNIT_NAME = "ckptd.service"
WATCHDOG_S = 30
#: What the checked-in unit (``systemd/ckptd.service``) runs: ckptd from $PATH.
DEFAULT_EXEC = "/usr/bin/env ckptd daemon"


def render_unit(exec_start: str = DEFAULT_EXEC, home: Path | None = None) -> str:
    """The user unit's text. ``home``: a data home other than the default."""
    env = "Environment=PYTHONUNBUFFERED=1\n"
    if home is not None:
        env += f"Environment={_quote('CKPTD_HOME=' + os.fspath(home))}\n"
    return (
        "[Unit]\n"
        "Description=ckptd: crash-resilient training logger and checkpoint daemon\n"
        "\n"
        "[Service]\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f"ExecStart={exec_start}\n"
        f"{env}"
        "Restart=always\n"
        "RestartSec=2\n"
        f"WatchdogSec={WATCHDOG_S}\n"
        "# the daemon drains and commits everything queued on SIGTERM\n"
        "TimeoutStopSec=90\n"
        "# stop the daemon only: runs it relaunched must outlive it\n"
        "KillMode=process\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def _quote(value: str) -> str:
    if any(c.isspace() or c in "\"'\\" for c in value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def exec_start() -> str:
    """The daemon command for this installation: this Python, this ckptd."""
    return f"{_quote(sys.executable)} -m ckptd daemon"


def unit_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


@dataclass
class Step:
    """One thing done (or not) while installing, said in a line."""

    ok: bool
    text: str


def _run(*cmd: str) -> tuple[bool, str]:
    if shutil.which(cmd[0]) is None:
        return False, f"{cmd[0]} is not installed"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    out = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode == 0, out[-1] if out else f"exit status {proc.returncode}"


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def install(home: Path | None = None) -> list[Step]:
    """Write the unit for ``home``, enable and start it, enable lingering.

    Without a running systemd user manager (a container, WSL, this
    sandbox) the unit is still written and the rest is reported as not done,
    with what to do instead.
    """
    path = unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ckptd-tmp")
    custom = None if home in (None, paths.default_home()) else home
    tmp.write_text(render_unit(exec_start(), custom))
    os.replace(tmp, path)
    steps = [Step(True, f"wrote {path}")]
    ok, why = _run("systemctl", "--user", "daemon-reload")
    if not ok:
        steps.append(Step(False, f"systemd user manager not reachable ({why}); the unit is "
                                 "written but not enabled. Start the daemon with `ckptd start`, "
                                 "or run `systemctl --user enable --now ckptd` where systemd "
                                 "runs"))
        return steps
    ok, why = _run("systemctl", "--user", "enable", "--now", UNIT_NAME)
    steps.append(Step(ok, "enabled and started ckptd.service" if ok
                      else f"systemctl --user enable --now {UNIT_NAME} failed: {why}"))
    ok, why = _run("loginctl", "enable-linger", _user())
    steps.append(Step(ok, "enabled lingering: the daemon starts at boot without a login" if ok
                      else f"loginctl enable-linger failed ({why}); the daemon starts at your "
                           "first login instead of at boot"))
    return steps


def uninstall() -> list[Step]:
    """Stop and disable the unit, remove its file. Lingering is left as it
    is: other user services may rely on it."""
    steps = []
    ok, why = _run("systemctl", "--user", "disable", "--now", UNIT_NAME)
    steps.append(Step(ok, "stopped and disabled ckptd.service" if ok
                      else f"could not disable ckptd.service ({why})"))
    path = unit_path()
    if path.exists():
        path.unlink()
        steps.append(Step(True, f"removed {path}"))
    else:
        steps.append(Step(True, f"no unit at {path}"))
    if ok:
        _run("systemctl", "--user", "daemon-reload")
    return steps


def status() -> dict[str, object]:
    """What is installed and what systemd says about it."""
    path = unit_path()
    enabled_ok, enabled = _run("systemctl", "--user", "is-enabled", UNIT_NAME)
    active_ok, active = _run("systemctl", "--user", "is-active", UNIT_NAME)
    linger = Path("/var/lib/systemd/linger") / _user()
    return {
        "unit": os.fspath(path),
        "installed": path.exists(),
        "enabled": enabled if enabled_ok or enabled in ("disabled", "masked") else None,
        "active": active if active_ok or active in ("inactive", "failed") else None,
        "linger": linger.exists(),
        "systemd": enabled_ok or enabled in ("disabled", "masked", "not-found")
        or active in ("inactive", "failed"),
        "detail": None if enabled_ok else enabled,
    }


__all__ = ["install", "render_unit", "status", "uninstall", "unit_path"]
