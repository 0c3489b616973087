"""Run management (issue 9, item D): rm, rename, tag, note, keys; ``ls``
filters and columns; names that several runs share are errors, not guesses.

Real daemon, real store, real CLI processes; every write goes through the
daemon's RPC into ``store``.
"""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, spawn_script, wait_for

TRAIN = """
import sys, time, torch
import ckptd_client as ckptd
lr = float(sys.argv[1])
run = ckptd.init(project=sys.argv[3], name=sys.argv[2], config={"lr": lr, "depth": 3})
for i in range(3):
    run.log({"loss": lr * 10 / (i + 1), "acc": i / 3}, step=i)
run.checkpoint({"w": torch.zeros(4)}, step=2).wait(timeout=60)
if len(sys.argv) > 4:
    time.sleep(float(sys.argv[4]))
run.finish()
"""


def train(home: Path, lr: str, name: str, project: str = "p1", *extra: str) -> None:
    run_script(home, TRAIN, args=[lr, name, project, *extra])


def ls_json(home: Path, *args: str) -> list[dict]:
    return json.loads(ckptd(home, "ls", "--json", *args, check=True).stdout)


@pytest.fixture
def three_runs(home: Path, daemon: DaemonProc) -> list[str]:
    train(home, "1e-2", "demo")
    train(home, "1e-4", "demo")
    train(home, "1e-3", "other", "p2")
    return [r["id"] for r in ls_json(home)]


def test_a_name_several_runs_share_is_an_error_listing_them(home, three_runs) -> None:
    first, second, _ = three_runs
    for args in (["show", "demo"], ["tail", "demo"], ["metrics", "demo"], ["keys", "demo"],
                 ["ckpt", "ls", "demo"], ["rename", "demo", "x"], ["rm", "--yes", "demo"]):
        proc = ckptd(home, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert first in proc.stderr and second in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
    assert len(ls_json(home)) == 3  # nothing removed or renamed
    # a unique name still resolves
    assert json.loads(ckptd(home, "show", "other", "--json", check=True).stdout)["id"] \
        == three_runs[2]


def test_rename_tag_note_show_and_ls_json(home, three_runs) -> None:
    first, second, third = three_runs
    ckptd(home, "rename", first, "high-lr", check=True)
    ckptd(home, "tag", "high-lr", "baseline", "sweep", check=True)
    ckptd(home, "tag", second, "sweep", check=True)
    ckptd(home, "tag", "high-lr", "sweep", "--untag", check=True)
    ckptd(home, "note", "high-lr", "diverged at step 2", check=True)
    info = json.loads(ckptd(home, "show", "high-lr", "--json", check=True).stdout)
    assert (info["name"], info["tags"], info["note"]) == ("high-lr", ["baseline"],
                                                          "diverged at step 2")
    assert "diverged at step 2" in ckptd(home, "show", "high-lr", check=True).stdout
    runs = {r["id"]: r for r in ls_json(home)}
    assert runs[first]["tags"] == ["baseline"] and runs[second]["tags"] == ["sweep"]
    assert runs[third]["project"] == "p2" and runs[third]["config"] == {"lr": 1e-3, "depth": 3}
    assert runs[second]["last"] == {"loss": pytest.approx(1e-3 / 3), "acc": pytest.approx(2 / 3)}
    ckptd(home, "note", "high-lr", "", check=True)
    assert json.loads(ckptd(home, "show", first, "--json").stdout)["note"] is None
    # bad values are usage errors, one line each
    for args in (["tag", first, "two words"], ["tag", first, "a,b"], ["rename", first, ""],
                 ["rename", first, "bad\x1bname"], ["note", "nope", "x"]):
        proc = ckptd(home, *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_ls_filters_and_columns(home, three_runs) -> None:
    first, second, third = three_runs
    ckptd(home, "tag", first, "keep", check=True)

    def ids(*args: str) -> list[str]:
        return [r["id"] for r in ls_json(home, *args)]

    assert ids("--project", "p2") == [third]
    assert ids("--tag", "keep") == [first]
    assert ids("--name", "de*") == [first, second]
    assert ids("--status", "finished") == three_runs
    assert ids("--where", "config.lr<1e-3") == [second]
    assert ids("--where", "config.lr <= 1e-3 and loss < 0.001") == [second]
    assert ids("--where", "config.depth == 3 and name = other") == [third]
    assert ids("--where", "acc>0.5 and project='p1'") == [first, second]
    assert ids("--where", "no_such_metric>0") == []
    assert ids("--project", "p1", "--where", "loss>0.01") == [first]
    out = ckptd(home, "ls", "--where", "config.lr<1e-3", "--columns", "config.lr,loss",
                check=True).stdout.splitlines()
    assert out[0].split()[-2:] == ["CONFIG.LR", "LOSS"] and len(out) == 2
    assert out[1].split()[-2:] == ["0.0001", "0.000333333"]
    for bad in ("lr", "lr <", "lr < 1 or lr > 2", "import os", "__import__('os')<1"):
        proc = ckptd(home, "ls", "--where", bad)
        assert proc.returncode == 2 and "--where" in proc.stderr, (bad, proc.stderr)


def test_rm_removes_rows_checkpoints_and_files_and_asks_first(home, three_runs) -> None:
    first, second, third = three_runs
    run_dir = home / "runs" / first
    assert (run_dir / "checkpoints").is_dir()
    ckptd(home, "tag", first, "gone", check=True)
    # no terminal and no --yes: refused, nothing removed
    proc = ckptd(home, "rm", first)
    assert proc.returncode == 2 and "--yes" in proc.stderr
    assert run_dir.is_dir()
    # on a terminal it asks; "n" keeps the run
    assert _rm_on_tty(home, first, b"n\n") == 1 and run_dir.is_dir()
    assert _rm_on_tty(home, first, b"y\n") == 0
    assert not run_dir.exists()
    for table, col in (("runs", "id"), ("attempts", "run_id"), ("events", "run_id"),
                       ("metrics", "run_id"), ("checkpoints", "run_id"), ("tags", "run_id")):
        assert db_rows(home, f"SELECT COUNT(*) FROM {table} WHERE {col} = ?", (first,)) \
            == [(0,)], table
    ckptd(home, "rm", "--yes", second, third, check=True)
    assert ls_json(home) == [] and sorted(os.listdir(home / "runs")) == []


def _rm_on_tty(home: Path, run: str, answer: bytes) -> int:
    main, child = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "rm",
                                 run], stdin=child, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env_for(home))
        os.write(main, answer)
        _, err = proc.communicate(timeout=60)
        assert b"[y/N]" in err, err
        return proc.returncode
    finally:
        os.close(main)
        os.close(child)


