"""Exceptions a user of ckptd can meet. The CLI maps each to one line and an exit code."""

from __future__ import annotations


class CkptdError(Exception):
    """Base of every error ckptd raises on purpose; its message is one line a user can act on."""

    exit_code = 1


class UsageError(CkptdError):
    """A bad option value or argument on the command line (exit 2, like click's own)."""

    exit_code = 2


class DaemonUnavailable(CkptdError):
    """No daemon answered on the socket and none could be started."""

    exit_code = 3


class NotFound(CkptdError):
    """A run, checkpoint or step that does not exist (or a prefix that is ambiguous)."""

    exit_code = 2


class CheckpointError(CkptdError):
    """A checkpoint could not be written, or failed verification."""

    exit_code = 4


class DiskFull(CheckpointError):
    """Not enough free space for the checkpoint; nothing earlier was touched."""

    exit_code = 5


class ResumeRefused(CkptdError):
    """``ckptd resume`` of a run that is running or finished (``--force`` overrides)."""

    exit_code = 6


def error_for(kind: object, message: str, default: type[CkptdError] = CkptdError) -> CkptdError:
    """The exception a daemon reply names by class (``"kind"``), so a caller
    can catch ``DiskFull`` rather than parse text; unknown kinds get ``default``."""
    cls = globals().get(str(kind), default)
    if not (isinstance(cls, type) and issubclass(cls, CkptdError)):
        cls = default
    return cls(message)
