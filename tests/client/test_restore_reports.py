"""``restore()`` always says why it passed over a checkpoint: also one that
``ckptd ckpt verify`` had already marked corrupt (it fell back silently)."""

from __future__ import annotations

from pathlib import Path

from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, two_checkpoints_newest_flipped

RESTORE = """
import warnings, torch, ckptd_client as ckptd
run = ckptd.init()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    st = run.restore()
print("restored", st["step"])
print("warned", [str(w.message) for w in caught])
run.finish()
"""


def test_restore_names_a_checkpoint_verify_marked_corrupt(home: Path,
                                                         daemon: DaemonProc) -> None:
    run_id = two_checkpoints_newest_flipped(home, "marked", 100)
    assert ckptd(home, "ckpt", "verify", run_id).returncode != 0  # marks step 20 corrupt
    proc = run_script(home, RESTORE, env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"))
    assert "restored 10" in proc.stdout
    assert "skipped checkpoint step 20: marked corrupt earlier" in proc.stdout, proc.stdout
    assert "blake3" in proc.stdout  # the reason verify recorded
    events = db_rows(home, "SELECT message FROM events WHERE run_id = ? AND attempt = 2"
                     " AND level = 'warning'", (run_id,))
    assert any("skipped checkpoint step 20" in m for (m,) in events)
