"""Only the owner gets in; nothing a client says escapes the home (SPEC promise 6, §6).

* another uid cannot connect: the 0700 directory stops it, and when that is
  loosened on purpose, the daemon's own SO_PEERCRED check still refuses it;
* run ids, run names and checkpoint buffer paths with ``../``, absolute
  paths or NUL never make the daemon touch anything outside the home;
* a checkpoint file crafted to run code when loaded runs none;
* a store written by a newer schema is refused, untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ckptd_client import paths, protocol, transport
from ckptd_client.errors import CkptdError
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, wait_for

SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"
need_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, setpriv and /usr/bin/python3 to act as user nobody")


def frame(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body


def talk(sock_path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes on a fresh connection; every reply until the daemon closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(os.fspath(sock_path))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reader, out = protocol.FrameReader(), []
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += reader.feed(chunk)
    s.close()
    return out


def as_nobody(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    return subprocess.run(
        [SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", SYSTEM_PYTHON,
         "-c", code], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd="/")


# ------------------------------------------------------------- other users

@pytest.fixture
def open_socket_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home whose socket sits in a directory of its own under /tmp, so the
    test can loosen exactly that directory's mode (and nothing of pytest's)."""
    sock_dir = Path(f"/tmp/ckptd-sec-{os.getpid()}-{os.urandom(3).hex()}")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("CKPTD_HOME", os.fspath(home))
    monkeypatch.setenv("CKPTD_SOCKET", os.fspath(sock_dir / "ckptd.sock"))
    d = DaemonProc(home, env=env_for(home, CKPTD_SOCKET=os.fspath(sock_dir / "ckptd.sock")))
    d.start()
    try:
        yield sock_dir / "ckptd.sock"
    finally:
        d.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


CONNECT_RAW = """
import json, socket, struct, sys
def frame(m):
    b = json.dumps(m).encode(); return struct.pack(">I", len(b)) + b
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1] if len(sys.argv) > 1 else %r)
except OSError as e:
    print("connect failed:", e.__class__.__name__); sys.exit(0)
s.settimeout(2)
try:
    first = s.recv(65536)  # a refusing daemon speaks first, then closes
except socket.timeout:
    first = b""
if first:
    print("reply:", first[4:].decode(errors="replace")); sys.exit(0)
s.settimeout(10)
try:
    s.sendall(frame({"t": "hello", "run": "intruder", "attempt": 1, "src": "c"})
              + frame({"t": "log", "seq": 1, "step": 0, "m": {"x": 1.0}})
              + frame({"t": "flush", "seq": 1}))
    data = b""
    while True:
        c = s.recv(65536)
        if not c: break
        data += c
    print("reply:", data[4:].decode(errors="replace"))
except OSError as e:
    print("refused:", e.__class__.__name__)
"""


