"""Per-rank console lines, system metrics and liveness of a torchrun job under ``ckptd run``.

Real processes: ``ckptd run -- torchrun --tee 3`` with two CPU ranks, a real
daemon sampling every 0.2 s (its sweeper runs every 2 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, wait_for

torch = pytest.importorskip("torch")

SCRIPT = """
import os, time, ckptd_client as ckptd
run = ckptd.init(name="ranks")
print(f"hello from rank {run.rank}", flush=True)
for s in range(3):
    run.log({"x": s}, step=s)
run.flush()
open(os.environ["READY"] + str(run.rank), "w").close()
while not os.path.exists(os.environ["GO"] + str(run.rank)):
    time.sleep(0.05)
run.finish()  # rank 1 is let go first; rank 0 goes on
"""


def test_rank_lines_sys_metrics_and_liveness(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = env_for(home, OMP_NUM_THREADS="1", CKPTD_SYS_INTERVAL="0.2",
                  READY=os.fspath(ready), GO=os.fspath(go))
    daemon = DaemonProc(home, env=env)
    daemon.start()
    sup = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--",
         sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "--tee", "3", os.fspath(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: Path(f"{ready}0").exists() and Path(f"{ready}1").exists(),
                 timeout=90, what="both ranks ready")
        run_id = db_rows(home, "SELECT id FROM runs")[0][0]

        def shown() -> dict:
            return json.loads(ckptd(home, "show", run_id, "--json", check=True).stdout)

        wait_for(lambda: [(r["rank"], r["alive"]) for r in shown()["ranks"]] ==
                 [(0, True), (1, True)], timeout=30, what="both ranks seen alive")
        assert "2/2" in ckptd(home, "ls", check=True).stdout
        Path(f"{go}1").touch()
        # rank 1 exited: the next sweeps see rank 0 alive and rank 1 ended
        info = wait_for(lambda: (i := shown()) and [(r["rank"], r["alive"])
                                                    for r in i["ranks"]] == [(0, True),
                                                                              (1, False)]
                        and i, timeout=30, what="rank 1 ended, rank 0 alive")
        assert info["world_size"] == 2 and info["hosts"] == [os.uname().nodename], info
        assert all(r["last_seen"] and r["pid"] for r in info["ranks"]), info
        text = ckptd(home, "show", run_id, check=True).stdout
        assert "world size:   2" in text and "rank 1:" in text and "ended" in text, text
        table = ckptd(home, "ls", check=True).stdout
        assert "1/2" in table, table  # one of two ranks alive
        wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM metrics WHERE run_id = ? AND"
                                       " src = 'd' AND rank = 0", (run_id,))[0][0] > 0,
                 timeout=30, what="a sys sample of rank 0")
        Path(f"{go}0").touch()
        out, err = sup.communicate(timeout=90)
        assert sup.returncode == 0, err[-3000:]
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        daemon.stop()
    assert "[rank1]:hello from rank 1" in out  # the terminal sees torchrun's output as is
    one = ckptd(home, "tail", run_id, "--rank", "1", check=True).stdout
    zero = ckptd(home, "tail", run_id, check=True).stdout
    assert "hello from rank 1" in one and "hello from rank 0" not in one, one
    assert "hello from rank 0" in zero and "hello from rank 1" not in zero, zero
    assert "[rank0]:" not in zero  # the prefix became the rank column
    both = ckptd(home, "tail", run_id, "--rank", "all", check=True).stdout
    assert "[rank 1] hello from rank 1" in both, both


def test_sys_metrics_per_rank(home: Path, tmp_path: Path) -> None:
    """Each live rank's process tree is sampled as that rank."""
    script = tmp_path / "ranks.py"
    script.write_text("""
import os, time, ckptd_client as ckptd
run = ckptd.init()
run.log({"x": 1}, step=0)
run.flush()
open(os.environ["READY"] + str(run.rank), "w").close()
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.05)
run.finish()
""")
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = env_for(home, OMP_NUM_THREADS="1", CKPTD_SYS_INTERVAL="0.2",
                  READY=os.fspath(ready), GO=os.fspath(go))
    daemon = DaemonProc(home, env=env)
    daemon.start()
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", os.fspath(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: Path(f"{ready}0").exists() and Path(f"{ready}1").exists(),
                 timeout=90, what="both ranks ready")
        run_id = db_rows(home, "SELECT id FROM runs")[0][0]
        wait_for(lambda: db_rows(home, "SELECT COUNT(DISTINCT rank) FROM metrics WHERE"
                                       " run_id = ? AND src = 'd' AND key = 'sys/rss_bytes'",
                                 (run_id,))[0][0] == 2, timeout=30, what="samples of both ranks")
        rows = ckptd(home, "metrics", run_id, "--key", "sys/rss_bytes", "--rank", "1",
                     "--format", "jsonl", check=True).stdout.splitlines()
        assert rows and all(json.loads(r)["value"] > 0 for r in rows), rows
        go.touch()
        _out, err = agent.communicate(timeout=90)
        assert agent.returncode == 0, err[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        daemon.stop()
