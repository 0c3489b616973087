"""System metrics on a member node carry the global rank of the process they describe.

Two emulated nodes (two homes, two daemons sampling every 0.2 s), one rank
each: the member node's run row is its local rank 0, global rank 1. Its
daemon's ``sys/*`` samples (``src`` ``d``) must be filed under rank 1, never
under rank 0 (which would mix another machine's numbers into rank 0's curve).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonProc, db_rows, env_for, wait_for
from test_multinode import owner_and_member, two_nodes

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SCRIPT = """
import os, time, ckptd_client as ckptd
import torch.distributed as dist
dist.init_process_group("gloo")
run = ckptd.init(name="member-sys")
for s in range(3):
    run.log({"x": s}, step=s)
run.flush()
deadline = time.monotonic() + 120
while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
    time.sleep(0.05)
run.finish()
dist.destroy_process_group()
"""


@pytest.fixture
def sampling_nodes(tmp_path: Path) -> Iterator[list[Path]]:
    homes = [tmp_path / f"node{i}" / "home" for i in range(2)]
    daemons = []
    try:
        for h in homes:
            h.mkdir(parents=True, mode=0o700)
            d = DaemonProc(h, env=env_for(h, CKPTD_SYS_INTERVAL="0.2"))
            d.start()
            daemons.append(d)
        yield homes
    finally:
        for d in daemons:
            d.stop()


def test_member_node_sys_metrics_carry_the_global_rank(sampling_nodes: list[Path],
                                                        tmp_path: Path) -> None:
    script = tmp_path / "member_sys.py"
    script.write_text(SCRIPT)
    go = tmp_path / "go"
    done: list = []
    job = threading.Thread(target=lambda: done.extend(two_nodes(
        sampling_nodes, None, "membersys", os.fspath(script), env_extra={"GO": os.fspath(go)},
        timeout=150)))
    job.start()
    try:
        sys_ranks = "SELECT DISTINCT rank FROM metrics WHERE src = 'd' ORDER BY rank"
        rounds = "SELECT COUNT(DISTINCT seq) FROM metrics WHERE src = 'd'"
        # both daemons sampled their node's rank at least three times (sweeps 2 s apart)
        for h in sampling_nodes:
            wait_for(lambda h=h: db_rows(h, "SELECT 1 FROM runs WHERE node_rank IS NOT NULL")
                     and db_rows(h, rounds)[0][0] >= 3, timeout=120,
                     what=f"sys samples in {h}")
    finally:
        go.touch()
        job.join(timeout=170)
    assert len(done) == 2 and all(p.returncode == 0 for p in done), \
        [p.stdout + p.stderr[-2000:] for p in done]
    owner, member, run_id = owner_and_member(sampling_nodes, "member-sys")
    assert db_rows(owner, sys_ranks) == [(0,)]
    # the member's only process is global rank 1: no sample of it says rank 0
    assert db_rows(member, sys_ranks) == [(1,)], db_rows(
        member, "SELECT rank, seq, key FROM metrics WHERE src = 'd' ORDER BY seq LIMIT 20")
