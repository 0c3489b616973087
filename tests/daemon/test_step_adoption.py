"""At start the daemon records a ``step-<N>/`` that has no row only when it
is the checkpoint it was itself publishing when it stopped (its commit record
names that manifest) and its manifest names this run and step.

Found: a self-consistent step directory planted under a run (or copied from
another run or step) was adopted as committed at the next daemon start:
`ckpt ls` listed it and restore() picked it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ckptd_client import paths
from ckptd_client.checkpoint import format as fmt
from helpers import RESTORE_SCRIPT, DaemonProc, ckptd, db_rows, env_for, run_script, wait_for

TRAIN = """
import ckptd_client as ckptd, torch
for name, steps in (("a", (1, 2)), ("b", (1,))):
    run = ckptd.init(name=name)
    for step in steps:
        w = torch.full((64,), float(step) + (100 if name == "b" else 0))
        run.checkpoint({"w": w, "step": step}, step=step).wait(timeout=60)
    print(name, run.id, flush=True)
    run.finish()
"""


def _plant_renamed(src: Path, dst: Path, run: str, step: int) -> None:
    """A copy of ``src`` whose manifest claims ``run``/``step``: it verifies on its own."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / fmt.MANIFEST_FILE).read_bytes())
    manifest.update(run=run, step=step)
    manifest["tree"]["D"][0][1]["D"][1][1] = step  # state["step"]
    (dst / fmt.MANIFEST_FILE).write_bytes(json.dumps(manifest).encode())
    fmt.verify_dir(dst)  # self-consistent: hashes and layout check out


def test_planted_step_dirs_are_not_adopted(home: Path, daemon: DaemonProc) -> None:
    out = run_script(home, TRAIN, timeout=180).stdout
    ids = dict(line.split() for line in out.splitlines())
    a, b = paths.checkpoints_dir(home, ids["a"]), paths.checkpoints_dir(home, ids["b"])
    daemon.stop()
    shutil.copytree(a / "step-2", a / "step-5")             # another step of this run
    shutil.copytree(b / "step-1", a / "step-7")             # another run
    _plant_renamed(a / "step-2", a / "step-9", ids["a"], 9)  # names this run and step
    daemon.start()
    log = home / "daemon.log"
    wait_for(lambda: "checkpoint reconcile:" in log.read_text(), timeout=60,
             what="reconcile judged the planted directories")
    assert db_rows(home, "SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step",
                   (ids["a"],)) == [(1,), (2,)]
    assert log.read_text().count("not adopting") == 3
    listed = json.loads(ckptd(home, "ckpt", "ls", ids["a"], "--json", check=True).stdout)
    assert sorted(c["step"] for c in listed) == [1, 2]
    res = run_script(home, RESTORE_SCRIPT, env=env_for(home, CKPTD_RUN_ID=ids["a"],
                                                       CKPTD_ATTEMPT="2"))
    assert "restored 2 whole" in res.stdout, res.stdout + res.stderr
