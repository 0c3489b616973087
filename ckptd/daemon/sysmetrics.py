"""System metrics of live runs, sampled by the daemon: ``sys/...`` metrics.

Every ``CKPTD_SYS_INTERVAL`` seconds (default 10; the sweeper's period
bounds how often) the daemon samples each running run's process tree with
psutil: CPU % (summed over the tree, so 400 means four busy cores), resident
memory, threads, bytes read and written; the free space of the home's disk
(a full disk is what kills checkpoints); and, when ``nvidia-ml-py`` is
installed, utilization and memory of the GPUs the tree uses.

They are stored as metrics of the run's current attempt with ``src`` ``d``
at the run's current step, apart from what the training script logs:
``ckptd metrics RUN --key sys/rss_bytes`` shows them.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import psutil
from ckptd_client import protocol

from ckptd.daemon.liveness import process_alive

if TYPE_CHECKING:
    from ckptd.daemon.server import Daemon
    from ckptd.store.writer import Store

log = logging.getLogger("ckptd.sysmetrics")

INTERVAL_ENV = "CKPTD_SYS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0

#: psutil keeps the previous CPU times inside each Process object: keep them
#: between samples so ``cpu_percent`` measures the interval, not since start.
_procs: dict[int, psutil.Process] = {}
_last: dict[str, float] = {}
_nvml: Any = None


def interval() -> float:
    try:
        return float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _cached(pid: int) -> psutil.Process:
    proc = _procs.get(pid)
    if proc is None:
        proc = _procs[pid] = psutil.Process(pid)
    return proc


def tree_sample(pid: int) -> tuple[dict[str, float], set[int]]:
    """CPU %, RSS, threads and I/O bytes summed over ``pid`` and its
    descendants; and the pids of that tree."""
    root = _cached(pid)
    procs = [root]
    try:
        procs += [_cached(c.pid) for c in root.children(recursive=True)]
    except psutil.Error:
        pass
    out = {"sys/cpu_percent": 0.0, "sys/rss_bytes": 0, "sys/threads": 0,
           "sys/read_bytes": 0, "sys/write_bytes": 0, "sys/processes": 0}
    for p in procs:
        try:
            with p.oneshot():
                out["sys/cpu_percent"] += p.cpu_percent(None)
                out["sys/rss_bytes"] += p.memory_info().rss
                out["sys/threads"] += p.num_threads()
                try:
                    io = p.io_counters()
                    out["sys/read_bytes"] += io.read_bytes
                    out["sys/write_bytes"] += io.write_bytes
                except (psutil.AccessDenied, AttributeError):
                    pass
            out["sys/processes"] += 1
        except psutil.Error:
            _procs.pop(p.pid, None)
    return out, {p.pid for p in procs}


def gpu_sample(pids: set[int]) -> dict[str, float]:
    """Utilization and memory of every GPU one of ``pids`` uses (nvidia-ml-py)."""
    global _nvml
    if _nvml is False:
        return {}
    try:
        if _nvml is None:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        nv = _nvml
        out: dict[str, float] = {}
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            used = [p for p in nv.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid in pids]
            if not used:
                continue
            util = nv.nvmlDeviceGetUtilizationRates(handle)
            out[f"sys/gpu{i}/util_percent"] = float(util.gpu)
            out[f"sys/gpu{i}/mem_bytes"] = float(sum(p.usedGpuMemory or 0 for p in used))
        return out
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU metrics
        _nvml = False
        return {}


def _rank_procs(run: dict[str, Any],
                here: list[tuple[int, int, float | None]]) -> list[tuple[int, int]]:
    """(global rank, pid) of every live process of ``run`` on this node, each once.

    The run row's process is rank 0 on the node that owns the run; on a
    member node (``node_rank`` > 0) it is that node's local rank 0, whose
    global rank only its connection knows (``rank_processes``, written by
    :func:`liveness.track_ranks`). Until that row exists the process is not
    sampled: a sample filed under rank 0 would mix into rank 0's curve.
    """
    procs = {p: rank for rank, p, started in sorted(here) if process_alive(p, started)}
    pid = run["pid"]
    if pid not in procs and not run.get("node_rank") and 0 not in procs.values():
        procs[pid] = 0  # one process, or rank 0 not seen yet: the run's tree is rank 0's
    return sorted(((rank, p) for p, rank in procs.items()), key=lambda rp: rp[0])


def sample(daemon: Daemon, now: float | None = None) -> int:
    """Record one sample for every running run that is due; return how many."""
    if daemon.stop.is_set():
        return 0  # shutting down: the writer may be gone
    now = time.time() if now is None else now
    every = interval()

    def running(store: Store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return store.running_runs(), store.rank_processes(open_only=True)

    events: list[tuple[str, int, str, dict[str, Any]]] = []
    live: set[int] = set()
    runs, ranks = daemon.call_writer(running)
    here: dict[tuple[str, int], list[tuple[int, int, float | None]]] = {}
    for r in ranks:  # ranks of distributed runs whose process lives on this node
        if r["pid"]:
            here.setdefault((r["run_id"], r["attempt"]), []).append(
                (r["rank"], r["pid"], r["pid_started"]))
    for run in runs:
        pid = run.get("pid")
        if not pid or not process_alive(pid, run.get("pid_started")):
            continue
        live.add(pid)
        if now - _last.get(run["id"], 0.0) < every:
            continue
        _last[run["id"]] = now
        seq = time.time_ns() // 1000
        procs = _rank_procs(run, here.get((run["id"], run["attempt"]), []))
        for i, (rank, p) in enumerate(procs):
            live.add(p)
            try:
                values, pids = tree_sample(p)
            except psutil.Error:
                continue
            values.update(gpu_sample(pids))  # per GPU this rank's processes use
            if i == 0:  # once per node: its lowest rank
                try:
                    values["sys/disk_free_bytes"] = psutil.disk_usage(
                        os.fspath(daemon.home)).free
                except OSError:
                    pass
            msg = {"t": protocol.LOG, "seq": seq + rank, "time": now,
                   "step": run.get("step") or 0, "m": values, "rank": rank}
            events.append((run["id"], run["attempt"], "d", msg))
    for pid in list(_procs):
        if pid not in live and not psutil.pid_exists(pid):
            del _procs[pid]
    if events:
        def write(store: Store) -> None:
            store.apply(events)

        daemon.call_writer(write)
    return len(events)


