"""What the daemon does, in one table: every RPC, message handler and hook.

The server (``server.py``) owns sockets, connections and the writer thread;
everything else it does is a feature module listed here. A feature receives
the ``Daemon`` as its first argument (its small context: ``home``,
``call_writer``, ``conns``, ``start_worker``) and never imports the server
at run time, so reading this file tells what the daemon does, and no
module registers itself by being imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckptd_client import protocol

from ckptd.analysis import sweep
from ckptd.daemon import (
    adopt,
    autoresume,
    checkpoints,
    console,
    control,
    dcp_commit,
    liveness,
    manage,
    shared_dir,
    sysmetrics,
)

#: RPC operations: op -> fn(daemon, args, conn) -> result (the reply).
RPCS: dict[str, Callable[..., Any]] = {
    "begin_attempt": autoresume.begin_attempt,
    "ckpt_adopt": adopt.rpc_adopt,
    "ckpt_await_commits": checkpoints.rpc_await_commits,
    "ckpt_gc": checkpoints.rpc_gc,
    "ckpt_mark_corrupt": checkpoints.rpc_mark_corrupt,
    "ckpt_verify": checkpoints.rpc_verify,
    "checkpoint_dir": shared_dir.rpc_checkpoint_dir,
    "dcp_commit": dcp_commit.rpc_dcp_commit,
    "flush_spool": control.flush_spool,
    "run_note": manage.rpc_note,
    "run_rename": manage.rpc_rename,
    "run_rm": manage.rpc_rm,
    "run_tag": manage.rpc_tag,
    "status": control.status,
    "stop": control.stop,
    "sweep_create": sweep.sweep_create,
}

#: Frames that are not sequenced events: t -> fn(daemon, msg, conn).
MESSAGE_HANDLERS: dict[str, Callable[..., None]] = {
    protocol.CKPT: checkpoints.on_ckpt,
    console.CONSOLE_FDS: console.on_console_fds,
    console.CONSOLE_RELEASE: console.on_console_release,
}

#: Run once the daemon is up (store open, socket bound): fn(daemon).
STARTUP_HOOKS: list[Callable[..., None]] = [
    checkpoints.startup,
    manage.startup,
    sweep.start_scheduler,
]

#: Run by the sweeper every period: fn(daemon).
PERIODIC_HOOKS: list[Callable[..., None]] = [
    liveness.sweep,
    liveness.track_ranks,
    autoresume.scan,
    sysmetrics.sample,
]
