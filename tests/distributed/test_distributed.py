"""torchrun ranks, sharded (DCP) checkpoints, elastic restarts and preemption.

Real processes throughout: ``python -m torch.distributed.run`` with gloo on
CPU, a real daemon, real SIGKILL and SIGUSR1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, wait_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_ddp.py"


def readme_command(home: Path, starts: str, *extra: str) -> list[str]:
    """The README's "Distributed" command line starting with ``starts`` (so the
    README shows what the tests run), as an argv for this interpreter and home."""
    text = (REPO / "README.md").read_text().split("## Distributed", 1)[1]
    [line] = [ln for ln in text.splitlines() if ln.startswith(starts)]
    argv: list[str] = []
    for word in line.split():
        if word == "torchrun":
            argv += [sys.executable, "-m", "torch.distributed.run"]
        elif word == "ckptd":
            argv += [sys.executable, "-m", "ckptd", "--home", os.fspath(home)]
        elif word.startswith("examples/"):
            argv.append(os.fspath(REPO / word))
        else:
            argv.append(word)
    return argv + list(extra)


def torchrun(home: Path, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *args]


def run_ddp(home: Path, *args: str, timeout: float = 120, argv: list[str] | None = None,
            **kw: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv or torchrun(home, os.fspath(EXAMPLE), *args),
                          capture_output=True,
                          text=True, timeout=timeout, env=env_for(home, OMP_NUM_THREADS="1",
                                                                  **kw),
                          cwd=home.parent, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def one_run(home: Path) -> dict:
    runs = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
    assert len(runs) == 1, runs
    return runs[0]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


RANKS_SCRIPT = """
import ckptd_client as ckptd
run = ckptd.init(name="ranks")
for s in range(5):
    run.log({"loss": 10.0 * run.rank + s}, step=s)
print("rank", run.rank, "of", run.world_size, "run", run.id, flush=True)
run.finish()
"""


def test_every_rank_joins_one_run_and_metrics_carry_the_rank(home: Path, daemon) -> None:
    script = home.parent / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    proc = subprocess.run(torchrun(home, os.fspath(script)), capture_output=True, text=True,
                          timeout=120, env=env_for(home, OMP_NUM_THREADS="1"),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    ids = {line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("rank")}
    assert len(ids) == 1, proc.stdout  # both ranks name the same run
    run = one_run(home)
    assert (run["world_size"], run["status"], run["step"]) == (2, "finished", 4)
    rows = ckptd(home, "metrics", run["id"], "--format", "jsonl", check=True).stdout
    assert [json.loads(r)["value"] for r in rows.splitlines()] == [0, 1, 2, 3, 4]
    rows = ckptd(home, "metrics", run["id"], "--rank", "1", "--format", "jsonl",
                 check=True).stdout
    assert [json.loads(r)["value"] for r in rows.splitlines()] == [10, 11, 12, 13, 14]
    rows = [json.loads(r) for r in ckptd(home, "metrics", run["id"], "--rank", "all",
                                         "--format", "jsonl", check=True).stdout.splitlines()]
    assert sorted((r["rank"], r["step"]) for r in rows) == \
        [(k, s) for k in (0, 1) for s in range(5)]
    tail = ckptd(home, "tail", run["id"], "--metrics", "--rank", "all", check=True).stdout
    assert "[rank 1]" in tail
    bad = ckptd(home, "metrics", run["id"], "--rank", "x")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_dcp_checkpoint_loads_outside_ckptd_and_reshards_to_one(home: Path, daemon,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "final.pt"
    run_ddp(home, argv=readme_command(home, "torchrun --standalone --nproc-per-node 2 "
                                           "examples/", "--out", os.fspath(out)))
    run = one_run(home)
    ckpts = json.loads(ckptd(home, "ckpt", "ls", run["id"], "--json", check=True).stdout)
    assert [(c["step"], c["status"]) for c in ckpts] == [(9, "committed"), (19, "committed")]
    step_dir = home / "runs" / run["id"] / "checkpoints" / "step-19"
    names = sorted(p.name for p in step_dir.iterdir())
    assert ".metadata" in names and {"__0_0.distcp", "__1_0.distcp"} <= set(names), names
    verify = ckptd(home, "ckpt", "verify", run["id"])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    final = weights(out)
    # plain torch.distributed.checkpoint.load, no ckptd, no process group
    code = f"""
