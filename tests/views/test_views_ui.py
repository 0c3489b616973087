"""``ckptd ui`` in a real headless Chromium: token, runs table, chart, live update."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import env_for, spawn_script
from views_helpers import LIVE_RUN, Chromium, command, need, read_until


def start_ui(home: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "ui",
                             "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(home),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("ckptd ui: http://"), first + (proc.stderr.read() if
                                                          proc.poll() is not None else "")
    second = proc.stdout.readline()
    assert second.startswith("from a laptop: ssh -L "), second
    return proc, first.split()[-1]


def listen_addrs(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def chromium_path() -> str:
    return need("chromium")


def test_ui_in_chromium_token_table_chart_and_live_point(home: Path, daemon: object,
                                                        chromium_path: str,
                                                        tmp_path: Path) -> None:
    run = spawn_script(home, LIVE_RUN)
    browser = None
    ui, url = start_ui(home)
    try:
        read_until(run, "ready")
        base = url.split("/?token=")[0]
        token = url.split("token=")[1]
        # the token guards everything: page, API, the vendored chart library
        for path in ("/", "/api/runs", "/static/uplot.iife.min.js", "/api/events"):
            assert status_of(base + path) == 401, path
            assert status_of(base + path + "?token=wrong" + token) == 401, path
        assert status_of(f"{base}/api/runs?token={token}") == 200
        assert listen_addrs(ui.pid) == {"127.0.0.1"}

        browser = Chromium(tmp_path / "profile")
        browser.open(url)
        browser.wait("document.querySelectorAll('#runs tbody tr.run').length === 1"
                     " && document.querySelector('.chart canvas') !== null"
                     " && document.body.dataset.drawn", timeout=60)
        row = browser.js("document.querySelector('#runs tbody tr').innerText")
        assert "live" in row and "running" in row and "0.001" in row  # name, status, lr
        assert browser.js("document.querySelector('.chart').dataset.key") == "loss"
        assert browser.js("Math.max(...Object.values(S.charts)[0].data[0])") == 49
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        png = tmp_path / "ui.png"
        import base64

        png.write_bytes(base64.b64decode(shot))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

        # a point the live run logs reaches the open page without a reload
        command(home, "loss 500 0.25")
        read_until(run, "logged")
        t0 = time.monotonic()
        browser.wait("Math.max(...Object.values(S.charts)[0].data[0]) === 500", timeout=10)
        took = time.monotonic() - t0
        assert took < 2.0, f"live point took {took:.2f}s to appear"
        assert browser.js("performance.getEntriesByType('navigation').length") == 1
        print(f"live point on the page after {took:.2f}s")
        command(home, "stop")
        run.wait(timeout=60)
    finally:
        if browser is not None:
            browser.close()
        stop(ui)
        if run.poll() is None:
            run.kill()
            run.wait()


def test_ui_binds_loopback_unless_host_given(home: Path, daemon: object) -> None:
    spawn_script(home, LIVE_RUN.replace('print("ready"', 'run.finish(); raise SystemExit; print('
                                        '"ready"')).wait(timeout=60)
    ui, url = start_ui(home, "--host", "0.0.0.0")
    try:
        assert listen_addrs(ui.pid) == {"0.0.0.0"}
        assert status_of(url.replace("0.0.0.0", "127.0.0.1")) == 200
    finally:
        stop(ui)
