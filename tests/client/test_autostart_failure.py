"""A daemon that cannot be started never costs the training process (issue 8.13).

An ``OSError`` while starting one (``daemon.log`` unwritable, read-only home,
EMFILE) escaped ``init()`` as a traceback and killed the link thread for good;
a daemon that exits at start-up was respawned every ~2 s for ever; a long
``XDG_RUNTIME_DIR`` made the socket path unbindable, so every daemon exited.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import DaemonProc, db_rows, env_for, run_script, wait_for

LOGGER = """
import os, time
import ckptd_client as ckptd
run = ckptd.init(name="nodaemon")
end = time.monotonic() + float(os.environ.get("SECONDS_", "0"))
step = 0
while True:
    run.log({"x": float(step)}, step=step)
    step += 1
    if time.monotonic() >= end and step >= 100:
        break
    time.sleep(0.05)
run.finish(timeout=5)
print("logged", step)
"""


def _logged(proc_stdout: str) -> int:
    return int(proc_stdout.split()[-1])


def test_unwritable_daemon_log_falls_back_to_the_spool(home: Path) -> None:
    (home / "daemon.log").mkdir()  # open(..., "ab") fails: IsADirectoryError
    proc = run_script(home, LOGGER, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("cannot start a daemon") == 1, proc.stderr
    n = _logged(proc.stdout)
    (home / "daemon.log").rmdir()
    d = DaemonProc(home)
    d.start()
    try:
        wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM metrics m JOIN runs r ON"
                                 " r.id = m.run_id WHERE r.name = 'nodaemon' AND key = 'x'")
                 == [(n,)], what="the spooled values")
    finally:
        d.stop()


def test_daemon_failing_at_start_up_is_retried_with_back_off(home: Path) -> None:
    (home / "ckptd.db").write_bytes(os.urandom(8192))  # every daemon exits at start-up
    proc = run_script(home, LOGGER, check=False, timeout=90,
                      env=env_for(home, SECONDS_="10"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    starts = (home / "daemon.log").read_text().count("not a readable ckptd store")
    print(f"daemon starts in 10 s: {starts}")
    assert proc.stderr.count("exited with status") == 1, proc.stderr
    assert starts <= 5, f"{starts} daemon starts in 10 s"


def test_long_runtime_dir_falls_back_to_a_bindable_socket(home: Path, tmp_path: Path) -> None:
    runtime = tmp_path / ("r" * 60) / ("u" * 60)
    runtime.mkdir(parents=True, mode=0o700)
    proc = run_script(home, LOGGER, check=False, timeout=60,
                      env=env_for(home, XDG_RUNTIME_DIR=os.fspath(runtime)))
    assert proc.returncode == 0, proc.stderr
    assert db_rows(home, "SELECT status FROM runs WHERE name = 'nodaemon'") == [("finished",)]
    assert db_rows(home, "SELECT COUNT(*) FROM metrics WHERE key = 'x'") == [(100,)]
