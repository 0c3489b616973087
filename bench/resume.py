"""How long ``ckptd resume`` takes to get a killed run training again.

Measured: from the moment ``ckptd resume RUN`` is started to the first
training step of the resumed attempt (the ``time`` of its first logged
metric), for ``examples/train_resumable.py`` killed with SIGKILL after a
checkpoint.

Baseline: what a user's own resume does, with plain PyTorch and no ckptd.
The same checkpoint is exported as one ``torch.save`` file; a fresh Python
process (timed from spawn, so ``import torch`` counts) builds the same
model, optimizer and scheduler, ``torch.load``s the file (every tensor byte
read), calls ``load_state_dict`` on all three, restores the torch RNG state
and trains one step. ckptd adds the CLI, the new attempt, the supervisor,
verifying every hash and restoring every RNG state. Target: ratio <= 1.3.
The example's cold start as a new run is printed for reference.

    python bench/resume.py [--trials 3] [--hidden 1024 --depth 6]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_resumable.py"


def rows(home: Path, sql: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{home / 'ckptd.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait(pred, timeout: float = 120.0, what: str = ""):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except sqlite3.OperationalError:
            value = None
        if value:
            return value
        time.sleep(0.005)
    raise SystemExit(f"bench: timed out waiting for {what}")


def first_step_time(home: Path, name: str, attempt: int) -> float:
    return wait(lambda: (r := rows(
        home, "SELECT MIN(m.time) FROM metrics m JOIN runs r ON r.id = m.run_id WHERE"
              " r.name = ? AND m.attempt = ? AND m.src GLOB 'c*'", (name, attempt))) and r[0][0],
        what=f"first step of {name} attempt {attempt}")


def trial(home: Path, env: dict[str, str], name: str, size: list[str]) -> tuple[float, float,
                                                                               float]:
    cmd = [sys.executable, os.fspath(EXAMPLE), "--name", name, "--steps", "100000",
           "--ckpt-every", "3", *size]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    cold = first_step_time(home, name, 1) - t0
    (run_id,), = rows(home, "SELECT id FROM runs WHERE name = ?", (name,))
    wait(lambda: rows(home, "SELECT MAX(step) FROM checkpoints WHERE run_id = ? AND"
                            " status = 'committed'", (run_id,))[0][0], what="a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait(lambda: rows(home, "SELECT status FROM runs WHERE id = ?",
                      (run_id,))[0][0] == "interrupted", what="interrupted")
    (step,), = rows(home, "SELECT MAX(step) FROM checkpoints WHERE run_id = ? AND"
                          " status = 'committed'", (run_id,))

    t0 = time.time()
    resumed = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home),
                                "resume", run_id], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = first_step_time(home, name, 2) - t0
    phases = rows(home, "SELECT kind, MIN(time) FROM events WHERE run_id = ? AND attempt = 2"
                        " AND src GLOB 'c*' GROUP BY kind", (run_id,))
    (begun,), = rows(home, "SELECT started FROM attempts WHERE run_id = ? AND attempt = 2",
                     (run_id,))
    marks = dict(phases)
    print(f"  {name}: cold {cold:.3f} s | resume: attempt begun +{begun - t0:.3f} s, "
          f"process registered +{marks.get('register', 0) - t0:.3f} s, "
          f"restored +{marks.get('restored', 0) - t0:.3f} s, first step +{resume:.3f} s",
          flush=True)
    (pid,), = rows(home, "SELECT pid FROM attempts WHERE run_id = ? AND attempt = 2",
                   (run_id,))
    os.kill(pid, signal.SIGKILL)
    resumed.wait()

    export = home.parent / f"{name}.pt"
    done = subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "ckpt",
                           "export", run_id, "--step", str(step), "-o", os.fspath(export)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: export failed: {done.stderr.strip()}")
    t0 = time.time()
    hand = subprocess.run([sys.executable, "-c", HAND_RESUME, os.fspath(export), *size],
                          env=env, check=True, capture_output=True, text=True)
    return cold, float(hand.stdout.split()[-1]) - t0, resume


#: A user's resume without ckptd (see the module docstring); prints the wall
#: time of its first trained step. Same model as examples/train_resumable.py.
HAND_RESUME = """
import sys, time
import torch
from torch.utils.data import DataLoader, TensorDataset

path, hidden, depth = sys.argv[1], int(sys.argv[3]), int(sys.argv[5])
torch.set_num_threads(1)
data_gen = torch.Generator().manual_seed(1234)
x = torch.randn(400, 32, generator=data_gen)
y = torch.sin(x @ torch.randn(32, 1, generator=data_gen))
loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
layers = [torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2)]
for _ in range(depth - 1):
    layers += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100000, eta_min=1e-4)
ckpt = torch.load(path, weights_only=True)  # reads every tensor byte
state = ckpt["state"]
model.load_state_dict(state["model"])
opt.load_state_dict(state["optim"])
sched.load_state_dict(state["sched"])
if (ckpt.get("rng") or {}).get("torch") is not None:
    torch.set_rng_state(ckpt["rng"]["torch"])
xb, yb = next(iter(loader))
loss = torch.nn.functional.mse_loss(model(xb), yb)
opt.zero_grad()
loss.backward()
opt.step()
sched.step()
loss.item()
print(time.time())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    args = parser.parse_args()
    size = ["--hidden", str(args.hidden), "--depth", str(args.depth)]
    params = 32 * args.hidden + (args.depth - 1) * args.hidden ** 2
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-resume-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
        env["CKPTD_HOME"] = os.fspath(home)
        subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "start"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        try:
            results = [trial(home, env, f"bench-{i}", size) for i in range(args.trials)]
        finally:
            subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "stop"],
                           env=env, stdout=subprocess.DEVNULL)
    cold = statistics.median(r[0] for r in results)
    hand = statistics.median(r[1] for r in results)
    resume = statistics.median(r[2] for r in results)
    print(f"state: ~{params * 3 * 4 / 2**20:.0f} MiB (model + Adam), {args.trials} trials, "
          "medians")
    print(f"(reference) new run, spawn to first step:      {cold:7.3f} s")
    print(f"baseline: plain-PyTorch resume to first step:  {hand:7.3f} s")
    print(f"ckptd resume to first step:                    {resume:7.3f} s")
    print(f"ratio resume / baseline:                       {resume / hand:7.2f}x "
          "(target <= 1.3x)")


if __name__ == "__main__":
    main()
