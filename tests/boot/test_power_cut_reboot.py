"""The headline on a real init: cut the power of a machine running systemd,
boot it again, and the run resumes by itself.

Inside the machine everything is done as its user would: ``ckptd service
install`` (the shipped unit, lingering), ``ckptd run --auto-resume``. After
the cut nothing is typed: the test only boots the machine and watches (the
store read-only from outside, ``systemctl show``), until the run finished.
Its final weights and its effective curve must then equal those of a run
that was never interrupted, made on the host with the same Python.

The host's kernel boot id does not change across the machine's boots (as on
a VM or container restart), so ckptd must tell the dead run from the living
by pid and process start time alone; ``CKPTD_TEST_BOOT_ID`` is not set.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ckptd_client.checkpoint.format import STAGING_SUFFIX, step_dir_name
from helpers import REPO, DaemonProc, ckptd, db_rows, env_for, wait_for
from machine import CONTAINER_PATH, Machine, python_prefix

pytestmark = pytest.mark.boot

EXAMPLE = REPO / "examples" / "train_resumable.py"
STEPS = 40
#: Where the machine's user keeps things (its home is on the machine's own disk).
CKPTD_HOME = "/root/.local/share/ckptd"
WORK = "/root/work"
#: A clean poweroff of the machine takes ~1 s; systemd's stop timeout is 90 s.
SHUTDOWN_MAX_S = 30
#: The user's login environment: this Python first on PATH, and the checkout
#: under test imported (the editable install in the bound Python points elsewhere).
USER_ENV = {"XDG_RUNTIME_DIR": "/run/user/0", "PYTHONPATH": f"{REPO}:{REPO}/client",
            "PATH": f"{python_prefix()}/bin:{CONTAINER_PATH}"}


def seed_rng() -> tuple[int, random.Random]:
    seed = int(os.environ.get("CKPTD_TEST_SEED") or random.randrange(1 << 30))
    print(f"boot test seed {seed} (CKPTD_TEST_SEED={seed} repeats it)")
    return seed, random.Random(seed)


class Timeline:
    """What happened when, in seconds after the first cut (host wall clock)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        # the machine shares the host's kernel, so CLOCK_MONOTONIC too
        self.mono_to_wall = time.time() - time.monotonic()

    def mark(self, what: str, wall: float | None = None) -> None:
        self.marks.append((what, time.time() if wall is None else wall))

    def text(self) -> str:
        cuts = [t for w, t in self.marks if w.startswith("power cut")]
        t0 = cuts[0] if cuts else self.marks[0][1]
        return "\n".join(f"  {t - t0:+8.2f} s  {w}" for w, t in sorted(self.marks,
                                                                       key=lambda m: m[1]))


