"""A spool file being created is never taken by the daemon (issue 8.2).

``SpoolWriter`` created ``*.partial``, then locked it, then renamed it; the
daemon's ingest unlinks every ``*.partial`` it can lock. Between the create and
the lock the daemon won, the rename failed, and the event that ``log()`` had
accepted went to the memory backlog: a ``kill -9`` then lost it. Here a client
that can only spool (its socket path leads nowhere) creates spool file after
spool file while a real daemon ingests the same spool directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import DaemonProc, db_rows, env_for, spawn_script, wait_for

N = 5000

SPOOLER = f"""
import os, signal
import ckptd_client as ckptd
run = ckptd.init(name="racer", autostart=False)
out = os.open(os.environ["PROGRESS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
in_memory = 0
for i in range({N}):
    run.log({{"x": float(i)}}, step=i)  # a new spool file: races the daemon's ingest
    in_memory += bool(run._backlog)
    run.flush()  # no daemon to reach: fsync and hand the file over
run.log({{"x": float({N})}}, step={N})
in_memory += bool(run._backlog)
os.write(out, f"{{run.id}} {{in_memory}}\\n".encode())
os.kill(os.getpid(), signal.SIGKILL)  # right after log() returned
"""


def test_spool_creation_races_ingest_and_loses_nothing(home: Path, daemon: DaemonProc,
                                                      tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    env = env_for(home, PROGRESS=os.fspath(progress), CKPTD_NO_AUTOSTART="1",
                  CKPTD_SOCKET=os.fspath(tmp_path / "nowhere.sock"))
    proc = spawn_script(home, SPOOLER, env=env)
    _, err = proc.communicate(timeout=300)
    assert progress.exists(), err
    run_id, in_memory = progress.read_text().split()
    wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM metrics WHERE run_id = ?"
                             " AND key = 'x'", (run_id,))[0][0] == N + 1, timeout=60,
             what=f"all {N + 1} spooled values ingested")
    print(f"events that log() left in memory only: {in_memory}")
    assert int(in_memory) == 0, err
    assert "keeping events in memory" not in err
