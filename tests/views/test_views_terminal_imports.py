"""The terminal views draw their first chart without importing numpy.

plotille imports numpy inside every ``Figure()`` (for numpy datetimes, which
the views never pass); on a loaded 2-core box that was 0.2-0.4 s of ``watch``'s
first frame, whose target is 1 s. Seen here in the real commands (``watch``
in a real tmux, ``plot`` to the terminal) run by a wrapper that writes the
modules loaded at exit (Textual draws on stderr, so no import log there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import env_for, run_script
from views_helpers import Tmux, braille, need

RUN = """
import ckptd_client as ckptd
run = ckptd.init(name="imports")
for s in range(200):
    run.log({"loss": 1.0 / (1 + s)}, step=s)
run.finish(timeout=30)
print(run.id)
"""

#: ``python WRAPPER LOG ARGS...``: ``ckptd ARGS...``, then the loaded modules in LOG.
WRAPPER = """
import atexit, runpy, sys
log = sys.argv[1]
atexit.register(lambda: open(log, "w").write("\\n".join(sorted(sys.modules))))
sys.argv = ["ckptd", *sys.argv[2:]]
runpy.run_module("ckptd", run_name="__main__")
"""


def loaded(log: Path) -> set[str]:
    return set(log.read_text().split())


def test_watch_first_chart_and_terminal_plot_without_numpy(home: Path, daemon: object,
                                                          tmp_path: Path) -> None:
    need("tmux")
    rid = run_script(home, RUN).stdout.split()[-1]
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    log = tmp_path / "watch.txt"
    tmux = Tmux(f"ckptd-imp-{os.getpid()}", 120, 40, env_for(home))
    try:
        tmux.send(f"{sys.executable} {wrapper} {log} watch; echo rc=$?", "Enter")
        tmux.wait(lambda s: "loss" in s and braille(s) > 20, what="the chart")
        tmux.send("q")
        tmux.wait(lambda s: "rc=0" in s, what="exit status 0")
    finally:
        tmux.close()
    mods = loaded(log)
    assert {"textual.app", "plotille"} <= mods  # the chart was drawn by this process
    assert not {m for m in mods if m.split(".")[0] == "numpy"}

    log = tmp_path / "plot.txt"
    proc = subprocess.run([sys.executable, os.fspath(wrapper), os.fspath(log), "plot", rid,
                           "--key", "loss"], capture_output=True, text=True, timeout=120,
                          env=env_for(home), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and braille(proc.stdout) > 20, proc.stderr[-2000:]
    mods = loaded(log)
    assert "plotille" in mods
    assert not {m for m in mods if m.split(".")[0] == "numpy"}