class User:
    """The machine's user at a shell; reads of the store come from outside, read-only."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.home = m.path(CKPTD_HOME)

    def sh(self, script: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        return self.m.sh(script, env=USER_ENV, timeout=timeout, check=check)

    def ckptd(self, *args: str) -> str:
        return self.sh(f"cd {WORK} && ckptd {shlex.join(args)}").stdout

    def unit(self) -> dict[str, str]:
        out = self.sh("systemctl --user show ckptd.service -p Type,ActiveState,SubState,"
                      "MainPID,NRestarts,Result,ExecMainStartTimestampMonotonic,"
                      "ActiveEnterTimestampMonotonic", check=False).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.sh("journalctl -q --no-pager -o short-monotonic -b all "
                       "--user-unit ckptd.service | tail -n 40", check=False).stdout

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not (self.home / "ckptd.db").exists():
            return []
        return db_rows(self.home, sql, args)

    def run(self, name: str) -> dict[str, Any] | None:
        keys = ("id", "status", "attempt", "reason", "restarts", "auto_resume")
        rows = self.rows(f"SELECT {', '.join(keys)} FROM runs WHERE name = ?", (name,))
        return dict(zip(keys, rows[0], strict=True)) if rows else None

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        keys = ("attempt", "status", "started", "ended", "restored_step")
        rows = self.rows(f"SELECT {', '.join(keys)} FROM attempts WHERE run_id = ?"
                         " ORDER BY attempt", (run_id,))
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def peak(self, run_id: str, attempt: int) -> int:
        (peak,), = self.rows("SELECT COALESCE(MAX(step), -1) FROM metrics WHERE run_id = ?"
                             " AND attempt = ? AND src GLOB 'c*'", (run_id, attempt))
        return peak

    def committed(self, run_id: str) -> list[int]:
        return [s for s, in self.rows("SELECT step FROM checkpoints WHERE run_id = ? AND"
                                      " status = 'committed' ORDER BY step", (run_id,))]


def train_args(name: str, out: str, sleep: float, model: list[str]) -> list[str]:
    return [os.fspath(EXAMPLE), "--steps", str(STEPS), "--sleep", str(sleep), "--name", name,
            "--out", out, *model]


def reference(home: Path, model: list[str]) -> tuple[str, list[tuple[int, str, float]]]:
    """An uninterrupted run on the host: its final hash and its curve."""
    out = home.parent / "ref.hash"
    subprocess.run([sys.executable, *train_args("ref", os.fspath(out), 0, model)],
                   env=env_for(home), cwd=home.parent, check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=300)
    curve = ckptd(home, "metrics", "ref", "--format", "jsonl", check=True).stdout
    return out.read_text(), [(r["step"], r["key"], r["value"])
                             for r in map(json.loads, curve.splitlines())]


def install(m: Machine, tl: Timeline, daemon_env: dict[str, str] | None = None) -> User:
    """First boot: the user logs in, installs the service, starts a run, leaves.
    ``daemon_env``: more of the user manager's environment (and so the unit's)."""
    # The bound checkout is what "installed" means here: the user manager
    # (and so the unit's daemon) imports it too, at every boot.
    envd = m.path("/root/.config/environment.d")
    envd.mkdir(parents=True)
    env = {"PYTHONPATH": USER_ENV["PYTHONPATH"], **(daemon_env or {})}
    (envd / "50-ckptd-under-test.conf").write_text(
        "".join(f"{k}={v}\n" for k, v in env.items()))
    m.path(WORK).mkdir(parents=True)
    m.boot()
    tl.mark("boot 1: system running")
    user = User(m)
    # logging in starts the user's systemd (what logind does for an SSH login)
    m.sh("systemctl start user@0.service")
    out = user.sh("ckptd service install").stdout
    assert out.count("ok    ") == 3, out  # unit written; enabled and started; lingering
    assert m.path("/var/lib/systemd/linger/root").exists(), out
    unit = user.unit()
    assert unit["ActiveState"] == "active" and unit["Type"] == "notify", unit
    return user


def start_run(user: User, name: str, sleep: float, model: list[str],
              term_s: float = 0) -> str:
    """``term_s``: the command takes that long to exit after SIGTERM (a trainer
    saving its state and closing files), and so does its supervisor; each
    attempt that got a SIGTERM appends its number to ``{WORK}/{name}.term``."""
    train = ["python", *train_args(name, f"{WORK}/{name}.hash", sleep, model)]
    if term_s:
        on_term = f'echo "$CKPTD_ATTEMPT" >> {WORK}/{name}.term; sleep {term_s:g}; exit 143'
        train = ["sh", "-c", f"trap {shlex.quote(on_term)} TERM; \"$@\" & wait $!",
                 "sh", *train]
    cmd = ["ckptd", "run", "--name", name, "--auto-resume", "--", *train]
    # as from an SSH session (a scope in user-0.slice, what logind makes for a
    # login) that the user then leaves: detached, output to a file
    line = f"cd {WORK} && setsid nohup {shlex.join(cmd)} > {name}.log 2>&1 < /dev/null &"
    user.sh(f"systemd-run --scope --quiet --slice=user-0.slice --unit=session-{name}.scope"
            f" -- sh -c {shlex.quote(line)}")
    return wait_for(lambda: (r := user.run(name)) and r["id"], timeout=60,
                    what="the run to register")


def cut_at_random_step(m: Machine, user: User, run_id: str, attempt: int,
                       rng: random.Random, tl: Timeline, upto: int = STEPS - 8) -> int:
    target = rng.randrange(4, upto)
    wait_for(lambda: user.peak(run_id, attempt) >= target, timeout=120, interval=0.01,
             what=f"attempt {attempt} to reach step {target}")
    time.sleep(rng.uniform(0, 0.12))  # anywhere inside a step: forward, log, checkpoint
    tl.mark(f"power cut {len([w for w, _ in tl.marks if w.startswith('power cut')]) + 1}"
            f" (attempt {attempt} at step >= {target})", m.power_cut())
    return target


def cut_during_commit(m: Machine, user: User, run_id: str, attempt: int, after: int,
                      tl: Timeline) -> int:
    """Cut while the daemon writes a checkpoint taken after step ``after``:
    its staging directory is there, not yet renamed into place. Returns its step."""
    ckpts = user.home / "runs" / run_id / "checkpoints"
    start = after + 1
    for step in range(start + (-start % 5), STEPS, 5):  # the example saves every 5
        staging = ckpts / (step_dir_name(step) + STAGING_SUFFIX)
        deadline = time.monotonic() + 60
        while not staging.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        m.freeze()
        if staging.exists():
            tl.mark(f"power cut {m.boots} (attempt {attempt}, checkpoint step {step} staged, "
                    "not yet renamed)", m.power_cut())
            return step
        m.freeze(False)  # too late for this one: try the next checkpoint
    raise AssertionError("never caught a checkpoint commit in flight")


def wait_resumed(m: Machine, user: User, name: str, attempt: int, tl: Timeline,
                 timeout: float = 120, cut: bool = True) -> int | None:
    """Boot and touch nothing: the daemon must come up through the unit,
    mark the run interrupted and relaunch it as attempt ``attempt``. Returns
    the newest committed checkpoint at the relaunch."""
    t0 = time.time()
    m.boot()
    tl.mark(f"boot {m.boots}: powered on", t0)
    tl.mark(f"boot {m.boots}: system running")

    def active() -> dict[str, str] | None:
        unit = user.unit()
        return unit if unit.get("ActiveState") == "active" else None

    unit = wait_for(active, timeout=60, interval=0.05,
                    what="ckptd.service to become active at boot (lingering)")
    # Type=notify: active means the daemon said READY=1 (store open, socket bound)
    assert unit["Type"] == "notify" and unit["SubState"] == "running", unit
    assert unit["NRestarts"] == "0", (unit, user.journal())
    lock_pid = int(user.home.joinpath("daemon.lock").read_text().strip())
    assert int(unit["MainPID"]) == lock_pid, "the daemon is not the unit's (autostarted?)"
    tl.mark(f"boot {m.boots}: daemon exec'd by the unit",
            int(unit["ExecMainStartTimestampMonotonic"]) / 1e6 + tl.mono_to_wall)
    tl.mark(f"boot {m.boots}: daemon READY=1, unit active",
            int(unit["ActiveEnterTimestampMonotonic"]) / 1e6 + tl.mono_to_wall)

    # the verdict is seen here unless the relaunch came first (backoff 0)
    recorded, = user.rows("SELECT boot_id FROM runs WHERE name = ?", (name,))[0]
    seen = wait_for(lambda: (r := user.run(name)) and (r["status"] == "interrupted"
                                                         or r["attempt"] >= attempt) and r,
                    timeout=60, interval=0.05, what="the run to be marked interrupted")
    if seen["attempt"] == attempt - 1:
        assert seen["auto_resume"], f"auto-resume was switched off: {seen['reason']}"
    if seen["attempt"] == attempt - 1 and cut:
        booted = m.sh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        # nspawn gives each boot a boot id of its own; where a restart keeps
        # it (same kernel), liveness must judge by pid + start time instead
        expect = "rebooted" if booted != recorded else "vanished"
        assert expect in seen["reason"], (recorded, booted, seen)
    # what the relaunch must restore: the newest checkpoint that survived the cut
    newest = max(user.committed(seen["id"]), default=None)
    run_id = seen["id"]

    def begun() -> list[dict[str, Any]] | None:
        rows = user.attempts(run_id)
        return rows if len(rows) >= attempt and rows[attempt - 1]["started"] else None

    try:
        rows = wait_for(begun, timeout=timeout, interval=0.1,
                        what=f"auto-resume to begin attempt {attempt}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nrun: {user.run(name)}\n{user.journal()}") from None
    prev = rows[attempt - 2]
    assert prev["status"] == "interrupted", rows
    tl.mark(f"boot {m.boots}: attempt {attempt - 1} marked interrupted", prev["ended"])
    tl.mark(f"boot {m.boots}: attempt {attempt} begun (auto-resume)", rows[attempt - 1]["started"])
    return newest


def check_finished(user: User, name: str, restored: list[int | None], ref_hash: str,
                   ref_curve: list[tuple[int, str, float]], tl: Timeline, seed: int) -> None:
    run_id = user.run(name)["id"]
    attempts = len(restored) + 1
    row = wait_for(lambda: (r := user.run(name)) and r["status"] != "running" and r,
                   timeout=180, interval=0.1, what="the resumed run to end")
    assert row["status"] == "finished" and row["attempt"] == attempts, (row, user.journal())
    rows = user.attempts(run_id)
    tl.mark(f"attempt {attempts} finished", rows[-1]["ended"])
    assert [r["status"] for r in rows] == ["interrupted"] * (attempts - 1) + ["finished"], rows
    # each relaunch restored the newest checkpoint that had survived its cut
    assert [r["restored_step"] for r in rows[1:]] == restored, rows

    assert user.m.path(f"{WORK}/{name}.hash").read_text() == ref_hash, \
        f"final weights differ from the uninterrupted run (seed {seed})"
    curve = [(r["step"], r["key"], r["value"])
             for r in map(json.loads, user.ckptd("metrics", name, "--format", "jsonl")
                          .splitlines())]
    for key in ("loss", "lr"):
        steps = [s for s, k, _ in curve if k == key]
        assert steps == list(range(STEPS)), f"{key}: duplicate or missing steps: {steps}"
    assert curve == ref_curve, f"the effective curve differs (seed {seed})"
    user.ckptd("ckpt", "verify", name)  # every committed checkpoint still verifies


def test_power_cut_then_boot_resumes_by_itself(machine: Machine, home: Path,
                                               daemon: DaemonProc) -> None:
    seed, rng = seed_rng()
    ref_hash, ref_curve = reference(home, [])
    tl = Timeline()
    user = install(machine, tl)
    run_id = start_run(user, "boot", 0.1, [])
    target = cut_at_random_step(machine, user, run_id, 1, rng, tl)
    assert not user.committed(run_id) or max(user.committed(run_id)) <= target + 1

    newest = wait_resumed(machine, user, "boot", 2, tl)
    check_finished(user, "boot", [newest], ref_hash, ref_curve, tl, seed)
    machine.shutdown()
    print(f"timeline (seed {seed}):\n{tl.text()}")


@pytest.mark.slow
def test_two_cuts_one_during_a_checkpoint_commit(machine: Machine, home: Path,
                                                 daemon: DaemonProc) -> None:
    seed, rng = seed_rng()
    model = ["--hidden", "512", "--depth", "4"]  # ~10 MB checkpoints: a commit takes a while
    ref_hash, ref_curve = reference(home, model)
    tl = Timeline()
    user = install(machine, tl)
    run_id = start_run(user, "twice", 0.1, model)
    cut_at_random_step(machine, user, run_id, 1, rng, tl, upto=STEPS // 2)
    first = wait_resumed(machine, user, "twice", 2, tl)
    step = cut_during_commit(machine, user, run_id, 2, first if first is not None else -1, tl)
    second = wait_resumed(machine, user, "twice", 3, tl)
    # staged but not renamed at the cut: invisible after it, never restored
    assert second is not None and second < step, (second, step)
    check_finished(user, "twice", [first, second], ref_hash, ref_curve, tl, seed)
    leftovers = [p.name for p in (user.home / "runs" / run_id / "checkpoints").iterdir()
                 if not p.name.startswith("step-") or "." in p.name]
    assert leftovers == [], leftovers  # the staging directory was cleaned up
    machine.shutdown()
    print(f"timeline (seed {seed}):\n{tl.text()}")


def clean_reboot(m: Machine, user: User, tl: Timeline) -> None:
    # Only autostart writes daemon.log (the unit's daemon logs to the journal).
    # A daemon autostarted during the shutdown never gets a SIGTERM: its scope
    # held the reboot DefaultTimeoutStopSec (90 s), or, unmounted under it,
    # it failed to start; which one was a race.
    log = user.home / "daemon.log"
    before = log.read_text() if log.exists() else ""
    tl.mark("clean shutdown (SIGTERM to nspawn: poweroff)")
    took = m.shutdown()
    tl.mark(f"powered off ({took:.1f} s)")
    during = log.read_text()[len(before):] if log.exists() else ""
    assert not during, f"a daemon was autostarted while the machine shut down " \
        f"(shutdown {took:.0f} s):\n{during[-2000:]}\n{m.console()}"
    assert took < SHUTDOWN_MAX_S, f"clean shutdown took {took:.0f} s:\n{m.console()}"


def restart_daemon_keeps(user: User, run_id: str, attempt: int, tl: Timeline) -> str:
    """``systemctl --user restart ckptd`` (an upgrade) with the daemon's own
    relaunch running: the run goes on, logging to the new daemon. Returns
    the supervisor's cgroup. (A client that finds no socket in the restart's
    gap autostarts a daemon, which loses the lock to the unit's and says so
    in daemon.log.)"""
    (sup,), = user.rows("SELECT supervisor_pid FROM runs WHERE id = ?", (run_id,))
    before = user.unit()["MainPID"]
    user.sh("systemctl --user restart ckptd.service")
    tl.mark(f"boot {user.m.boots}: daemon restarted (systemctl --user restart ckptd)")
    assert user.unit()["MainPID"] != before, user.unit()
    peak = user.peak(run_id, attempt)
    wait_for(lambda: user.peak(run_id, attempt) >= peak + 2, timeout=30, interval=0.05,
             what=f"attempt {attempt} to log on to the restarted daemon")
    assert user.sh(f"kill -0 {sup}", check=False).returncode == 0, \
        f"the daemon's restart ended the supervisor of attempt {attempt}"
    return user.sh(f"cat /proc/{sup}/cgroup", check=False).stdout


def test_clean_reboot_resumes_by_itself(machine: Machine, home: Path,
                                        daemon: DaemonProc) -> None:
    """`systemctl reboot` (a kernel update) must not end a week-long run
    either: not the run a person started, nor the attempt auto-resume
    relaunched after it. Each gets SIGTERM and its grace period (as in a
    login session's scope; the daemon's unit has ``KillMode=process``, so a
    relaunch left in its cgroup was SIGKILLed like at a power cut) and
    comes back by itself at the next boot."""
    seed, rng = seed_rng()
    ref_hash, ref_curve = reference(home, [])
    tl = Timeline()
    # a backoff of 2 s, not 10 (then 20): the relaunches come sooner
    user = install(machine, tl, {"CKPTD_RESTART_BACKOFF": "2"})
    # the supervisor outlives the unit's daemon (stopped in ~0.2 s): it reports
    # to no daemon, as it does whenever its trainer is slower to exit than that
    run_id = start_run(user, "reboot", 0.25, [], term_s=2)
    wait_for(lambda: user.peak(run_id, 1) >= rng.randrange(4, 12), timeout=120,
             interval=0.01, what="progress")
    clean_reboot(machine, user, tl)
    first = wait_resumed(machine, user, "reboot", 2, tl, cut=False)

    # attempt 2 is the daemon's relaunch; a daemon restart leaves it alone
    wait_for(lambda: user.peak(run_id, 2) > (first if first is not None else -1),
             timeout=60, interval=0.05, what="attempt 2 to log a step")
    cgroup = restart_daemon_keeps(user, run_id, 2, tl)
    assert user.run("reboot")["status"] == "running", "attempt 2 ended before the reboot"
    clean_reboot(machine, user, tl)
    second = wait_resumed(machine, user, "reboot", 3, tl, cut=False)

    # attempt 2 was stopped by the shutdown, not SIGKILLed at its end
    term = machine.path(f"{WORK}/reboot.term")
    # (each SIGTERM runs the trap: systemd's to the scope, the supervisor's forward)
    got = sorted(set(term.read_text().split())) if term.exists() else []
    (code,), = user.rows("SELECT exit_code FROM attempts WHERE run_id = ? AND attempt = 2",
                         (run_id,))
    why = [m for m, in user.rows("SELECT message FROM events WHERE run_id = ? AND"
                                 " attempt = 2 AND kind = 'status'", (run_id,))]
    assert got == ["1", "2"] and code == 143, (
        f"attempts whose trainer got SIGTERM: {got}, attempt 2 exit code {code}, "
        f"status events {why}; its supervisor's cgroup: {cgroup}\n{user.journal()}")
    assert any("system shutting down" in m for m in why), why
    assert "/ckptd-run-" in cgroup, cgroup  # a scope of its own, not ckptd.service's

    check_finished(user, "reboot", [first, second], ref_hash, ref_curve, tl, seed)
    clean_reboot(machine, user, tl)
    print(f"timeline (seed {seed}):\n{tl.text()}")
