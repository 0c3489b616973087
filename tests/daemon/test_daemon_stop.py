"""``ckptd stop`` while runs are connected: refused unless ``--force``, because
every connected client starts a new daemon within a second of losing one."""

from __future__ import annotations

from pathlib import Path

from helpers import DaemonProc, ckptd, socket_answers, spawn_script, wait_for


def test_stop_refuses_while_runs_are_connected_unless_forced(home: Path,
                                                              daemon: DaemonProc) -> None:
    trainer = spawn_script(home, """
        import sys, time, ckptd_client as ckptd
        run = ckptd.init(name="busy")
        run.flush()
        print("up", flush=True)
        time.sleep(120)
    """)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == "up"
        res = ckptd(home, "stop")
        assert res.returncode != 0, res.stdout
        assert "busy (" in res.stderr and "--force" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "stopped" not in res.stdout
        assert daemon.proc is not None and daemon.proc.poll() is None  # still serving
        assert socket_answers(home)

        res = ckptd(home, "stop", "--force")
        assert res.returncode == 0 and "stopped" in res.stdout, res.stderr
        assert "busy" in res.stderr and "warning" in res.stderr
        daemon.proc.wait(timeout=30)
    finally:
        trainer.kill()
        trainer.wait(timeout=10)
    # nothing connected: a plain stop works (after the client's own restart, if any)
    wait_for(lambda: ckptd(home, "status").returncode in (0, 3), what="status")
    if socket_answers(home):
        assert ckptd(home, "stop").returncode == 0