import torch, torch.distributed.checkpoint as dcp
sd = {{"model": {{k: torch.zeros_like(v) for k, v in torch.load({os.fspath(out)!r}).items()}}}}
dcp.load(sd, checkpoint_id={os.fspath(step_dir)!r})
torch.save(sd["model"], {os.fspath(tmp_path / "plain.pt")!r})
"""
    run_script(home, code)
    assert_identical(final, weights(tmp_path / "plain.pt"))
    # 2 ranks -> 1 process: the same run, restored in place without a process group
    code = f"""
import torch, ckptd_client as ckptd
run = ckptd.init()
sd = {{"model": {{k: torch.zeros_like(v) for k, v in torch.load({os.fspath(out)!r}).items()}},
      "step": -1}}
assert run.restore(into=sd) is sd
print("step", sd["step"], run.restored_step)
torch.save(sd["model"], {os.fspath(tmp_path / "one.pt")!r})
run.finish()
"""
    proc = run_script(home, code, env=env_for(home, CKPTD_RUN_ID=run["id"], CKPTD_ATTEMPT="2"))
    assert "step 19 19" in proc.stdout, proc.stdout
    assert_identical(final, weights(tmp_path / "one.pt"))
    # a damaged shard: restore says why it skips step 19 and falls back to step 9
    shard = step_dir / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_script(home, code, env=env_for(home, CKPTD_RUN_ID=run["id"], CKPTD_ATTEMPT="3"))
    assert "step 9 9" in proc.stdout and "skipped checkpoint step 19" in proc.stderr, \
        proc.stdout + proc.stderr


def _rank_pids(parent: int) -> list[int]:
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("when", [  # CI kills inside the checkpoint at 4 ranks:
    # tests/distributed/test_ddp_four_ranks.py
    pytest.param("inside_checkpoint", marks=pytest.mark.slow),
    pytest.param("at_random", marks=pytest.mark.slow)])
def test_kill9_one_rank_elastic_restart_is_bit_identical(home: Path, daemon, tmp_path: Path,
                                                         when: str) -> None:
    """kill -9 of rank 1 inside the collective checkpoint of step 14 (after its
    shard is durable, before the ranks agree), or at a random moment (--long)."""
    steps = 30
    clean = tmp_path / "clean.pt"
    run_ddp(home, "--steps", str(steps), "--ckpt-every", "5", "--out", os.fspath(clean))
    first = one_run(home)["id"]

    broken = tmp_path / "broken.pt"
    env = env_for(home, OMP_NUM_THREADS="1")
    if when == "inside_checkpoint":
        env["CKPTD_TEST_KILL_DCP"] = "1:14"
    seed = int.from_bytes(os.urandom(2), "big")
    print(f"seed {seed}")
    kill_at = 8 + seed % 15
    agent = subprocess.Popen(
        readme_command(home, "torchrun --standalone --nproc-per-node 2 --max-restarts",
                       "--steps", str(steps), "--ckpt-every", "5", "--sleep", "0.1",
                       "--out", os.fspath(broken)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        stdin=subprocess.DEVNULL)
    try:
        def second_run() -> str | None:
            rows = db_rows(home, "SELECT id FROM runs WHERE id != ?", (first,))
            return rows[0][0] if rows else None

        run_id = wait_for(second_run, timeout=60, what="the second run")
        if when == "at_random":
            wait_for(lambda: (db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ?",
                                      (run_id,))[0][0] or 0) >= kill_at, timeout=60,
                     what=f"step {kill_at}")
            pids = _rank_pids(agent.pid)
            assert len(pids) == 2, pids
            os.kill(pids[1], signal.SIGKILL)
        out, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err[-3000:]
    assert "resumed after step" in out, out
    assert_identical(weights(clean), weights(broken))
    attempts = db_rows(home, "SELECT attempt, status, restored_step FROM attempts WHERE"
                             " run_id = ? ORDER BY attempt", (run_id,))
    # rank 0 of attempt 1 fails on the collective its dead peer left (or is killed by
    # torchrun first); a second restart is allowed for a gloo rendezvous hiccup
    assert attempts[0][1] in ("failed", "interrupted") and attempts[-1][1] == "finished", \
        attempts
    assert attempts[-1][2] is not None and attempts[-1][2] >= 4, attempts
    if when == "inside_checkpoint":
        # step 14 of attempt 1 never became visible: attempt 2 resumed from step 9
        assert attempts[1][2] == 9, attempts
        assert db_rows(home, "SELECT attempt FROM checkpoints WHERE run_id = ? AND step = 14",
                       (run_id,)) == [(attempts[-1][0],)]
    rows = [json.loads(r) for r in ckptd(home, "metrics", run_id, "--format", "jsonl",
                                         check=True).stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(steps))  # no duplicate, none missing
    clean_rows = [json.loads(r) for r in ckptd(home, "metrics", first, "--format", "jsonl",
                                               check=True).stdout.splitlines()]
    assert [r["value"] for r in rows] == [r["value"] for r in clean_rows]


def test_sigusr1_preempts_checkpoints_and_auto_resume_finishes(home: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "final.pt"
    env = env_for(home, OMP_NUM_THREADS="1", CKPTD_RESTART_BACKOFF="0.5")
    daemon = DaemonProc(home, env=env)  # relaunches 0.5 s after the attempt ends, not 10 s
    daemon.start()
    sup = subprocess.Popen(
        readme_command(home, "ckptd run --auto-resume -- torchrun", "--steps", "20",
                       "--ckpt-every", "100", "--sleep", "0.1", "--out", os.fspath(out)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        stdin=subprocess.DEVNULL)
    try:
        run_id = wait_for(lambda: (db_rows(home, "SELECT id FROM runs") or [[None]])[0][0],
                          timeout=60, what="the run")
        wait_for(lambda: (db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ?",
                                  (run_id,))[0][0] or 0) >= 5, timeout=60, what="step 5")
        pid = db_rows(home, "SELECT pid FROM runs WHERE id = ?", (run_id,))[0][0]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGUSR1)  # rank 0 only: the ranks agree through an all_reduce
        wait_for(lambda: db_rows(home, "SELECT status FROM attempts WHERE run_id = ? AND"
                                       " attempt = 1", (run_id,))[0][0] == "preempted",
                 timeout=60, what="attempt 1 preempted")
        grace = time.monotonic() - t0
        sup.communicate(timeout=60)
        wait_for(lambda: db_rows(home, "SELECT status, attempt FROM runs WHERE id = ?",
                                 (run_id,))[0] == ("finished", 2), timeout=120,
                 what="auto-resumed attempt 2 finished")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        daemon.stop()
    ckpts = db_rows(home, "SELECT step, attempt FROM checkpoints WHERE run_id = ?", (run_id,))
    assert len(ckpts) == 1 and ckpts[0][1] == 1, ckpts  # only the preemption checkpoint
    restored = db_rows(home, "SELECT restored_step FROM attempts WHERE run_id = ? AND"
                             " attempt = 2", (run_id,))[0][0]
    assert restored == ckpts[0][0]
    assert out.exists()
    print(f"preemption: SIGUSR1 -> attempt preempted with checkpoint in {grace:.2f} s")