def test_socket_is_private(open_socket_home: Path) -> None:
    assert stat.S_IMODE(os.stat(open_socket_home.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(open_socket_home).st_mode) == 0o600


@need_nobody
def test_other_uid_cannot_reach_the_socket(open_socket_home: Path) -> None:
    out = as_nobody(CONNECT_RAW % os.fspath(open_socket_home))
    assert "connect failed: PermissionError" in out.stdout, out.stdout + out.stderr


@need_nobody
def test_daemon_refuses_other_uid_even_with_open_modes(open_socket_home: Path) -> None:
    """Loosen the directory and socket modes on purpose: the daemon's own
    SO_PEERCRED check must still refuse the peer and store nothing of it."""
    sock_dir = open_socket_home.parent
    os.chmod(sock_dir, 0o711)
    os.chmod(open_socket_home, 0o777)
    try:
        out = as_nobody(CONNECT_RAW % os.fspath(open_socket_home))
    finally:
        os.chmod(open_socket_home, 0o600)
        os.chmod(sock_dir, 0o700)
    assert "permission denied" in out.stdout, out.stdout + out.stderr
    home = Path(os.environ["CKPTD_HOME"])
    assert db_rows(home, "SELECT id FROM runs WHERE id = 'intruder'") == []
    assert "refused a connection from uid" in (home / "daemon.log").read_text()
    # and the owner is still served
    assert talk(open_socket_home, frame({"t": "ping"}))[0]["t"] == "pong"


def test_client_refuses_a_socket_owned_by_someone_else(tmp_path: Path) -> None:
    """The client will not hand a training run's data to another user's daemon."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a socket to another uid")
    path = tmp_path / "foreign.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    s.listen(1)
    try:
        os.chown(path, 65534, 65534)
        with pytest.raises(CkptdError, match="owned by uid 65534"):
            transport.connect(path)
    finally:
        s.close()


# ------------------------------------------------------------ path escapes

BAD_IDS = ["../evil", "..", "/tmp/evil", "a/b", "a\0b", "run\n", ".hidden", "x" * 200]


def test_run_id_with_a_trailing_newline_is_invalid() -> None:
    """Found by this suite: ``re.match`` with ``$`` accepted "run\\n" (``$``
    matches before a final newline), creating a run and a directory whose
    name ends in a newline. Now the whole id must match."""
    from ckptd_client.identity import valid_run_id

    assert not valid_run_id("run\n")
    assert valid_run_id("run-1.a_b")


def test_hostile_run_id_is_refused(home: Path, daemon: DaemonProc) -> None:
    for bad in BAD_IDS:
        replies = talk(paths.socket_path(home), frame(
            {"t": "hello", "run": bad, "attempt": 1, "src": "c"})
            + frame({"t": "register", "seq": 1, "name": "x"})
            + frame({"t": "flush", "seq": 1}))
        assert replies and replies[-1]["t"] == "error", (bad, replies)
    assert db_rows(home, "SELECT id FROM runs") == []
    assert not (home.parent / "evil").exists() and not Path("/tmp/evil").exists()


def test_run_id_from_the_environment_cannot_escape(home: Path) -> None:
    out = run_script(home, """
import os
import ckptd_client as ckptd
from ckptd_client.errors import CkptdError
for bad in ["../evil", "/tmp/evil", "a/b", "..", "evil\\n"]:
    os.environ["CKPTD_RUN_ID"] = bad
    try:
        ckptd.init(autostart=False)
        print("accepted", repr(bad))
    except CkptdError as exc:
        print("refused:", exc)
""", env=env_for(home, CKPTD_NO_AUTOSTART="1"))
    assert out.stdout.count("is not a valid run id") == 5, out.stdout + out.stderr
    assert not list(home.parent.glob("evil*"))


def test_cli_refuses_path_like_run_arguments(home: Path, daemon: DaemonProc) -> None:
    for bad in ["../../etc/passwd", "/etc/passwd"]:
        for args in (["show", bad], ["ckpt", "ls", bad]):
            out = ckptd(home, *args)
            assert out.returncode != 0, args
            assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, \
                (args, out.stderr)


def test_hostile_run_name_is_only_a_label(home: Path) -> None:
    """A name is stored, never used as a path: checkpoints go under the run id."""
    out = run_script(home, """
import ckptd_client as ckptd, torch
from ckptd_client.errors import CkptdError
for bad in ["a\\0b", "\\udc80"]:
    try:
        ckptd.init(name=bad)
        print("accepted", repr(bad))
    except CkptdError:
        print("refused")
run = ckptd.init(name="../../../evil")
run.checkpoint({"w": torch.ones(4)}, step=1).wait(timeout=60)
print("run", run.id)
run.finish()
""", timeout=180)
    assert out.stdout.count("refused") == 2, out.stdout
    run_id = out.stdout.split("run ")[-1].strip()
    assert (paths.checkpoints_dir(home, run_id) / "step-1").is_dir()
    assert not list(home.parent.rglob("evil"))
    assert db_rows(home, "SELECT name FROM runs WHERE id = ?", (run_id,)) == \
        [("../../../evil",)]


def _ckpt_msg(**extra: Any) -> dict[str, Any]:
    """A request with one 64-byte tensor, to be read from the buffer sent with it."""
    return {"t": protocol.CKPT, "id": 1, "step": 5, "metrics": {}, "size": 64,
            "tree": {"D": [["state", {"D": [["w", {"T": 0}]]}]]},
            "tensors": [{"dtype": "uint8", "shape": [64], "offset": 0, "nbytes": 64}],
            "pid": os.getpid(), **extra}


def _send_with_fd(sock_path: Path, data: bytes, fd: int) -> list[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(os.fspath(sock_path))
    socket.send_fds(s, [data], [fd])
    s.shutdown(socket.SHUT_WR)
    reader, out = protocol.FrameReader(), []
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += reader.feed(chunk)
    s.close()
    return out


def test_checkpoint_request_cannot_make_the_daemon_read_a_file(home: Path, daemon: DaemonProc,
                                                                tmp_path: Path) -> None:
    """The daemon reads a snapshot only from the memory file sent with the
    request: a path in the request (another file, ``../``, a symlink) is never
    opened, and a descriptor of anything but a sealed memfd is refused; nothing
    is written."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me\n" * 300)  # big enough for the request's 64 bytes
    link = tmp_path / "link"
    link.symlink_to(secret)
    hello = frame({"t": "hello", "run": "victim", "attempt": 1, "src": "c"})
    for shm in [os.fspath(secret), os.fspath(home / "ckptd.db"), "/dev/shm/../etc/passwd",
                os.fspath(link)]:
        replies = talk(paths.socket_path(home), hello + frame(_ckpt_msg(shm=shm)))
        assert replies and replies[0].get("ok") is False, (shm, replies)
        assert "no snapshot buffer came" in replies[0]["error"], replies
    fd = os.open(secret, os.O_RDONLY)
    try:
        replies = _send_with_fd(paths.socket_path(home), hello + frame(_ckpt_msg()), fd)
    finally:
        os.close(fd)
    assert replies and replies[0].get("ok") is False, replies
    assert "not a sealed memory file" in replies[0]["error"], replies
    assert secret.read_text() == "do not copy me\n" * 300
    assert not (home / "runs" / "victim" / "checkpoints" / "step-5").exists()
    assert db_rows(home, "SELECT * FROM checkpoints") == []


