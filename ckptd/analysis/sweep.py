"""``ckptd sweep``: many supervised runs of one command, queued in the store.

The queue is rows of ``sweep_items`` (:mod:`ckptd.store`), and the daemon
launches from it (:func:`scan`, on its own thread): so a sweep survives the
``ckptd sweep`` process, a ``kill -9`` of the daemon and a power cut alike.

* A pending item (no ``run_id``) is launched when fewer than ``parallel`` of
  its sweep's items are active, as ``ckptd run --auto-resume --group SWEEP``
  (the same supervisor as any run: console capture, auto-resume, preemption).
* A launched item's state is its run's: ``finished`` stays finished; an
  interrupted one is relaunched from its newest checkpoint by auto-resume
  (:mod:`ckptd.autoresume`), never from scratch by the sweep.

Launch order, and the crash window each step closes:

1. the run id is chosen and written to the item (committed) -- a crash
   before this leaves the item pending: it is launched later, once;
2. ``ckptd run --run-id ID`` is started -- a crash between 1 and 2 leaves an
   item whose run never registers: after :data:`LAUNCH_GRACE` with no live
   launcher it is started again under the same id (nothing of it ran);
3. the launcher's pid is recorded -- a crash between 2 and 3 is covered by
   the grace period: its run registers (through the socket or its spool)
   well within it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client.errors import CkptdError
from ckptd_client.identity import BOOT_RELATIVE_MAX, boot_seconds, new_run_id, process_start_time

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon
    from ckptd.store.query import Reader
    from ckptd.store.writer import Store

log = logging.getLogger("ckptd.sweep")

#: Seconds between looks at the queue (``CKPTD_SWEEP_POLL`` overrides).
POLL_S = 1.0
#: A launched item whose run has not registered after this long, and whose
#: launcher is gone, is launched again under the same run id
#: (``CKPTD_SWEEP_LAUNCH_GRACE`` overrides). Measured in seconds since boot
#: (:func:`launch_clock`), so a step of the wall clock never stretches it.
LAUNCH_GRACE = 30.0
LAUNCH_GRACE_ENV = "CKPTD_SWEEP_LAUNCH_GRACE"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SweepError(CkptdError):
    """A sweep cannot be made as asked (bad grid, seeds, name, GPUs)."""


# ------------------------------------------------------------------ expansion

def parse_seeds(text: str | None) -> list[int]:
    """``0-4`` -> 0..4; ``1,5,9`` -> those; None -> no seed axis."""
    if text is None:
        return []
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            if dash:
                if int(hi) < int(lo):
                    raise ValueError
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(lo))
    except ValueError:
        raise SweepError(f"--seeds {text!r}: write a range like 0-4 or a list like 1,5,9") \
            from None
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r} names a seed twice")
    return seeds


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*", key) or not values:
            raise SweepError(f"--grid {spec!r}: write NAME=V1,V2 (e.g. lr=1e-3,3e-4)")
        if key in grid or key == "seed":
            raise SweepError(f"--grid {key}: given twice (or named 'seed'; use --seeds)")
        grid[key] = [v.strip() for v in values.split(",")]
    return grid


def expand(command: list[str], grid: dict[str, list[str]],
           seeds: list[int]) -> list[dict[str, Any]]:
    """Every combination: its parameters and its command with ``{name}`` filled in."""
    names = list(grid)
    if seeds:
        names.append("seed")
    used = {n for n in names if any("{" + n + "}" in arg for arg in command)}
    missing = [n for n in names if n not in used]
    if missing:
        raise SweepError(f"the command never uses {', '.join('{' + n + '}' for n in missing)}; "
                         "every run would be the same")
    axes = [grid[k] for k in grid] + ([[str(s) for s in seeds]] if seeds else [])
    items = []
    for combo in itertools.product(*axes):
        params = dict(zip(names, combo, strict=True))
        cmd = [re.sub(r"\{(\w+)\}", lambda m, p=params: p.get(m.group(1), m.group(0)), arg)
               for arg in command]
        items.append({"params": params, "command": cmd})
    return items


def gpu_slices(gpus: str | None, per_run: int | None) -> list[str]:
    """``--gpus 0,1,2,3 --gpus-per-run 2`` -> ``["0,1", "2,3"]``; none asked -> ``[]``."""
    if gpus is None and per_run is None:
        return []
    if gpus is None:
        gpus = ",".join(str(i) for i in range(_count_gpus()))
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    per = per_run or 1
    if not ids or per < 1 or per > len(ids):
        raise SweepError(f"--gpus {gpus!r} / --gpus-per-run {per}: not enough GPUs for one run")
    return [",".join(ids[i:i + per]) for i in range(0, len(ids) - per + 1, per)]


def _count_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def item_name(sweep: str, params: dict[str, str]) -> str:
    return f"{sweep}:" + ",".join(f"{k}={v}" for k, v in params.items())


# -------------------------------------------------------------------- state

def item_state(item: dict[str, Any]) -> str:
    """pending, launching, running, resuming (auto-resume will relaunch it),
    finished, failed or interrupted (ended, and nothing will relaunch it)."""
    if not item.get("run_id"):
        return "pending"
    status = item.get("run_status")
    if status is None:
        return "launching"
    if status in ("interrupted", "failed") and item.get("run_auto_resume"):
        return "resuming"
    return status


ACTIVE = ("launching", "running", "resuming")


# -------------------------------------------------------------- daemon side

def sweep_create(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    """Record a sweep (or find the same one again); the scheduler takes it from there."""
    name, items = args.get("name"), args.get("items")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SweepError("sweep_create: name must be letters, digits, '.', '_' or '-'")
    if not isinstance(items, list) or not items or not all(
            isinstance(it, dict) and isinstance(it.get("params"), dict)
            and isinstance(it.get("command"), list)
            and all(isinstance(a, str) for a in it["command"]) for it in items):
        raise SweepError("sweep_create: items must be a non-empty list of {params, command}")
    parallel = args.get("parallel")
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise SweepError("sweep_create: parallel must be a positive integer")
    env, cwd = args.get("env"), args.get("cwd")
    if not isinstance(env, dict) or not isinstance(cwd, str):
        raise SweepError("sweep_create: env must be an object and cwd a string")
    row = {"name": name, "spec": args.get("spec") or {}, "command": args.get("template") or [],
           "cwd": cwd, "env": {str(k): str(v) for k, v in env.items()}, "parallel": parallel,
           "created": time.time()}
    created = daemon.call_writer(lambda store: store.create_sweep(row, items))
    _wake.set()
    return {"created": created, "name": name}


_wake = threading.Event()


def launch_grace() -> float:
    try:
        return max(0.0, float(os.environ.get(LAUNCH_GRACE_ENV, LAUNCH_GRACE)))
    except ValueError:
        return LAUNCH_GRACE


def launching_for(launched: float | None, now: float) -> float:
    """Seconds an item has been launching: ``launched`` and ``now`` are seconds
    since boot (:func:`boot_seconds`). A time from before the last boot (larger
    than now) counts as long ago (its launcher died with that boot); an epoch
    time (an older daemon's, ``> BOOT_RELATIVE_MAX``) is read with the wall clock."""
    if launched is None:
        return float("inf")
    if launched >= BOOT_RELATIVE_MAX:
        return time.time() - launched
    return now - launched if launched <= now else float("inf")


def scan(daemon: Daemon, now: float | None = None) -> list[str]:
    """Launch what is due in every sweep; return the run ids launched.

    ``now`` and the items' ``launched`` are seconds since boot (:func:`boot_seconds`).
    """
    if daemon.stop.is_set():
        return []
    now = boot_seconds() if now is None else now
    grace = launch_grace()
    from ckptd.daemon.liveness import process_alive

    def work(store: Store) -> list[dict[str, Any]]:
        due = []
        for sweep in store.sweeps():
            spec = json.loads(sweep["spec"])
            slices = spec.get("gpu_slices") or []
            items = store.sweep_items(sweep["name"])
            states = [item_state(it) for it in items]
            active = [it for it, st in zip(items, states, strict=True) if st in ACTIVE]
            for it, st in zip(items, states, strict=True):
                if st == "launching" and launching_for(it["launched"], now) > grace and \
                        not process_alive(it["launcher_pid"], it["launcher_started"]):
                    # its launcher died before the run registered: nothing of it ran
                    store.update_sweep_item(sweep["name"], it["idx"], launched=now,
                                            launcher_pid=None)
                    due.append(dict(it, sweep_row=sweep))
            busy = {it["gpus"] for it in active}
            free = [s for s in slices if s not in busy]
            room = sweep["parallel"] - len(active)
            for it, st in zip(items, states, strict=True):
                if room <= 0 or (slices and not free):
                    break
                if st != "pending":
                    continue
                gpus = free.pop(0) if slices else None
                run_id = new_run_id()
                # CRASH WINDOW (step 1 -> 2): see the module docstring
                store.update_sweep_item(sweep["name"], it["idx"], run_id=run_id, launched=now,
                                        gpus=gpus, launcher_pid=None)
                due.append(dict(it, run_id=run_id, gpus=gpus, sweep_row=sweep))
                room -= 1
        return due

    launched = []
    for it in daemon.call_writer(work):
        try:
            proc = launch(daemon.home, it)
        except OSError as exc:
            log.error("sweep %s item %d: cannot launch: %s", it["sweep"], it["idx"], exc)
            continue
        started = process_start_time(proc.pid)
        daemon.call_writer(lambda store, it=it, proc=proc, started=started:
                           store.update_sweep_item(it["sweep"], it["idx"],
                                                   launcher_pid=proc.pid,
                                                   launcher_started=started))
        _children.append(proc)
        launched.append(it["run_id"])
        log.info("sweep %s item %d: launched run %s (pid %d)", it["sweep"], it["idx"],
                 it["run_id"], proc.pid)
    for proc in list(_children):
        if proc.poll() is not None:
            _children.remove(proc)  # reaped: no zombies pile up in a long sweep
    return launched


_children: list[subprocess.Popen[bytes]] = []


def launch(home: Path, item: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start ``ckptd run`` for one item, detached like an auto-resume supervisor."""
    from ckptd.supervise.resume import supervisor_log

    sweep = item["sweep_row"]
    params = json.loads(item["params"])
    env = json.loads(sweep["env"])
    for key in ("CKPTD_RUN_ID", "CKPTD_ATTEMPT", "CKPTD_AUTOSTARTED"):
        env.pop(key, None)
    env.update({k: v for k, v in os.environ.items() if k.startswith("CKPTD_")})
    env.pop("CKPTD_AUTOSTARTED", None)
    env["CKPTD_HOME"] = os.fspath(home)
    if item.get("gpus") is not None:
        env["CUDA_VISIBLE_DEVICES"] = item["gpus"]
    argv = [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run",
            "--run-id", item["run_id"], "--name", item_name(sweep["name"], params),
            "--group", sweep["name"], "--auto-resume", "--", *json.loads(item["command"])]
    log_path = supervisor_log(home, item["run_id"])
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, cwd=sweep["cwd"], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)


def _scheduler(daemon: Daemon) -> None:
    try:
        poll = float(os.environ.get("CKPTD_SWEEP_POLL", POLL_S))
    except ValueError:
        poll = POLL_S
    while not daemon.stop.is_set():
        _wake.wait(poll)
        _wake.clear()
        try:
            scan(daemon)
        except CkptdError:
            continue  # the writer is stopping
        except Exception:  # noqa: BLE001 - the scheduler must outlive one bad look
            log.exception("sweep scan failed")


def start_scheduler(daemon: Daemon) -> None:
    threading.Thread(target=_scheduler, args=(daemon,), name="ckptd-sweep", daemon=True).start()




# ------------------------------------------------------------------ reading

def status(reader: Reader, name: str) -> dict[str, Any]:
    """What ``ckptd sweep status NAME --json`` prints."""
    rows = reader.rows("SELECT * FROM sweeps WHERE name = ?", (name,))
    if not rows:
        raise SweepError(f"no sweep {name!r}; `ckptd ls --group NAME` lists a sweep's runs")
    sweep = rows[0]
    items = reader.rows(
        "SELECT i.*, r.status AS run_status, r.auto_resume AS run_auto_resume,"
        " r.attempt AS attempt, r.step AS step FROM sweep_items i LEFT JOIN runs r"
        " ON r.id = i.run_id WHERE i.sweep = ? ORDER BY i.idx", (name,))
    out_items = []
    counts: dict[str, int] = {}
    for it in items:
        st = item_state(it)
        counts[st] = counts.get(st, 0) + 1
        out_items.append({"idx": it["idx"], "params": json.loads(it["params"]),
                          "command": json.loads(it["command"]), "run_id": it["run_id"],
                          "status": st, "attempt": it["attempt"], "step": it["step"],
                          "gpus": it["gpus"]})
    done = all(i["status"] not in ("pending", *ACTIVE) for i in out_items)
    return {"name": name, "parallel": sweep["parallel"], "total": len(items), "counts": counts,
            "done": done, "items": out_items}


__all__ = ["SweepError", "parse_seeds", "parse_grid", "expand", "gpu_slices", "scan",
           "status", "item_state"]
