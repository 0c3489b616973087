"""Several nodes, emulated on this machine: two homes (two daemons, one per
"node"), two ``torchrun --nnodes 2 --rdzv-backend c10d`` agents meeting at
one rendezvous endpoint, gloo on CPU, and a checkpoint directory both share.

Which agent becomes node 0 (rank 0's node, the owner of the run) is decided
by the c10d rendezvous (``--node-rank`` is ignored there), so the tests find
the owner by its store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(homes: list[Path], shared: Path | None, rdzv: str, *args: str,
              nproc: int = 1, env_extra: dict[str, str] | None = None,
              timeout: float = 180) -> list[subprocess.CompletedProcess[str]]:
    """Run examples/train_ddp.py as a job of two torchrun agents (one per home)."""
    port = free_port()
    procs, logs = [], []
    for node, home in enumerate(homes):
        env = env_for(home, OMP_NUM_THREADS="1", **(env_extra or {}))
        if shared is not None:
            env["CKPTD_CHECKPOINT_DIR"] = os.fspath(shared)
        # files, not pipes: an agent blocked on a full pipe would stall the job
        out, err = (open(home.parent / f"{rdzv}.{s}", "w+") for s in ("out", "err"))
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
             str(node), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv, *args],
            stdout=out, stderr=err, text=True, env=env, cwd=home.parent,
            stdin=subprocess.DEVNULL))
    done = []
    try:
        for p, (out, err) in zip(procs, logs, strict=True):
            p.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(),
                                                    err.read()))
    finally:
        for p, (out, err) in zip(procs, logs, strict=True):
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
            err.close()
    return done


def owner_and_member(homes: list[Path], run_name: str = "train-ddp") -> tuple[Path, Path, str]:
    """(rank 0's home, the other home, run id) of the newest run of that name."""
    ids = {}
    for h in homes:
        rows = db_rows(h, "SELECT id, node_rank FROM runs WHERE name = ? ORDER BY started"
                          " DESC LIMIT 1", (run_name,))
        ids[h] = rows[0] if rows else (None, None)
    owner = [h for h in homes if ids[h][1] == 0]
    member = [h for h in homes if ids[h][1] == 1]
    assert len(owner) == 1 and len(member) == 1, ids
    assert ids[owner[0]][0] == ids[member[0]][0], ids  # one run id on both nodes
    return owner[0], member[0], ids[owner[0]][0]


@pytest.fixture
def nodes(tmp_path: Path) -> list[Path]:
    homes = [tmp_path / f"node{i}" / "home" for i in range(2)]
    daemons = []
    try:
        for h in homes:
            h.mkdir(parents=True, mode=0o700)
            d = DaemonProc(h)
            d.start()
            daemons.append(d)
        yield homes
    finally:
        for d in daemons:
            d.stop()


def test_two_nodes_share_a_checkpoint_dir_and_resume_bit_identically(
        nodes: list[Path], tmp_path: Path) -> None:
    shared = tmp_path / "shared-fs" / "ckpt"
    args = [os.fspath(EXAMPLE), "--steps", "20", "--ckpt-every", "5"]
    clean = tmp_path / "clean.pt"
    for p in two_nodes(nodes, shared, "clean", *args, "--out", os.fspath(clean)):
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    # rank 1 (on the node that does not own the run) is SIGKILLed inside the
    # checkpoint of step 14, after its shard is durable; the job dies (no
    # --max-restarts)
    broken = tmp_path / "broken.pt"
    procs = two_nodes(nodes, shared, "broken", *args, "--out", os.fspath(broken),
                      env_extra={"CKPTD_TEST_KILL_DCP": "1:14"})
    # the job failed (node 1's agent lost its worker); rank 0, on the other node,
    # may have run its loop to the end while its background checkpoint's
    # collective failed: its attempt is then failed, not finished
    assert any(p.returncode != 0 for p in procs), [p.stdout for p in procs]
    owner, member, run_id = owner_and_member(nodes)
    assert db_rows(owner, "SELECT status FROM attempts WHERE run_id = ?", (run_id,)) in (
        [("failed",)], [("interrupted",)]), db_rows(owner, "SELECT * FROM attempts")
    assert not (shared / run_id / "step-14").exists()  # no torn step became visible
    committed = "SELECT step, attempt FROM checkpoints WHERE run_id = ? ORDER BY step"
    assert db_rows(owner, committed, (run_id,)) == [(4, 1), (9, 1)]
    assert db_rows(member, committed, (run_id,)) == []
    # node 0's store sees the whole job
    [row] = [r for r in json.loads(ckptd(owner, "ls", "--json", check=True).stdout)
             if r["id"] == run_id]
    assert (row["world_size"], row["nodes"], row["node_rank"]) == (2, 2, 0), row
    show = ckptd(owner, "show", run_id, check=True).stdout
    assert "world size:   2" in show and "nodes:        2: this store is node 0's" in show, show
    tail = ckptd(owner, "tail", run_id, "-n", "200", check=True).stdout
    assert "node 0 of 2" in tail and "this store owns the run" in tail, tail
    # the member node's store: a pointer row, its rank's metrics, no checkpoints
    show = ckptd(member, "show", run_id, check=True).stdout
    assert "this store is node 1's" in show and "node 0's store" in show, show
    assert not (member / "runs" / run_id / "checkpoints").exists()
    logged = "SELECT DISTINCT rank FROM metrics WHERE run_id = ? AND src != 'd'"  # not sys/*
    assert db_rows(member, logged, (run_id,)) == [(1,)]
    assert db_rows(owner, logged, (run_id,)) == [(0,)]

    # The whole job is started again on both nodes, as a scheduler's requeue
    # does, naming the run (CKPTD_RUN_ID). The member's agent starts first: c10d
    # orders nodes by (host, agent pid), so rank 0 is now on the other node,
    # whose store has no checkpoint rows: restore takes them from every node's
    # store and resumes from step 9, the newest committed one
    procs = two_nodes(list(reversed(nodes)), shared, "again", *args, "--out",
                      os.fspath(broken), env_extra={"CKPTD_RUN_ID": run_id,
                                                    "CKPTD_ATTEMPT": "2"})
    for p in procs:
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert any("resumed after step 9" in p.stdout for p in procs), [p.stdout for p in procs]
    a, b = torch.load(clean, weights_only=True), torch.load(broken, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    new_owner, new_member, same = owner_and_member(nodes)
    assert same == run_id and new_owner == member, "the nodes did not swap roles"
    [row] = [r for r in json.loads(ckptd(new_owner, "ls", "--json", check=True).stdout)
             if r["id"] == run_id]
    assert (row["world_size"], row["nodes"], row["status"], row["attempt"]) == \
        (2, 2, "finished", 2), row
    assert db_rows(new_owner, "SELECT restored_step FROM attempts WHERE run_id = ? AND"
                              " attempt = 2", (run_id,)) == [(9,)]
    # this attempt's steps are committed by the new owner's daemon
    assert db_rows(new_owner, committed, (run_id,)) == [(14, 2), (19, 2)]
    verify = ckptd(new_owner, "ckpt", "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    rows = [json.loads(r) for r in ckptd(new_owner, "metrics", run_id, "--format", "jsonl",
                                         check=True).stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 20))  # rank 0 of attempt 2
    # the checkpoints are in the shared directory; both homes link there
    for h in nodes:
        link = h / "runs" / run_id / "checkpoints"
        assert link.is_symlink() and Path(os.readlink(link)) == shared / run_id
    names = {p.name for p in (shared / run_id / "step-19").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json"} <= names, names
    manifest = json.loads((shared / run_id / "step-19" / "manifest.json").read_text())
    assert sorted(r[:2] for r in manifest["dcp"]["ranks"]) == [[0, 0], [1, 1]], manifest


def test_two_nodes_without_a_shared_dir_fail_the_checkpoint_clearly(nodes: list[Path],
                                                                    tmp_path: Path) -> None:
    procs = two_nodes(nodes, None, "unshared", os.fspath(EXAMPLE), "--steps", "5",
                      "--ckpt-every", "5")
    # training ran to its end (a failed checkpoint never kills it); the example then
    # exits 1 because its last checkpoint could not be made durable
    assert all(p.returncode != 0 for p in procs)
    text = "".join(p.stderr for p in procs)
    assert "the checkpoint directory must be shared by every node" in text, text[-3000:]
    owner, _, run_id = owner_and_member(nodes)
    assert db_rows(owner, "SELECT COUNT(*) FROM checkpoints") == [(0,)]


@pytest.mark.slow
def test_four_ranks_on_two_nodes_elastic_restart_is_bit_identical(nodes: list[Path],
                                                                   tmp_path: Path) -> None:
    """2 ranks per node; rank 3 is SIGKILLed inside the checkpoint of step 14 and
    TorchElastic restarts the workers of both nodes in place (--max-restarts:
    the healthy node's restart count lags a round, see README)."""
    shared = tmp_path / "shared"
    args = [os.fspath(EXAMPLE), "--steps", "20", "--ckpt-every", "5"]
    clean, broken = tmp_path / "clean.pt", tmp_path / "broken.pt"
    for p in two_nodes(nodes, shared, "clean", *args, "--out", os.fspath(clean), nproc=2):
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    procs = two_nodes(nodes, shared, "elastic", "--max-restarts", "4", *args, "--out",
                      os.fspath(broken), nproc=2, env_extra={"CKPTD_TEST_KILL_DCP": "3:14"},
                      timeout=400)
    for p in procs:
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert any("resumed after step 9" in p.stdout for p in procs), [p.stdout for p in procs]
    a, b = torch.load(clean, weights_only=True), torch.load(broken, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    owner, _, run_id = owner_and_member(nodes)
    [row] = [r for r in json.loads(ckptd(owner, "ls", "--json", check=True).stdout)
             if r["id"] == run_id]
    assert (row["world_size"], row["nodes"], row["status"]) == (4, 2, "finished"), row
    rows = [json.loads(r) for r in ckptd(owner, "metrics", run_id, "--format", "jsonl",
                                         check=True).stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(20))  # no duplicate, none missing
