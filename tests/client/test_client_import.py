"""The client is imported by every training script: it must load only the standard library.

Checked in a fresh interpreter, both right after ``import ckptd_client`` and
after a whole run (init, log, event, logging handler, flush, finish), so a lazy
import on the hot path is caught too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "numpy", "sqlite_utils", "typer", "psutil", "watchdog", "click", "ckptd")

PROBE = """
import json, sys
heavy = {heavy!r}

def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in heavy)

import ckptd_client
after_import = loaded()
run = ckptd_client.init(name="probe", autostart=False)
run.log({{"loss": 0.5}}, step=0)
run.event("hi")
import logging
logging.getLogger("probe").addHandler(run.logging_handler())
logging.getLogger("probe").warning("careful")
run.flush()
run.finish()
print(json.dumps({{"after_import": after_import, "after_run": loaded()}}))
"""


def test_client_import_and_run_load_only_the_stdlib(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env.update(CKPTD_HOME=os.fspath(tmp_path / "home"), CKPTD_NO_AUTOSTART="1")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY)],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["after_import"] == [], result
    assert result["after_run"] == [], result
