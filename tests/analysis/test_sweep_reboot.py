"""A reboot in the middle of ``ckptd sweep``: the daemon, every supervisor and
every trainer die at one instant, and the machine comes back with a new boot id
(``CKPTD_TEST_BOOT_ID``). The sweep completes: finished runs stay finished,
interrupted ones resume from their checkpoints, pending ones start, and
nothing runs twice from scratch."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
from helpers import DaemonProc, ckptd, db_rows, wait_for
from test_sweep import calls, sweep_cli, sweep_env  # noqa: F401 - fixture

STEPS = 40


def home_processes(home: Path) -> list[psutil.Process]:
    """Every process working on ``home``: the daemon, supervisors, trainers."""
    procs = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("CKPTD_HOME") == os.fspath(home):
                procs.append(proc)
        except (psutil.Error, OSError):
            continue
    return procs


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            continue


def freeze(home: Path) -> list[psutil.Process]:
    """SIGSTOP every process of ``home``, again until no new one appeared meanwhile."""
    procs: list[psutil.Process] = []
    while True:
        new = [p for p in home_processes(home) if p.pid not in {q.pid for q in procs}]
        if not new:
            return procs
        signal_all(new, signal.SIGSTOP)
        procs += new


def frozen_state(home: Path) -> dict[str, list[tuple]]:
    """The sweep as the store has it (read while every process is stopped)."""
    items = db_rows(home, "SELECT i.idx, i.params, i.run_id, r.status, (SELECT MAX(step) FROM"
                          " checkpoints c WHERE c.run_id = r.id AND c.status = 'committed')"
                          " FROM sweep_items i LEFT JOIN runs r ON r.id = i.run_id"
                          " WHERE i.sweep = 'rb' ORDER BY i.idx")
    state: dict[str, list[tuple]] = {"finished": [], "running": [], "pending": [],
                                     "other": []}
    for _idx, params, run_id, status, ckpt in items:
        seed = json.loads(params)["seed"]
        if run_id is None:
            state["pending"].append((seed, None, None))
        elif status in ("finished", "running"):
            state[status].append((seed, run_id, ckpt))
        else:
            state["other"].append((seed, run_id, status))
    return state


def test_sweep_survives_a_reboot(home: Path, tmp_path: Path,
                                 sweep_env: dict[str, str]) -> None:  # noqa: F811
    before = dict(sweep_env, STEP_S="0.06", CKPTD_TEST_BOOT_ID="boot-before")
    after = dict(before, CKPTD_TEST_BOOT_ID="boot-after")
    d = DaemonProc(home, env=before)
    d.start()
    try:
        proc = sweep_cli(home, before, tmp_path, "--name", "rb", "--grid", "a=x", "--grid",
                         "b=1", "--seeds", "0-4", "--parallel", "2", "--detach", "--",
                         sys.executable, "train.py", "{a}", "{b}", "{seed}", str(STEPS))
        assert proc.returncode == 0, proc.stderr

        # a power cut: freeze everything (nothing sees another die), and cut only
        # when the frozen store holds finished, interrupted-past-a-checkpoint and
        # pending runs at once; else thaw and wait a little more
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the sweep never reached the cut point"
            procs = freeze(home)
            st = frozen_state(home)
            if (st["finished"] and len(st["running"]) == 2 and st["pending"]
                    and not st["other"] and all(c is not None and c >= 9
                                                for _, _, c in st["running"])):
                break
            signal_all(procs, signal.SIGCONT)
            time.sleep(0.1)
        signal_all(procs, signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(timeout=10)
        psutil.wait_procs(procs, timeout=10)
        assert len(procs) >= 5  # the daemon, two supervisors, two trainers

        d = DaemonProc(home, env=after)  # the machine came back with a new boot id
        d.start()

        def done() -> dict | None:
            out = ckptd(home, "sweep", "status", "rb", "--json", env=after)
            s = json.loads(out.stdout) if out.returncode == 0 else None
            return s if s and s["done"] else None

        final = wait_for(done, timeout=180, interval=0.5, what="the sweep to finish")
        assert final["counts"] == {"finished": 5}, final
        starts = [c for c in calls(before) if c["event"] == "start"]
        fresh = sorted(c["seed"] for c in starts if c["first"] == 0)
        assert fresh == [0, 1, 2, 3, 4], starts  # nothing ran twice from scratch
        attempts = {r: max(c["attempt"] for c in starts if c["run"] == r)
                    for r in {c["run"] for c in starts}}
        for _, run, _ in st["finished"]:
            assert attempts[run] == 1, (run, starts)  # finished stays finished
        for _, run, ckpt in st["running"]:
            assert attempts[run] == 2, (run, starts)
            (restored, first), = db_rows(home, "SELECT a2.restored_step, a1.status FROM"
                                               " attempts a1 JOIN attempts a2 ON a2.run_id ="
                                               " a1.run_id WHERE a1.run_id = ? AND"
                                               " a1.attempt = 1 AND a2.attempt = 2", (run,))
            # resumed from its checkpoint (or a newer one the daemon was committing)
            assert first == "interrupted" and restored is not None and restored >= ckpt
            steps = db_rows(home, "SELECT step FROM effective_metrics WHERE run_id = ? AND"
                                  " key = 'loss' ORDER BY step", (run,))
            assert [s[0] for s in steps] == list(range(STEPS))
        late = [c for c in starts if c["seed"] in {int(p[0]) for p in st["pending"]}]
        assert len(late) == len(st["pending"]), late  # pending ones started, once
        assert all(c["attempt"] == 1 and c["first"] == 0 for c in late), late
        assert "rebooted" in (home / "daemon.log").read_text()
    finally:
        d.stop()
