"""The daemon the systemd unit starts (no ``CKPTD_HOME``, the default home)
and a command under ``ckptd run`` (which passes ``CKPTD_HOME=<that home>``)
must meet on one socket. Found by the boot test (tests/boot): they did not,
so under ``ckptd service install`` every checkpoint of a supervised run failed
with "no daemon socket" and its events sat in the spool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import DaemonProc, db_rows, wait_for


def test_supervised_run_reaches_the_daemon_of_the_default_home(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    home = tmp_path / "data" / "ckptd"
    home.mkdir(parents=True, mode=0o700)
    # the unit's environment: XDG dirs, no CKPTD_* at all
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "NOTIFY_"))}
    env.update(XDG_DATA_HOME=os.fspath(tmp_path / "data"), XDG_RUNTIME_DIR=os.fspath(runtime),
               PYTHONUNBUFFERED="1")
    d = DaemonProc(home, env=env)
    script = tmp_path / "train.py"
    script.write_text("import ckptd_client as ckptd\n"
                      "run = ckptd.init()\n"
                      "run.log({'loss': 1.0}, step=0)\n"
                      "run.checkpoint({'step': 0}, step=0).wait(timeout=30)\n"
                      "run.finish()\n")
    try:
        d.start(wait=False)
        sock = runtime / "ckptd" / "ckptd.sock"  # SPEC section 3: the default home's name
        wait_for(sock.exists, what=f"the daemon to listen on {sock}")
        proc = subprocess.run([sys.executable, "-m", "ckptd", "run", "--name", "sup", "--",
                               sys.executable, os.fspath(script)],
                              env=dict(env, CKPTD_NO_AUTOSTART="1"), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert "no daemon socket" not in proc.stderr, proc.stderr
        assert db_rows(home, "SELECT step, status FROM checkpoints") == [(0, "committed")]
    finally:
        d.stop()