# ------------------------------------------------------- code on load

EVIL = """
import os, pickle
class Evil:
    def __reduce__(self):
        return (os.system, ("touch %s",))
"""


def test_checkpoint_crafted_to_run_code_runs_none(home: Path, tmp_path: Path) -> None:
    """Replace the newest checkpoint's files with pickles that run a command
    when unpickled (and fix up the recorded hashes, as an attacker with write
    access would): restore() runs nothing, refuses it, and falls back."""
    marker = tmp_path / "pwned"
    out = run_script(home, """
import ckptd_client as ckptd, torch
run = ckptd.init(name="victim")
for step in (1, 2):
    run.checkpoint({"w": torch.full((8,), float(step))}, step=step).wait(timeout=60)
print("run", run.id)
run.finish()
""", timeout=180)
    run_id = out.stdout.split("run ")[-1].strip()
    step2 = paths.checkpoints_dir(home, run_id) / "step-2"
    ns: dict[str, Any] = {}
    exec(EVIL % marker, ns)  # noqa: S102 - builds the hostile payload
    import pickle

    import torch

    payload = pickle.dumps(ns["Evil"]())
    torch_payload = step2 / "evil.pt"
    torch.save({"x": ns["Evil"]()}, torch_payload)
    (step2 / "tensors.bin").write_bytes(payload)
    (step2 / "manifest.json").write_bytes(torch_payload.read_bytes())
    digest = "sha256:" + hashlib.sha256((step2 / "manifest.json").read_bytes()).hexdigest()
    conn = sqlite3.connect(home / "ckptd.db")
    conn.execute("UPDATE checkpoints SET hash = ? WHERE run_id = ? AND step = 2",
                 (digest, run_id))
    conn.commit()
    conn.close()
    kill_marker = not marker.exists()
    assert kill_marker
    res = run_script(home, """
import warnings, ckptd_client as ckptd
run = ckptd.init()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    state = run.restore()
print("restored", float(state["w"][0]))
print("warned", any("step 2" in str(x.message) for x in w))
run.finish()
""", env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"), timeout=180)
    assert not marker.exists(), "loading a checkpoint ran code"
    assert "restored 1.0" in res.stdout and "warned True" in res.stdout, res.stdout + res.stderr
    # positive control: the same bytes through a plain torch.load do run code,
    # so the payload is live and the negative result above means something
    run_script(home, f"""
import torch
torch.load({os.fspath(step2 / "manifest.json")!r}, weights_only=False)
""", timeout=180)
    assert marker.exists(), "the payload is inert: the test above proves nothing"
    marker.unlink()
    # the export is a plain torch.save file that loads with weights_only=True
    exported = tmp_path / "export.pt"
    ckptd(home, "ckpt", "export", run_id, "--step", "1", "-o", os.fspath(exported), check=True)
    loaded = torch.load(exported, weights_only=True)
    assert not marker.exists()
    assert isinstance(loaded, dict)
    # and torch.load(weights_only=True) itself refuses the crafted file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(torch_payload, weights_only=True)
    assert not marker.exists()


# ----------------------------------------------------------- future schema

def test_stop_returns_only_after_the_daemon_let_go_of_the_store(home: Path) -> None:
    """Found by the test below: `ckptd stop` said "stopped" once the socket was
    gone, while the daemon was still committing and closing the store, so a
    store copied (or edited) right after `stop` was not the final one."""
    ckptd(home, "start", check=True)
    pid = int((home / "daemon.lock").read_text())
    ckptd(home, "stop", check=True)
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_store_from_the_future_is_refused_untouched(home: Path) -> None:
    ckptd(home, "start", check=True)
    ckptd(home, "stop", check=True)
    db = home / "ckptd.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    out = ckptd(home, "ls")
    assert out.returncode != 0
    assert "schema version 99" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    d = DaemonProc(home)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=30) != 0
    assert "newer than this ckptd" in (home / "daemon.log").read_text()
    # a training script is not killed by it: its events wait in the spool
    res = run_script(home, """
import ckptd_client as ckptd
run = ckptd.init(autostart=False)
run.log({"x": 1.0})
run.finish(timeout=5)
print("trained")
""", env=env_for(home, CKPTD_NO_AUTOSTART="1"))
    assert "trained" in res.stdout
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    wait_for(lambda: list(paths.spool_dir(home).glob("*.spool")), timeout=5,
             what="events kept in the spool")
