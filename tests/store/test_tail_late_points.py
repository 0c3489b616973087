"""``ckptd tail -f --metrics`` shows every point exactly once, also the points
a client's spool delivers after the live sends that followed them.

A follower continues each metric series after the highest ``seq`` it has
seen. A client whose daemon was down spools its events; after reconnecting it
sends live (higher seqs) at once, and the daemon ingests the spool when it is
handed over, later. Those lower-seq points were never shown (before schema 7
they were shown, out of order). Now the writer records such late ranges
(``metric_backfill``) and the follower fetches them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from helpers import DaemonProc, ckptd, env_for, spawn_script, wait_for

#: The training script. Steps 0-9 live, 10-19 into the spool (daemon down),
#: then live again while the spool stays held, then the spool is let go.
SCRIPT = """
import os, sys, time
import ckptd_client as ckptd

sync = os.environ["SYNC_DIR"]

def wait(name):
    while not os.path.exists(os.path.join(sync, name)):
        time.sleep(0.02)

run = ckptd.init(name="late", autostart=False)
for step in range(10):
    run.log({"x": float(step)}, step=step)
run.flush()
print(run.id, flush=True)
wait("daemon-stopped")
for step in range(10, 20):  # the daemon is down: these go to the spool
    run.log({"x": float(step)}, step=step)
# A second descriptor of the client's own spool file (the same open file, so
# the same lock) keeps it locked after the client hands it over on
# reconnecting: the daemon ingests it only after the live sends below, as
# when a large spool, or the periodic scan, comes after them.
spool = os.path.join(os.environ["CKPTD_HOME"], "spool")
held = [os.dup(int(fd)) for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(os.path.realpath(spool) + "/")
        and os.path.realpath(f"/proc/self/fd/{fd}").endswith(".spool")]
if not held:
    sys.exit("nothing was spooled")
print("spooled", flush=True)
step = 20
while not os.path.exists(os.path.join(sync, "release")):
    run.log({"x": float(step)}, step=step)
    step += 1
    time.sleep(0.05)
for fd in held:
    os.close(fd)
for _ in range(5):
    run.log({"x": float(step)}, step=step)
    step += 1
run.finish(timeout=60)
print("last", step - 1, flush=True)
"""

POINT = re.compile(r" step (\d+)  x=(\S+)")


def test_tail_f_shows_spooled_points_ingested_after_live_ones_exactly_once(
        home: Path, daemon: DaemonProc) -> None:
    sync = home.parent / "sync"
    sync.mkdir()
    proc = spawn_script(home, SCRIPT, env=env_for(home, SYNC_DIR=os.fspath(sync)))
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read() if proc.stderr else ""
    tail = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "tail", "-f", "-n", "100",
         "--metrics", run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_for(home), stdin=subprocess.DEVNULL)
    seen: list[int] = []
    printed: list[str] = []

    def read() -> None:
        assert tail.stdout is not None
        for line in tail.stdout:
            printed.append(line)
            m = POINT.search(line)
            if m:
                assert float(m.group(2)) == float(m.group(1)), line
                seen.append(int(m.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: 9 in seen, what="the live points in tail -f")
        daemon.terminate()
        (sync / "daemon-stopped").touch()
        assert proc.stdout.readline().strip() == "spooled", \
            proc.stderr.read() if proc.stderr else ""
        daemon.start()
        # the client reconnects and logs live (seqs above the spooled ones)
        wait_for(lambda: any(s >= 25 for s in seen), timeout=30,
                 what="live points after the restart in tail -f")
        assert not any(10 <= s < 20 for s in seen), "the spool was ingested early"
        (sync / "release").touch()
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        last = int(out.split()[-1])
        # the run finished: tail -f prints what is left and exits
        try:
            tail.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print("".join(printed))
            print(ckptd(home, "ls").stdout)
            raise
        reader.join(timeout=10)
    finally:
        (sync / "daemon-stopped").touch()
        (sync / "release").touch()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        if tail.poll() is None:
            tail.terminate()
        tail.wait(timeout=30)
    assert tail.returncode == 0, tail.stderr.read() if tail.stderr else ""
    missing = sorted(set(range(last + 1)) - set(seen))
    twice = sorted({s for s in seen if seen.count(s) > 1})
    print(f"tail -f printed {len(seen)} points for steps 0-{last}; missing {missing}, "
          f"twice {twice}")
    assert not missing and not twice, (missing, twice)
    assert sorted(seen) == list(range(last + 1))
