"""``ckptd watch`` driven in a real terminal (tmux): panes, live updates, q, 80x24."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import ckptd, env_for, spawn_script
from views_helpers import LIVE_RUN, Tmux, braille, command, need, read_until


def test_watch_live_in_tmux_quits_clean_and_fits_80x24(home: Path, daemon: object) -> None:
    need("tmux")
    run = spawn_script(home, LIVE_RUN)
    tmux = Tmux(f"ckptd-test-{os.getpid()}", 120, 40, env_for(home))
    try:
        read_until(run, "ready")
        tmux.send(f"{sys.executable} -m ckptd watch; echo rc=$?", "Enter")
        # panes, key names, the chart, the checkpoint at step 20, the run's event
        words = ("runs", "system", "checkpoints", "console / events", "live", "running",
                 "loss", "step 20", "warmup done", "q quit", "? help")
        tmux.wait(lambda s: all(w in s for w in words) and braille(s) > 20,
                  what=f"all of {words} and a braille chart")
        # a key the live run logs now shows up (runs pane and chart title)
        command(home, "fresh_metric 60 0.5")
        read_until(run, "logged")
        t0 = time.monotonic()
        tmux.wait(lambda s: "fresh_metric" in s, timeout=10, what="fresh_metric")
        took = time.monotonic() - t0
        assert took < 2.0, f"new metric took {took:.2f}s to appear"
        print(f"new metric on screen after {took:.2f}s")
        # a resize redraws, and 80x24 still has a chart
        tmux.resize(80, 24)
        tmux.wait(lambda s: max(len(line) for line in s.splitlines()) <= 80
                  and braille(s) > 20 and "loss" in s, what="the 80x24 layout with a chart")
        tmux.send("?")
        tmux.wait(lambda s: "this help" in s, what="help")
        tmux.send("x")
        tmux.send("q")
        tmux.wait(lambda s: "rc=0" in s, what="exit status 0")
        # the terminal is back in cooked mode with echo (lines "=icanon", "=echo")
        tmux.send("stty -a | tr ' ' '\\n' | grep -x -e icanon -e echo -e -icanon -e -echo"
                  " | sed 's/^/=/'", "Enter")
        sane = tmux.wait(lambda s: "=icanon" in s or "=-icanon" in s, what="stty output")
        got = {line for line in sane.splitlines() if line.startswith("=")}
        assert got == {"=icanon", "=echo"}, got
        command(home, "stop")
        run.wait(timeout=60)
    finally:
        tmux.close()
        if run.poll() is None:
            run.kill()
            run.wait()


def test_watch_without_terminal_says_so_in_one_line(home: Path, daemon: object) -> None:
    proc = ckptd(home, "watch")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "terminal" in lines[0] and "tail" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_refuses_in_a_pipe_even_with_a_terminal_stdin(home: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ckptd", "watch"], capture_output=True,
                          text=True, env=env_for(home), timeout=60)
    assert proc.returncode != 0 and "terminal" in proc.stderr
