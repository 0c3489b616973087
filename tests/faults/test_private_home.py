"""Only the owner gets in (SPEC promise 6), on disk: a second local user can
neither read what ckptd stores, nor plant a home, store or socket directory
that ckptd then trusts.

Each test uses a real second user (``useradd``) and a home in a 0755
directory under /tmp she can reach, as ``~/.local/share`` usually is.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ckptd, env_for, kill_home_daemon, run_script, wait_for
from users import User, need_users, second_user, shared_dir

pytestmark = need_users

TRAIN = """
import os, ckptd_client as ckptd, torch
run = ckptd.init(name="private")
run.log({"loss": 1.0}, step=1)
run.checkpoint({"w": torch.ones(16)}, step=1).wait(timeout=60)
print("run", run.id, flush=True)
run.finish()
"""


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            out[os.fspath(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_everything_stored_is_private_under_umask_022(public: Path, attacker: User) -> None:
    """Found: a home made by ``mkdir -p`` (0755) left ckptd.db, its WAL, daemon.log
    and runs/ readable by everyone; a second user read AWS_SECRET_ACCESS_KEY from
    the stored environment. Now the home is tightened to 0700 (said once on
    stderr) and every file is 0600, every directory 0700, whatever the umask."""
    home = public / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    old = os.umask(0o022)
    try:
        env = env_for(home, AWS_SECRET_ACCESS_KEY="s3cr3t-key-value")
        # the spool (daemon down), then a run with a checkpoint (auto-started daemon)
        spooled = run_script(home, """
import ckptd_client as ckptd
run = ckptd.init(autostart=False)
run.log({"x": 1.0})
run.finish(timeout=2)
""", env={**env, "CKPTD_NO_AUTOSTART": "1"})
        assert spooled.stderr.count("changed it to 0700") == 1, spooled.stderr
        assert list((home / "spool").glob("*.spool"))
        spool_modes = _modes(home / "spool")
        out = run_script(home, TRAIN, env=env, timeout=180)
        run_id = out.stdout.split("run ")[-1].strip()
        # a relaunch: the supervisor's log of the run's terminal output
        res = ckptd(home, "resume", run_id, "--detach", "--force", env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: (home / "runs" / run_id / "supervisor.log").exists(),
                 what="supervisor log")
        assert (home / "ckptd.db-wal").exists()  # the daemon still runs: WAL and SHM exist
        modes = _modes(home)
    finally:
        os.umask(old)
        kill_home_daemon(home)
    modes.update({f"spool/{k}": v for k, v in spool_modes.items()})
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for name in ("ckptd.db", "ckptd.db-wal", "ckptd.db-shm", "daemon.log", "runs",
                 f"runs/{run_id}", f"runs/{run_id}/checkpoints",
                 f"runs/{run_id}/checkpoints/step-1/manifest.json"):
        assert name in modes, name
    loose = {k: oct(v) for k, v in modes.items() if v & 0o077}
    assert not loose, loose
    # and the second user cannot read the store, even knowing its name
    got = attacker.run("cat", os.fspath(home / "ckptd.db"))
    assert got.returncode != 0 and "s3cr3t" not in got.stdout
    assert "s3cr3t-key-value" in (home / "ckptd.db").read_bytes().decode(errors="replace")


def _store_with_command(home: Path, marker: Path) -> str:
    """A home with one run whose recorded command is ``touch marker``."""
    out = run_script(home, TRAIN, timeout=180)
    run_id = out.stdout.split("run ")[-1].strip()
    ckptd(home, "stop", check=True)
    conn = sqlite3.connect(home / "ckptd.db")
    conn.execute("UPDATE runs SET command = ?, status = 'interrupted' WHERE id = ?",
                 (json.dumps(["/usr/bin/touch", os.fspath(marker)]), run_id))
    conn.commit()
    conn.close()
    return run_id


@pytest.mark.parametrize("owned", ["home", "store", "runs"])
def test_a_home_owned_by_another_user_is_refused(public: Path, attacker: User,
                                                 owned: str) -> None:
    """Found: she owned the home, replaced ckptd.db, and `ckptd resume` ran her
    command as root. A home (or store, or runs directory) another user owns is
    refused by the CLI, the daemon and init(), each with one line."""
    home = public / "home"
    home.mkdir(mode=0o700)
    marker = public / "pwned"
    run_id = _store_with_command(home, marker)
    target = {"home": home, "store": home / "ckptd.db", "runs": home / "runs"}[owned]
    for p in [target, *(target.rglob("*") if owned != "store" else [])]:
        os.chown(p, attacker.uid, attacker.gid, follow_symlinks=False)
    try:
        for args in (["resume", run_id], ["ls"], ["show", run_id]):
            res = ckptd(home, *args, timeout=60)
            assert res.returncode != 0, (args, res.stdout)
            err = res.stderr.strip()
            assert f"owned by uid {attacker.uid}, not you" in err, (args, err)
            assert "\n" not in err and "Traceback" not in err, err
        assert not marker.exists(), "resume ran the other user's command"
        daemon = subprocess.run([sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(home)],
                                capture_output=True, text=True, timeout=60, env=env_for(home),
                                stdin=subprocess.DEVNULL)
        assert daemon.returncode != 0
        assert daemon.stderr.strip().count("\n") == 0, daemon.stderr
        assert "not you" in daemon.stderr and "Traceback" not in daemon.stderr
        res = run_script(home, """
