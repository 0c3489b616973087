"""A checkpoint asked for while the daemon restarts is committed, not dropped.

Issue 9.8: after a ``kill -9`` of the daemon, ``log()`` auto-started a new
one within the second, but ``checkpoint()`` failed at once with "no daemon
answering ... Connection refused". It now starts (or waits for) a daemon for
a bounded time and hands the snapshot over.
"""

from __future__ import annotations

import json

from helpers import DaemonProc, ckptd, run_script


def test_checkpoint_right_after_daemon_kill9_is_committed_and_verifies(
        home, daemon: DaemonProc) -> None:
    code = f"""
        import os, signal, json, sys, time
        import torch
        import ckptd_client as ckptd

        run = ckptd.init(name="restart")
        state = {{"w": torch.arange(1000, dtype=torch.float32)}}
        run.checkpoint(state, step=1).wait(timeout=60)
        os.kill({daemon.pid}, signal.SIGKILL)
        time.sleep(0.2)  # the daemon is gone; nobody has started another yet
        h = run.checkpoint(state, step=2)
        try:
            info = h.wait(timeout=60)
            print(json.dumps({{"ok": True, "step": info["step"]}}))
        except Exception as exc:
            print(json.dumps({{"ok": False, "error": str(exc)}}))
        run.finish()
    """
    proc = run_script(home, code)
    daemon.proc.wait(timeout=10)  # reap the killed one
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"ok": True, "step": 2}, proc.stderr
    out = ckptd(home, "ckpt", "ls", "restart", "--json", check=True).stdout
    assert [(c["step"], c["status"]) for c in json.loads(out)] == [
        (1, "committed"), (2, "committed")]
    ckptd(home, "ckpt", "verify", "restart", check=True)
