"""Fixtures that run the real parts: a daemon process, a real store, real signals.

Every daemon a test starts (directly or through auto-start) is stopped when
the test ends, and none of them ever holds the test runner's stdout/stderr:
their output goes to ``<home>/daemon.log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import DaemonProc, kill_home_daemon, kill_home_processes  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="thorough runs: more trials, more cut points, more fuzzing")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests are the thorough variants: they run only with --long."""
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="slow: thorough variant, run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def long_mode(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--long"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data home; the environment points the client and CLI at it."""
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    monkeypatch.setenv("CKPTD_HOME", str(h))
    monkeypatch.delenv("CKPTD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("CKPTD_RUN_ID", raising=False)
    monkeypatch.delenv("CKPTD_ATTEMPT", raising=False)
    monkeypatch.delenv("CKPTD_NO_AUTOSTART", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    yield h
    kill_home_daemon(h)
    # what the test's runs left: relaunched trainers, orphaned workers, and a
    # daemon one of them auto-started after the test's own daemon stopped
    kill_home_processes(h)


@pytest.fixture
def daemon(home: Path) -> Iterator[DaemonProc]:
    """A running daemon for ``home``, stopped (SIGTERM, then SIGKILL) at the end."""
    d = DaemonProc(home)
    d.start()
    yield d
    d.stop()


@pytest.fixture(autouse=True)
def _no_stray_children() -> Iterator[None]:
    yield
    # reap anything a test left as a zombie child
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
    except ChildProcessError:
        pass


__all__ = ["signal", "subprocess", "time"]


@pytest.fixture
def attacker() -> Iterator[object]:
    """A real second local user (``useradd``), removed with what she left in /tmp."""
    from users import second_user

    with second_user("atk") as user:
        yield user


@pytest.fixture
def public() -> Iterator[Path]:
    """A 0755 directory under /tmp that the second user can reach."""
    from users import shared_dir

    with shared_dir() as d:
        yield d
