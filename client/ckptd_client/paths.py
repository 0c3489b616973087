"""Where a home, its store and its socket live (SPEC section 3).

Shared by the client and the daemon so both sides always agree on the
socket for a given home.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
from pathlib import Path

from .errors import CkptdError

DB_NAME = "ckptd.db"
#: SQLite's companions of the store (created with the store's own mode).
DB_SIDECARS = ("-wal", "-shm")
LOCK_NAME = "daemon.lock"
DAEMON_LOG = "daemon.log"
SPOOL_DIR = "spool"
RUNS_DIR = "runs"
#: Longest socket path we use (AF_UNIX allows 107 bytes; keep a margin).
MAX_SOCKET_PATH = 100


def home_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """The data home: argument, else ``CKPTD_HOME``, else XDG data dir."""
    if home is not None:
        return Path(home).expanduser().absolute()
    env = os.environ.get("CKPTD_HOME")
    if env:
        return Path(env).expanduser().absolute()
    return default_home()


def default_home() -> Path:
    """The home with no ``CKPTD_HOME``: the XDG data dir (what the systemd unit serves)."""
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser().absolute() / "ckptd"


def checked_home(home: str | os.PathLike[str] | None = None) -> Path:
    """:func:`home_dir`, refused in one line when it names something that is
    not a directory (``CKPTD_HOME`` set to a file would otherwise read as an
    empty store, or fail later with a raw ``FileExistsError``)."""
    path = home_dir(home)
    if path.exists() and not path.is_dir():
        from .errors import CkptdError

        raise CkptdError(f"data home {path} is not a directory; point CKPTD_HOME or --home "
                         "at a directory (it is created if missing)")
    return path


def socket_path(home: Path) -> Path:
    """The daemon's socket for ``home``.

    ``CKPTD_SOCKET`` wins. Under ``XDG_RUNTIME_DIR`` the default home keeps
    the plain name of the SPEC; any other home gets a suffix derived from
    its path, so two homes never share one socket (one daemon per home).
    A socket path is limited to 107 bytes, which deep homes would exceed;
    we fall back to a short path in /tmp named by the home's hash.
    """
    env = os.environ.get("CKPTD_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        # Decided by the path alone, not by how it was given: `ckptd run`
        # passes CKPTD_HOME=<the default home> to its command, which must
        # find the daemon the unit started without it.
        name = "ckptd.sock"
        if home != default_home():
            name = f"ckptd-{short_hash(home)}.sock"
        path = Path(runtime) / "ckptd" / name
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            return path
        # too long to bind: the daemon exited at start-up, respawned for ever
    path = home / "run" / "ckptd.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return Path("/tmp") / f"ckptd-{os.getuid()}" / f"{short_hash(home)}.sock"
    return path


def short_hash(home: Path) -> str:
    """A short stable name for ``home`` (socket and snapshot-buffer names)."""
    return hashlib.sha256(os.fsencode(home)).hexdigest()[:12]


def db_path(home: Path) -> Path:
    return home / DB_NAME


def spool_dir(home: Path) -> Path:
    return home / SPOOL_DIR


def run_dir(home: Path, run_id: str) -> Path:
    return home / RUNS_DIR / run_id


def checkpoints_dir(home: Path, run_id: str) -> Path:
    return run_dir(home, run_id) / "checkpoints"


class InsecurePath(CkptdError):
    """A home, store or socket directory another user owns or could swap (like ssh's
    refusal of a foreign ``~/.ssh``): using it would let that user read our runs or
    choose the command ``ckptd resume`` runs."""


def _owner_check(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.getuid():
        raise InsecurePath(
            f"{what} {path} is owned by uid {st.st_uid}, not you (uid {os.getuid()}); "
            "refusing to use it, as another user could read or replace its contents. "
            "Use a home of your own (--home / CKPTD_HOME)")


def secure_home(home: Path, create: bool = True) -> None:
    """Make ``home`` private before anything is stored in it.

    A home another user owns, or whose store, runs or spool another user
    owns, is refused (that user could swap the store, and ``ckptd resume``
    would run her command as us). A home of ours that group or others can
    enter (``mkdir -p`` under umask 022) is tightened to 0700 with one line
    on stderr, so the store, its WAL and the runs' environments stay ours.

    :raises InsecurePath: as above, or the mode cannot be tightened.
    """
    if create:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = os.stat(home)  # a home may be a symlink (to a bigger disk): judge its target
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InsecurePath(f"home {home}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePath(f"home {home} is not a directory")
    _owner_check(home, st, "home")
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(home, 0o700)
        except OSError as exc:
            raise InsecurePath(
                f"home {home} has mode {stat.S_IMODE(st.st_mode):04o} (other users can "
                f"read it) and cannot be made 0700: {exc.strerror}; fix its mode") from None
        print(f"ckptd: home {home} had mode {stat.S_IMODE(st.st_mode):04o} (readable by "
              "other users); changed it to 0700", file=sys.stderr)
    for name in (DB_NAME, *(DB_NAME + s for s in DB_SIDECARS), RUNS_DIR, SPOOL_DIR,
                 LOCK_NAME):
        try:
            entry = os.stat(home / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise InsecurePath(f"{home / name}: {exc.strerror}") from None
        _owner_check(home / name, entry, "store" if name.startswith(DB_NAME) else name)


def private_dir(path: Path) -> Path:
    """Create (or accept) a directory only we can enter, never following a symlink.

    For socket directories in shared places (``/tmp/ckptd-<uid>``,
    ``$XDG_RUNTIME_DIR/ckptd``) where another user may have planted a
    symlink or a directory of her own: the checks and the chmod go through
    one descriptor opened with O_NOFOLLOW, so nothing else gets changed.

    :raises InsecurePath: the name is a symlink, not a directory, or not ours.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise InsecurePath(f"create {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        what = "a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) \
            else exc.strerror
        raise InsecurePath(f"socket directory {path} is {what}; refusing to use it "
                           "(someone may have planted it). Remove it or set CKPTD_SOCKET") \
            from None
    try:
        st = os.fstat(fd)
        _owner_check(path, st, "socket directory")
        mode = stat.S_IMODE(st.st_mode)
        if mode & (0o022 | stat.S_ISVTX):
            # a shared directory (CKPTD_SOCKET=/tmp/x.sock): never make it private
            raise InsecurePath(f"socket directory {path} is shared (mode {mode:04o}); "
                               "set CKPTD_SOCKET to a path in a directory of its own")
        if mode != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path
