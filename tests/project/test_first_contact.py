"""A newcomer's first minutes: ``ckptd demo`` on a fresh venv, then every
command it tells them to type, pasted verbatim.

A fresh ``pip install torch`` venv has no numpy (torch does not depend on
it); the demo died there with "Numpy is not available". The follow-up
commands it printed put ``--home`` after the subcommand, which no command
accepted.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import env_for, kill_home_daemon

#: Makes ``import numpy`` fail in every Python process that inherits PYTHONPATH.
NO_NUMPY = """
import importlib.machinery
import sys


class _NoNumpy(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            return None  # as if not installed: find_spec None, import ModuleNotFoundError
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_NoNumpy if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
"""


def no_numpy_env(tmp_path: Path, home: Path) -> dict[str, str]:
    block = tmp_path / "no_numpy"
    block.mkdir()
    (block / "sitecustomize.py").write_text(textwrap.dedent(NO_NUMPY))
    env = env_for(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(block),
                                                      env.get("PYTHONPATH")]))
    env.pop("CKPTD_HOME")  # the home comes from --home only, as a user types it
    return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str],
                                                                      str]]:
    tmp = tmp_path_factory.mktemp("first contact")  # a space: commands must quote it
    home = tmp / "home"
    env = no_numpy_env(tmp, home)
    check = subprocess.run([sys.executable, "-c", "import numpy"], env=env,
                           capture_output=True, text=True)
    assert "ModuleNotFoundError" in check.stderr, "numpy is not blocked"
    try:
        proc = subprocess.run([sys.executable, "-m", "ckptd", "demo", "--steps", "60",
                               "--home", os.fspath(home)],
                              capture_output=True, text=True, timeout=300, env=env,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield home, env, proc.stdout
    finally:
        kill_home_daemon(home)


def test_demo_runs_without_numpy(demo: tuple[Path, dict[str, str], str]) -> None:
    _, _, out = demo
    assert "weights identical" in out
    assert "  bit-identical" in out.splitlines()


def test_every_command_the_demo_prints_works_pasted(
        demo: tuple[Path, dict[str, str], str]) -> None:
    home, env, out = demo
    commands = [shlex.split(line, comments=True) for line in out.splitlines()
                if line.startswith("  ckptd ")]  # the indented lines to type
    assert len(commands) >= 5, out
    for argv in commands:
        proc = subprocess.run([sys.executable, "-m", "ckptd", *argv[1:]], capture_output=True,
                              text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        assert proc.stdout.strip() and "no runs yet" not in proc.stdout, (argv, proc.stdout)
    assert home.is_dir()
