"""Named fault-injection points in the daemon's write paths.

``crashpoint("events.after_commit")`` marks a step of a durability protocol.
When the daemon runs with ``CKPTD_CRASH_AT=<name>[:<count>]`` it kills itself
with SIGKILL the ``count``-th time (default: the first time) it reaches that
point, exactly as a ``kill -9`` or an OOM kill at that instant would.
``CKPTD_CRASH_MODE=exit`` uses ``os._exit(70)`` instead (no signal, same
effect on files). The tests in ``tests/faults/test_crashpoints.py`` run every name
in :data:`POINTS` and check the promises after a restart.

Test-only, too: ``CKPTD_DELAY_AT=<name>:<seconds>`` makes the daemon sleep
that long each time it reaches the point, so a test can act (send SIGTERM,
say) while a commit is provably in flight at a known step.

When neither variable is set (always, in production) ``crashpoint`` is a
function that returns at once: one global lookup and a call.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

ENV = "CKPTD_CRASH_AT"
MODE_ENV = "CKPTD_CRASH_MODE"
DELAY_ENV = "CKPTD_DELAY_AT"

#: Every point the daemon reaches, in protocol order. Tests iterate over this;
#: a name used in the code but missing here is a bug (checked by a test).
EVENT_POINTS = (
    "events.before_commit",  # batch applied inside the transaction, not committed
    "events.after_commit",  # committed, spool files not yet deleted, nothing acked
    "events.before_ack",  # committed and spool cleaned up, acks not yet sent
    "events.after_ack",  # acks sent
)
SPOOL_POINTS = (
    "spool.before_unlink",  # spool file ingested and committed, still on disk
    "spool.after_unlink",  # spool file deleted, directory not yet fsynced
)
CHECKPOINT_POINTS = (
    "ckpt.staged",  # files written and fsynced in the staging directory
    "ckpt.before_rename",  # manifest fsynced, staging not yet renamed
    "ckpt.after_rename",  # step-<N>/ in place, parent not yet fsynced, no row
    "ckpt.before_row",  # parent fsynced, row not yet committed
    "ckpt.after_row",  # row committed, client not yet told
)
POINTS = EVENT_POINTS + SPOOL_POINTS + CHECKPOINT_POINTS


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    try:
        n = int(count) if count else 1
    except ValueError:
        n = 1
    return name, max(n, 1)


def _parse_delay(spec: str | None) -> tuple[str, float] | None:
    if not spec:
        return None
    name, _, seconds = spec.partition(":")
    try:
        return name, max(float(seconds or 1), 0.0)
    except ValueError:
        return name, 1.0


_target = _parse(os.environ.get(ENV))
_delay = _parse_delay(os.environ.get(DELAY_ENV))
_hits = 0
_lock = threading.Lock()


def _noop(name: str) -> None:
    """Production: no crash point armed."""


def _armed(name: str) -> None:
    """Test: sleep at the delayed point; die at the armed point's ``count``-th hit."""
    global _hits
    if _delay is not None and name == _delay[0]:
        time.sleep(_delay[1])
    if _target is None or name != _target[0]:
        return
    with _lock:
        _hits += 1
        if _hits < _target[1]:
            return
    try:
        sys.stderr.write(f"ckptd: crash point {name} reached (hit {_hits}); dying now\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - dying anyway
        pass
    if os.environ.get(MODE_ENV) == "exit":
        os._exit(70)
    os.kill(os.getpid(), signal.SIGKILL)


crashpoint = _armed if _target is not None or _delay is not None else _noop

#: Test-only: seconds every checkpoint commit sleeps once its files are staged,
#: so a test can resume while a commit is still in flight.
SLOW_COMMIT_ENV = "CKPTD_TEST_SLOW_COMMIT_S"


def slow_commit() -> None:
    """Test: stretch a checkpoint commit (unset in production: returns at once)."""
    try:
        delay = float(os.environ.get(SLOW_COMMIT_ENV) or 0)
    except ValueError:
        return
    if delay > 0:
        import time

        time.sleep(delay)

__all__ = ["crashpoint", "slow_commit", "SLOW_COMMIT_ENV", "POINTS", "EVENT_POINTS",
           "SPOOL_POINTS", "CHECKPOINT_POINTS", "ENV", "DELAY_ENV"]
