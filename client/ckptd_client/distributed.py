"""Many processes, one run: ranks under ``torchrun``, and preemption notices.

Which run a rank joins (no rank waits on another to learn it, no race):

1. ``CKPTD_RUN_ID`` (``ckptd run`` / ``ckptd resume``) names it for every rank.
2. Under TorchElastic, every rank proposes a fresh id to the agent's TCPStore
   (``MASTER_ADDR:MASTER_PORT``, which outlives worker restarts) with
   ``compare_set`` under a key holding ``TORCHELASTIC_RUN_ID``: the first
   proposal wins and every rank reads the same winner.
3. No store reachable: the id is derived from ``TORCHELASTIC_RUN_ID``
   (``te-<id>``), the same in every rank by construction.

The attempt is the base attempt (``CKPTD_ATTEMPT``, else 1) plus
``TORCHELASTIC_RESTART_COUNT``: a TorchElastic restart is a new attempt of the
same run, so what the dead workers logged after the restored step is
superseded exactly as after ``ckptd resume``.

Writer identity: rank 0 writes as ``c`` (what a single process is), rank r
as ``r<r>``. Event keys are ``(run, attempt, src, seq)``, so ranks never
collide, and the daemon stores the rank (a column) from the identity.

Only rank 0 registers the run and reports its status; the other ranks' ends
are recorded as events (a rank's status would otherwise overwrite the run's).

Several nodes, one daemon (one home, one store) per node. Every rank talks
to its own node's daemon only (a Unix socket: ckptd has no network
transport). Rank 0's node owns the run: its store holds the run row (world
size, node count, command), the attempts, the committed checkpoint rows,
and the metrics/events/console of the ranks on that node. Each other node's
store holds a member row of the same run id (registered by that node's
local rank 0, with ``node_rank`` > 0: a pointer to node 0's store, no
relaunch command, no checkpoint rows) and its own ranks' metrics, events,
console and system metrics. Checkpoints live in a directory all nodes share
(``init(checkpoint_dir=)`` / ``CKPTD_CHECKPOINT_DIR``, see ``dcp.py``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CkptdError

if TYPE_CHECKING:
    from .run import Run

#: Seconds a rank waits for the agent store when agreeing on the run id.
STORE_TIMEOUT_S = 30.0
#: Signals that mean "you are about to be killed, save and exit" (SLURM
#: ``--signal=USR1@120``; Kubernetes and most schedulers: SIGTERM + grace).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
_SRC_RE = re.compile(r"^r([1-9][0-9]{0,6})(?:-[0-9a-f]{1,32})?$")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    restart_count: int
    elastic_id: str | None
    node_rank: int = 0  # torchrun's GROUP_RANK: which node (agent); rank 0 is on node 0
    nodes: int = 1  # GROUP_WORLD_SIZE: how many nodes (agents) the job has
    local_world_size: int = 1  # LOCAL_WORLD_SIZE: ranks on this node

    @property
    def speaks_for_node(self) -> bool:
        """Registers and ends this run's row in its node's store: rank 0 on
        the owning node, local rank 0 on every other node (a member row)."""
        return self.rank == 0 or (self.local_rank == 0 and self.node_rank > 0)


def env_ranks() -> Ranks | None:
    """The rank facts torchrun puts in the environment, or None outside it."""
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if not 0 <= rank < world:
        return None
    try:
        local = int(os.environ.get("LOCAL_RANK", rank))
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        local, restarts = rank, 0
    try:
        node = int(os.environ.get("GROUP_RANK", "0"))
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        node, nodes, local_world = 0, 1, world
    if not 0 <= node < nodes:
        node, nodes = 0, 1
    elastic = os.environ.get("TORCHELASTIC_RUN_ID") or None
    return Ranks(rank, world, local, max(0, restarts), elastic, node, nodes,
                 max(1, local_world))


def src_kind(rank: int) -> str:
    """The kind of writer identity of a rank's client: ``c`` for rank 0 (what
    ``metrics``/``tail`` show by default), ``r<N>`` for the others. Each process
    adds its own random suffix (``run.new_src``), so forks and restarts of one
    rank never share a dedup key."""
    return "c" if rank == 0 else f"r{rank}"


def rank_of_src(src: str) -> int:
    """The rank a writer identity stands for (0 for the client, supervisor, daemon)."""
    m = _SRC_RE.match(src)
    return int(m.group(1)) if m else 0


def is_client_src(src: Any) -> bool:
    return isinstance(src, str) and bool(_CLIENT_RE.match(src))


_CLIENT_RE = re.compile(r"^(?:c|r[1-9][0-9]{0,6})(?:-[0-9a-f]{1,32})?$")


#: What ``ckptd run`` asks torchrun to put before each line of a rank's output
#: (``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``; torchrun adds it to teed output,
#: ``torchrun --tee 3``): the global rank, so lines from several nodes agree.
LINE_PREFIX_ENV = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"
LINE_PREFIX = "[rank${rank}]:"
_LINE_RANK_RE = re.compile(r"^\[rank([0-9]{1,7})\]:")


def line_rank(line: str) -> tuple[int | None, str]:
    """The rank a captured console line came from (torchrun's prefix, see
    :data:`LINE_PREFIX`) and the line without it; ``(None, line)`` when unprefixed."""
    m = _LINE_RANK_RE.match(line)
    if m is None:
        return None, line
    return int(m.group(1)), line[m.end():]


def _derived_id(elastic_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", elastic_id).strip("-.")[:100] or "none"
    return f"te-{cleaned}".replace("..", "-")


def agree_run_id(ranks: Ranks, propose: str) -> str:
    """The run id every rank of this torchrun job agrees on (see the module doc)."""
    elastic = ranks.elastic_id or "none"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        try:
            from datetime import timedelta

            import torch.distributed as dist

            store = dist.TCPStore(addr, int(port), is_master=False,
                                  timeout=timedelta(seconds=STORE_TIMEOUT_S))
            got = store.compare_set(f"ckptd/run_id/{elastic}", "", propose)
            winner = got.decode() if isinstance(got, bytes) else str(got)
            from .identity import valid_run_id

            if valid_run_id(winner):
                return winner
        except Exception as exc:  # noqa: BLE001 - fall back to the derived id below
            sys.stderr.write(f"ckptd: cannot agree on a run id through the torchrun store "
                             f"({exc}); deriving it from TORCHELASTIC_RUN_ID\n")
    if elastic == "none":
        raise CkptdError("ckptd: under torchrun without a reachable agent store and without "
                         "--rdzv-id, ranks cannot agree on a run; pass --rdzv-id or start "
                         "the job with `ckptd run -- torchrun ...`")
    return _derived_id(elastic)


def elastic_store() -> Any:
    """A store for ``init_process_group(store=...)`` that survives TorchElastic restarts.

    torchrun (2.x, ``--standalone`` and c10d rendezvous) hands restarted
    workers the same agent store, still holding the killed attempt's peer
    addresses: a rank that starts later than its peer reads a stale address
    and gloo's connect times out (reproduced without ckptd). Keying the
    process group's entries by ``TORCHELASTIC_RESTART_COUNT`` avoids it.
    None outside torchrun (then use ``init_process_group``'s defaults).
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return None
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"ckptd-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}",
                            store)