def test_rm_refuses_a_running_run(home, daemon: DaemonProc) -> None:
    script = spawn_script(home, "import sys\nsys.argv[1:] = ['1e-2', 'live', 'p', '60']\n"
                          + TRAIN)
    try:
        (run_id,), = wait_for(lambda: db_rows(
            home, "SELECT id FROM runs WHERE name = 'live' AND step = 2"), timeout=60)
        proc = ckptd(home, "rm", "--yes", "live")
        assert proc.returncode == 1 and "running" in proc.stderr, proc.stderr
        assert (home / "runs" / run_id).is_dir() and ls_json(home, "--name", "live")
    finally:
        script.kill()
        script.communicate(timeout=30)


def test_keys_lists_counts_last_values_and_system_metrics(home: Path) -> None:
    daemon = DaemonProc(home, env_for(home, CKPTD_SYS_INTERVAL="0.2"))
    daemon.start()
    try:
        train(home, "1e-2", "k", "p", "5")
        rows = json.loads(ckptd(home, "keys", "k", "--json", check=True).stdout)
        own = {r["key"]: r for r in rows if not r["system"]}
        assert own["loss"]["count"] == 3 and own["loss"]["step"] == 2
        assert own["loss"]["last"] == pytest.approx(1e-2 * 10 / 3)
        assert any(r["system"] and r["key"].startswith("sys/") for r in rows), rows
        text = ckptd(home, "keys", "k", check=True).stdout
        assert text.index("loss") < text.index("system (sampled by the daemon):") \
            < text.index("sys/")
    finally:
        daemon.stop()


def test_a_version_1_store_is_migrated_and_readable_before(home: Path) -> None:
    import sqlite_utils

    from ckptd.store import writer as store

    conn = sqlite3.connect(home / "ckptd.db")
    store._create_v1(sqlite_utils.Database(conn))
    conn.execute("INSERT INTO runs (id, name, status, attempt, started) VALUES"
                 " ('20260101-000000-abcdef', 'old', 'finished', 1, 1.0)")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    env = env_for(home, CKPTD_NO_AUTOSTART="1")
    # readers work on the old schema (no tags table yet)
    runs = json.loads(ckptd(home, "ls", "--json", env=env, check=True).stdout)
    assert [(r["name"], r["tags"]) for r in runs] == [("old", [])]
    daemon = DaemonProc(home)
    daemon.start()
    try:
        assert db_rows(home, "PRAGMA user_version") == [(store.SCHEMA_VERSION,)]
        ckptd(home, "tag", "old", "migrated", check=True)
        assert ls_json(home, "--tag", "migrated")[0]["name"] == "old"
    finally:
        daemon.stop()


def test_a_half_removed_run_directory_is_swept_at_startup(home: Path) -> None:
    from ckptd.daemon.manage import REMOVING_SUFFIX

    left = home / "runs" / ("20260101-000000-abcdef" + REMOVING_SUFFIX) / "checkpoints"
    left.mkdir(parents=True)
    (left / "data").write_bytes(b"x" * 100)
    daemon = DaemonProc(home)
    daemon.start()
    try:
        wait_for(lambda: not left.parent.exists(), what="the sweep of a half-removed run")
    finally:
        daemon.stop()


def test_every_managing_runs_command_in_the_readme_works(home: Path, daemon: DaemonProc) -> None:
    import re
    import shlex

    from helpers import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Managing runs"):text.index("## Surviving crashes")]
    commands = [shlex.split(m, comments=True) for m in
                re.findall(r"^ {4}(ckptd .*)$", section, re.M)]
    assert len(commands) == 6, commands
    train(home, "1e-4", "baseline")
    for argv in commands:
        proc = ckptd(home, *argv[1:])
        assert proc.returncode == 0, (argv, proc.stderr)
        if argv[1] == "ls":  # the filter finds the tagged run and shows its columns
            assert "baseline" in proc.stdout and "0.0001" in proc.stdout, proc.stdout
    assert ls_json(home) == []  # the last command removed it
