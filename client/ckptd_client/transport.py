"""Finding, starting and talking to the daemon of a home.

The client must not import the daemon (it may run in a different Python, and
importing it would load sqlite-utils into every training script), so the
daemon is started as a command: ``python -m ckptd.daemon --home HOME``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import paths, protocol
from .errors import CkptdError, DaemonUnavailable, error_for
from .identity import system_stopping


def connect(sock_path: Path, timeout: float = 2.0) -> socket.socket:
    """Connect to the daemon's socket, refusing one that another user owns."""
    try:
        st = os.stat(sock_path)
    except FileNotFoundError:
        raise DaemonUnavailable(f"no daemon socket at {sock_path}") from None
    if st.st_uid != os.getuid():
        raise CkptdError(
            f"socket {sock_path} is owned by uid {st.st_uid}, not you (uid {os.getuid()}); "
            "refusing to talk to it. Set CKPTD_SOCKET or CKPTD_HOME to your own."
        )
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(sock_path))
    except OSError as exc:
        s.close()
        raise DaemonUnavailable(f"no daemon answering on {sock_path}: {exc.strerror}") from None
    return s


class DaemonStartFailed(DaemonUnavailable):
    """A daemon could not be started, or exited at start-up: retrying at once
    would only fail again (the client backs off)."""


def start_daemon(home: Path) -> subprocess.Popen[bytes]:
    """Start a daemon for ``home`` in the background, detached from us.

    Its own session (so a Ctrl-C in the terminal or the death of this
    process does not reach it), no inherited stdio (so a test runner or an
    SSH session waiting on our pipes is never held open by it), output to
    ``<home>/daemon.log``. Two processes racing here is harmless: the second
    daemon finds the home's lock taken and exits.
    """
    try:
        paths.secure_home(home)
        log_fd = os.open(home / paths.DAEMON_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(log_fd, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(home)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env={**os.environ, "CKPTD_AUTOSTARTED": "1"},
            )
    except OSError as exc:
        # read-only home, daemon.log unwritable, EMFILE: it escaped the client's
        # link thread (which then never reconnected) and init() as a traceback
        raise DaemonStartFailed(f"cannot start a daemon for {home}: "
                                f"{exc.strerror or exc}") from None


def autostart_enabled() -> bool:
    return os.environ.get("CKPTD_NO_AUTOSTART", "") in ("", "0")


def connect_or_start(home: Path, autostart: bool = True, wait: float = 15.0) -> socket.socket:
    """Connect to the home's daemon, starting one if allowed and needed."""
    sock_path = paths.socket_path(home)
    try:
        return connect(sock_path)
    except DaemonUnavailable:
        if not (autostart and autostart_enabled()):
            raise
        if system_stopping():
            # The unit's daemon stopped for a reboot and we (a supervisor, a
            # trainer finishing after its SIGTERM) lost it. A daemon started
            # now would never be sent SIGTERM and would hold the shutdown 90 s;
            # our events go to the spool, which the daemon ingests at boot.
            raise DaemonUnavailable(f"not starting a daemon for {home}: the system is "
                                    "shutting down") from None
    proc = start_daemon(home)
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        try:
            return connect(sock_path)
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"started a daemon for {home} but it did not answer within {wait:.0f} s; "
                    f"see {home / paths.DAEMON_LOG}"
                ) from None
            code = proc.poll()
            if code not in (None, 0):
                raise DaemonStartFailed(
                    f"the daemon for {home} exited with status {code}; "
                    f"see {home / paths.DAEMON_LOG}"
                ) from None
            if code == 0:
                # It found the home's lock taken: another daemon is starting
                # (or one is still shutting down). Try again after a moment.
                time.sleep(delay)
                proc = start_daemon(home)
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def call(
    home: Path, op: str, args: dict[str, Any] | None = None, *, autostart: bool = True,
    timeout: float | None = 60.0,
) -> Any:
    """One request/reply with the daemon (what CLI commands that change state use)."""
    s = connect_or_start(home, autostart=autostart)
    try:
        s.settimeout(timeout)
        s.sendall(protocol.encode({"t": protocol.RPC, "op": op, "args": args or {}}))
        reply = protocol.recv_message(s, protocol.FrameReader())
    except TimeoutError:
        raise CkptdError(f"{op}: the daemon did not answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise DaemonUnavailable(f"{op}: lost the daemon connection: {exc}") from None
    finally:
        s.close()
    if reply is None:
        raise DaemonUnavailable(f"{op}: the daemon closed the connection without answering")
    if reply.get("t") == protocol.ERROR:
        raise CkptdError(f"{op}: {reply.get('error')}")
    if not reply.get("ok"):
        raise error_for(reply.get("kind"), str(reply.get("error")))
    return reply.get("result")