def settle_ddp_buckets(model: Any, *inputs: Any) -> None:
    """Let a freshly wrapped DDP model rebuild its gradient buckets now, before
    the first training step; call it right after ``DDP(...)`` in every run,
    fresh or resumed, with inputs of the shapes one step feeds (zeros will do).

    Why: DDP allreduces gradients bucket by bucket. It starts with buckets in
    parameter order and, after its first backward, rebuilds them once in the
    order the gradients became ready. The ring allreduce (gloo, and NCCL's ring)
    adds the ranks' values of an element in an order that depends on where the
    element sits in its bucket, so with 3 or more ranks the two layouts give
    gradients that differ in the last bit (2 ranks: a + b == b + a). An
    uninterrupted run uses the first layout at step 0 only; a resumed run, whose
    DDP is new, would use it again at its first step after the restored one and
    end ~1e-8 off. One forward and backward here, the same in both runs, makes
    every training step use the rebuilt layout, so the resume is bit-identical.

    It leaves no trace: no optimizer step, the gradients are None again, and the
    RNG (CPU, and the model's CUDA devices) and the module's buffers (BatchNorm
    statistics) are as they were. Collective: every rank calls it. A model
    whose forward needs more than positional inputs: run one forward and
    backward yourself, then set every ``p.grad`` to None.
    """
    import torch

    cuda = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def tensors(out: Any) -> list[Any]:
        if isinstance(out, torch.Tensor):
            return [out] if out.requires_grad else []
        if isinstance(out, dict):
            out = list(out.values())
        if isinstance(out, (list, tuple)):
            return [t for o in out for t in tensors(o)]
        return []

    with torch.random.fork_rng(devices=cuda):  # dropout in this pass draws nothing
        outs = tensors(model(*inputs))
        if not outs:
            raise CkptdError("ckptd: settle_ddp_buckets: the model's output holds no tensor "
                             "that requires grad")
        sum(o.float().sum() for o in outs).backward()
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    for p in model.parameters():
        p.grad = None


# -------------------------------------------------------------- preemption

_installed: dict[int, Any] = {}
_runs: list[Run] = []
_lock = threading.Lock()


def install_preemption(run: Run) -> list[str]:
    """Make SIGTERM/SIGUSR1 set ``run.should_stop`` instead of killing
    (under torchrun SIGUSR1 only: see below).

    Installed only from the main thread (Python runs handlers there and
    refuses ``signal.signal`` elsewhere) and only for a signal whose handler
    is still the default: a handler the user set is theirs, and left alone.
    The handler only sets a flag; the training loop checkpoints and exits.
    It is installed when the program first reads ``run.should_stop``: a
    script that never looks at the flag keeps the default actions (it dies
    of the signal at once, even inside a long C call, as without ckptd).
    Returns the names of the signals taken.
    """
    if os.environ.get("CKPTD_NO_PREEMPT_HANDLER"):
        return []
    if threading.current_thread() is not threading.main_thread():
        return []
    taken = []
    names = PREEMPT_SIGNALS
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun stops its workers with SIGTERM (a peer died, restart): there
        # SIGTERM must kill, so only SIGUSR1 is a notice (SLURM --signal=USR1@T)
        names = ("SIGUSR1",)
    with _lock:
        _runs.append(run)
        for name in names:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            if signum in _installed:
                taken.append(name)
                continue
            try:
                current = signal.getsignal(signum)
            except (ValueError, OSError):
                continue
            if current is not signal.SIG_DFL:
                continue  # the user's (or torchelastic's) handler: not ours to replace
            try:
                signal.signal(signum, _on_notice)
            except (ValueError, OSError):
                continue
            _installed[signum] = current
            taken.append(name)
    return taken


def _on_notice(signum: int, frame: Any) -> None:
    """Signal context: set flags, nothing else (no I/O, no locks)."""
    for run in _runs:
        run._stop_flag = True
        run._stop_signal = signum


__all__ = ["Ranks", "env_ranks", "line_rank", "LINE_PREFIX", "LINE_PREFIX_ENV",
           "elastic_store", "src_kind", "rank_of_src", "agree_run_id",
           "install_preemption", "PREEMPT_SIGNALS"]
