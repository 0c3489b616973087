"""What the view tests share: a live run that logs on demand, a real tmux, a
real headless Chromium driven over the DevTools protocol (a pipe, no extra
packages), and the skip-or-fail rule for tools that may be missing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

#: Logs ``loss`` for steps 0..49 (a checkpoint at 20), prints "ready"; then each
#: line ``KEY STEP VALUE`` written to ``<home>/../cmd`` is logged and flushed
#: ("logged" printed); a line ``stop`` finishes the run.
LIVE_RUN = """
import os, time, ckptd_client as ckptd
cmd = os.path.join(os.path.dirname(os.environ["CKPTD_HOME"]), "cmd")
run = ckptd.init(name="live", config={"lr": 0.001, "total_steps": 1000})
for s in range(50):
    run.log({"loss": 2.0 - s * 0.02}, step=s)
    if s == 20:
        run.checkpoint({"step": s}, step=s).wait(timeout=60)
run.event("warmup done", level="info")
run.flush(timeout=30)
print("ready", run.id, flush=True)
done = 0
while True:
    lines = open(cmd).read().splitlines() if os.path.exists(cmd) else []
    for line in lines[done:]:
        done += 1
        if line == "stop":
            run.finish(timeout=30)
            raise SystemExit(0)
        key, step, value = line.split()
        run.log({key: float(value)}, step=int(step))
        run.flush(timeout=30)
        print("logged", line, flush=True)
    time.sleep(0.02)
"""


def need(tool: str) -> str:
    """The tool's path; without it, a skip that says why (a failure under CI=true)."""
    path = shutil.which(tool)
    if path:
        return path
    msg = f"{tool} is not installed (apt-get install -y {tool}); .ci/run installs it"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def command(home: Path, cmd: str) -> None:
    """Send the live run one command line."""
    with open(home.parent / "cmd", "a") as f:
        f.write(cmd + "\n")


def read_until(proc: subprocess.Popen[str], word: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(word):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"live run exited: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError(f"no {word!r} within {timeout}s")


class Tmux:
    """A private tmux server (its own socket) running one shell."""

    def __init__(self, name: str, width: int, height: int, env: dict[str, str]) -> None:
        self.base = [need("tmux"), "-L", name]
        keep = [a for k in ("CKPTD_HOME", "PYTHONPATH", "PATH", "NO_COLOR")
                if k in env for a in ("-e", f"{k}={env[k]}")]
        subprocess.run([*self.base, "-f", "/dev/null", "new-session", "-d", "-x", str(width),
                        "-y", str(height), *keep, "sh"], check=True, env=env)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", *keys], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p"], capture_output=True,
                              text=True).stdout

    def wait(self, pred: Any, timeout: float = 30, what: str = "") -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if pred(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"tmux screen never showed {what}:\n{text}")
            time.sleep(0.05)

    def resize(self, width: int, height: int) -> None:
        subprocess.run([*self.base, "resize-window", "-x", str(width), "-y", str(height)],
                       check=True)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def braille(text: str) -> int:
    return sum("\u2801" <= ch <= "\u28ff" for ch in text)


class Chromium:
    """Headless Chromium on the DevTools protocol over ``--remote-debugging-pipe``
    (fd 3 in, fd 4 out, messages ending in NUL): no websocket client needed."""

    def __init__(self, profile: Path) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            need("chromium")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds() -> None:
            import fcntl

            # out of the way first: one of the pipe ends may itself be fd 3 or 4
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "--window-size=1280,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, close_fds=False, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, session: bool = True, timeout: float = 30,
             **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            if time.monotonic() > deadline:
                raise AssertionError(f"chromium did not answer {method} in {timeout}s")
            import select

            if select.select([self._r], [], [], 0.5)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed the DevTools pipe")
                self._buf += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", session=False, url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target,
                                 flatten=True)["sessionId"]

    def js(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return res.get("result", {}).get("value")

    def wait(self, expr: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expr)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied {expr}")
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._w)
            os.close(self._r)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)


PY = sys.executable