import ckptd_client as ckptd
from ckptd_client.errors import CkptdError
try:
    ckptd.init()
    print("accepted")
except CkptdError as exc:
    print("refused:", exc)
""", env=env_for(home))
        assert "refused:" in res.stdout and "not you" in res.stdout, res.stdout + res.stderr
        assert not marker.exists()
    finally:
        kill_home_daemon(home)


def test_planted_socket_directory_is_refused(public: Path, attacker: User) -> None:
    """Found: a symlink planted at the socket directory ($XDG_RUNTIME_DIR/ckptd,
    /tmp/ckptd-<uid>) was followed: the daemon chmod-ed its target to 0700 and
    bound its socket there. Now it refuses, touching nothing; a directory she
    owns there is refused too."""
    runtime = public / "runtime"
    runtime.mkdir()
    os.chmod(runtime, 0o1777)  # a shared runtime dir she can write to
    target = public / "target"
    target.mkdir()
    os.chmod(target, 0o755)
    home = public / "home"
    home.mkdir(mode=0o700)
    env = env_for(home, XDG_RUNTIME_DIR=os.fspath(runtime))
    try:
        attacker.run("ln", "-s", os.fspath(target), os.fspath(runtime / "ckptd"), check=True)
        for planted in ("symlink", "her directory"):
            if planted == "her directory":
                os.unlink(runtime / "ckptd")
                attacker.run("mkdir", "-m", "0777", os.fspath(runtime / "ckptd"), check=True)
            daemon = subprocess.run(
                [sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(home)],
                capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
            err = daemon.stderr.strip().splitlines()
            assert daemon.returncode != 0, (planted, daemon.stderr)
            assert len([line for line in err if line.startswith("ckptd:")]) == 1, daemon.stderr
            assert "Traceback" not in daemon.stderr
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o755, planted
            assert os.listdir(target) == [], planted
    finally:
        kill_home_daemon(home)


def test_planted_tmp_socket_directory_is_refused(attacker: User) -> None:
    """The /tmp fallback (a home too deep for a socket path), for a victim user
    of its own so no other test's /tmp/ckptd-0 is disturbed: her symlink at
    /tmp/ckptd-<victim uid> is refused and its target keeps its mode."""
    client = Path(__file__).resolve().parents[2] / "client"
    with second_user("vic") as victim, shared_dir() as public:
        target = public / "victims"
        target.mkdir()
        os.chown(target, victim.uid, victim.gid)
        os.chmod(target, 0o755)
        link = Path(f"/tmp/ckptd-{victim.uid}")
        attacker.run("ln", "-s", os.fspath(target), os.fspath(link), check=True)
        deep = public / ("d" * 120)
        res = victim.run("/usr/bin/python3", "-c", f"""
import sys; sys.path.insert(0, {os.fspath(client)!r})
from pathlib import Path
from ckptd_client import paths
from ckptd_client.errors import CkptdError
sock = paths.socket_path(Path({os.fspath(deep)!r}))
print("socket", sock)
try:
    paths.private_dir(sock.parent)
    print("accepted")
except CkptdError as exc:
    print("refused:", exc)
""")
        assert f"socket {link}/" in res.stdout, res.stdout + res.stderr
        assert "refused:" in res.stdout and "symlink" in res.stdout, res.stdout + res.stderr
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
        os.unlink(link)
