"""Fixtures for the boot tests: a machine with systemd as PID 1 (see machine.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import machine as machines  # noqa: E402
from helpers import REPO  # noqa: E402  (the checkout under test)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    why = machines.unavailable()
    if why:
        pytest.skip(why)
    try:
        return machines.rootfs()
    except (RuntimeError, OSError) as exc:  # no mirror reachable, no space
        pytest.skip(f"boot tests: cannot build the root filesystem: {exc}")


@pytest.fixture
def machine(rootfs: Path, tmp_path: Path) -> Iterator[machines.Machine]:
    """A fresh machine: this checkout and this Python bound read-only at their paths."""
    m = machines.Machine(rootfs, tmp_path / "machine", [REPO, machines.python_prefix()])
    try:
        m.mount()
        yield m
    finally:
        m.close()
