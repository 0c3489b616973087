"""How an attempt's ending reads (issue 9.4): the exact resume line after a
killed ``ckptd run``, one status line per ending in ``tail``, no "resumed"
for a first attempt, and bad option values as usage errors (exit 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import DaemonProc, ckptd, env_for, run_script, wait_for

SCRIPT = """
import sys, time
import ckptd_client as ckptd
run = ckptd.init(name="ending")
for i in range(3):
    run.log({"loss": 1.0 / (i + 1)}, step=i)
if sys.argv[1:] == ["hang"]:
    print("ready", flush=True)
    time.sleep(60)
"""


def test_killed_run_without_auto_resume_prints_the_resume_line(home, daemon: DaemonProc) -> None:
    script = home.parent / "ending.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run",
                             "--", sys.executable, os.fspath(script), "hang"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for(home), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    from helpers import db_rows

    (run_id, child), = wait_for(lambda: db_rows(
        home, "SELECT id, pid FROM runs WHERE name = 'ending' AND pid IS NOT NULL"))
    os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
    assert f"  ckptd resume {run_id}\n" in err, err  # CKPTD_HOME implies the home
    assert "relaunches" not in err


def test_tail_has_one_finished_line_and_no_resumed_for_attempt_one(
        home, daemon: DaemonProc) -> None:
    script = home.parent / "ending.py"
    script.write_text(SCRIPT.replace('name="ending")', 'name="ending")\nrun.restore()'))
    ckptd(home, "run", "--", sys.executable, os.fspath(script), check=True)
    out = ckptd(home, "tail", "ending", check=True).stdout
    assert out.count("finished") == 1, out
    # a first attempt that restores (a rollback) does not say it resumed
    code = """
        import torch, ckptd_client as ckptd
        run = ckptd.init(name="rollback")
        run.checkpoint({"w": torch.zeros(3)}, step=5).wait(timeout=60)
        run.restore()
        run.finish()
    """
    run_script(home, code)
    out = ckptd(home, "tail", "rollback", check=True).stdout
    assert "resumed" not in out, out
    assert "attempt 1 restored checkpoint step 5" in out, out


def test_bad_option_values_are_usage_errors(home) -> None:
    for args in (["metrics", "x", "--format", "xml"], ["ls", "--status", "bogus"],
                 ["tail", "x", "--grep", "("], ["tail", "x", "-n", "-1"], ["run"]):
        proc = ckptd(home, *args)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
