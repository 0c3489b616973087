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
    # Round 1 waits until the daemon is surely dead (the send fails at once);
    # the others kill and checkpoint in the same instant, so the request can
    # also land in the dying daemon's socket (then it is resent on EOF).
    code = """
        import os, signal, json, time
        import torch
        import ckptd_client as ckptd
        from ckptd_client import transport

        run = ckptd.init(name="restart")
        state = {"w": torch.arange(1000, dtype=torch.float32)}
        run.checkpoint(state, step=1).wait(timeout=60)
        results = []
        for step in (2, 3, 4):
            pid = transport.call(run.home, "status")["pid"]
            os.kill(pid, signal.SIGKILL)
            if step == 2:
                time.sleep(0.2)
            h = run.checkpoint(state, step=step)
            try:
                results.append(h.wait(timeout=60)["step"])
            except Exception as exc:
                results.append(str(exc))
        print(json.dumps(results))
        run.finish()
    """
    proc = run_script(home, code)
    daemon.proc.wait(timeout=10)  # reap the killed one
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2, 3, 4], proc.stderr
    out = ckptd(home, "ckpt", "ls", "restart", "--json", check=True).stdout
    assert [(c["step"], c["status"]) for c in json.loads(out)] == [
        (s, "committed") for s in (1, 2, 3, 4)]
    ckptd(home, "ckpt", "verify", "restart", check=True)
