"""Load: 16 clients logging at full speed while checkpoints commit (SPEC promises 1, 3, 6).

Checks, with everything real: no event lost, none doubled, every checkpoint
durable and verifying, the daemon's memory bounded, and ``ckptd tail -f``
still showing a probe's events while the daemon is saturated. No timing is
asserted (the box is shared); the numbers are printed for docs/reliability.md.

CI runs ~10 s of load; ``--long`` runs 60 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from helpers import DaemonProc, ckptd, db_rows, env_for, wait_for

CLIENTS = 16
#: Daemon RSS ceiling. The writer's queue is bounded (QUEUE_MAX events) and
#: clients spill to their spool beyond it, so memory must not grow with load.
RSS_LIMIT = 768 << 20

LOGGER = """
import sys, time
import ckptd_client as ckptd
run = ckptd.init(name=f"load-{sys.argv[1]}")
print("run", run.id, flush=True)
end = time.monotonic() + float(sys.argv[2])
step = 0
while time.monotonic() < end:
    for _ in range(100):
        run.log({"loss": 1.0 / (step + 1), "lr": 3e-4}, step=step)
        step += 1
run.flush(timeout=300)
run.finish(timeout=300)
print("steps", step, flush=True)
"""

CHECKPOINTER = """
import sys, time
import torch
import ckptd_client as ckptd
run = ckptd.init(name="load-ckpt")
print("run", run.id, flush=True)
end = time.monotonic() + float(sys.argv[1])
step = 0
state = {"w": torch.zeros(1024, 1024), "b": torch.zeros(1024)}  # 4 MiB
while time.monotonic() < end or step < 2:
    state["w"].fill_(float(step))
    run.checkpoint(state, step=step).wait(timeout=300)
    step += 1
    time.sleep(0.2)
run.finish(timeout=300)
print("checkpoints", step, flush=True)
"""

PROBE = """
import sys, time
import ckptd_client as ckptd
run = ckptd.init(name="load-probe")
print("run", run.id, flush=True)
for i in range(int(sys.argv[1])):
    run.event(f"probe-token-{i}")
    time.sleep(1.0)
run.finish(timeout=300)
"""


def _spawn(tmp: Path, home: Path, name: str, code: str, *args: str) -> subprocess.Popen[str]:
    script = tmp / f"{name}.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, os.fspath(script), *args], env=env_for(home),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sixteen_clients_at_full_speed_with_checkpoints(
        home: Path, daemon: DaemonProc, tmp_path: Path, long_mode: bool) -> None:
    seconds = 60.0 if long_mode else 4.0
    probe = _spawn(tmp_path, home, "probe", PROBE, str(int(seconds) + 2))
    probe_line = probe.stdout.readline() if probe.stdout else ""
    probe_id = probe_line.split()[1]
    wait_for(lambda: db_rows(home, "SELECT 1 FROM runs WHERE id = ?", (probe_id,)),
             what="probe run registered")
    tail = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "tail",
                             "-f", probe_id], env=env_for(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[float, str]] = []

    def read_tail() -> None:
        assert tail.stdout is not None
        for line in tail.stdout:
            m = re.search(r"probe-token-(\d+)", line)
            if m:
                seen.append((time.monotonic(), m.group(0)))

    reader = threading.Thread(target=read_tail, daemon=True)
    reader.start()
    proc = psutil.Process(daemon.pid)
    rss: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            try:
                rss.append(proc.memory_info().rss)
            except psutil.Error:
                return
            sampling.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    loggers = [_spawn(tmp_path, home, f"logger{i}", LOGGER, str(i), str(seconds))
               for i in range(CLIENTS)]
    ckpt = _spawn(tmp_path, home, "ckpt", CHECKPOINTER, str(seconds))
    procs = [*loggers, ckpt, probe]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
        elapsed = time.monotonic() - t0
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, f"{out}\n{err}"
        # every logged step is in the store exactly once
        total = 0
        for out, _ in outs[:CLIENTS]:
            run_id = re.search(r"^run (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
            steps = int(re.search(r"^steps (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
            rows = db_rows(home, "SELECT COUNT(*), COUNT(DISTINCT step), MIN(step), MAX(step)"
                           " FROM metrics WHERE run_id = ? AND key = 'loss'", (run_id,))
            assert rows == [(steps, steps, 0, steps - 1)], (run_id, steps, rows)
            total += steps
        n_ckpt = int(re.search(r"^checkpoints (\d+)$", outs[CLIENTS][0], re.M).group(1))  # type: ignore[union-attr]
        ckpt_id = re.search(r"^run (\S+)$", outs[CLIENTS][0], re.M).group(1)  # type: ignore[union-attr]
        verify = ckptd(home, "ckpt", "verify", ckpt_id, timeout=300)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert db_rows(home, "SELECT COUNT(*) FROM checkpoints WHERE run_id = ? AND"
                       " status = 'committed'", (ckpt_id,))[0][0] >= 1
        # tail -f kept showing the probe's events while the daemon was saturated
        wait_for(lambda: len(seen) >= int(seconds), timeout=60,
                 what="tail -f showing every probe event")
        assert [tok for _, tok in seen[:int(seconds)]] == \
            [f"probe-token-{i}" for i in range(int(seconds))]
        quick = ckptd(home, "tail", "-n", "5", probe_id, timeout=60)
        assert quick.returncode == 0 and "probe-token" in quick.stdout
        sampling.set()
        peak = max(rss)
        print(f"load: {CLIENTS} clients, {total} log calls ({2 * total} metrics) in "
              f"{elapsed:.1f} s = {total / elapsed:.0f} events/s; {n_ckpt} checkpoints; "
              f"daemon peak RSS {peak / 2**20:.0f} MiB")
        assert peak < RSS_LIMIT, f"daemon RSS peaked at {peak / 2**20:.0f} MiB"
    finally:
        sampling.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        tail.terminate()
        try:
            tail.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tail.kill()
            tail.wait()
