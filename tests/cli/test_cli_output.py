"""What the command line writes: safe for a terminal, valid JSON, helpful errors.

Run names, projects, events, console lines and metric keys come from
training scripts; written raw they can set the terminal title, write the
clipboard (OSC 52), move the cursor or fake extra ``ls`` rows. JSON output
must parse with a strict RFC 8259 parser (no bare NaN/Infinity).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ckptd_client import paths
from helpers import ckptd, home_with_runs

#: What a terminal acts on: ESC (OSC title/clipboard, cursor moves), BEL, CR,
#: LF, DEL, a C1 CSI, and a bidi override.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
EVIL = "evil\x1b]0;pwned\x07\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\r\nfake-row\u202etxt\x9b1A"

HOSTILE = f"""
    import ckptd_client as ckptd
    evil = {EVIL!r}
    with ckptd.init(project=evil, name=evil, config={{"x": float("nan")}}) as run:
        run.log({{evil: 1.0, "loss": float("nan"), "big": float("inf"),
                  "small": float("-inf")}}, step=0)
        run.event(evil, level="warning", detail=evil)
        print(evil, flush=True)
"""


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield home_with_runs(tmp_path_factory.mktemp("hostile"), HOSTILE)


def no_raw_controls(text: str) -> None:
    found = RAW.findall(text)
    assert not found, f"raw control characters reach the terminal: {found!r} in {text!r}"


@pytest.mark.parametrize("args", [["ls"], ["show"], ["tail", "-n", "50", "--metrics"],
                                  ["metrics"], ["metrics", "--format", "csv"],
                                  ["ckpt", "ls"]])
def test_hostile_names_and_events_are_escaped(hostile_home: Path, args: list[str]) -> None:
    proc = ckptd(hostile_home, *args, check=True)
    no_raw_controls(proc.stdout)
    no_raw_controls(proc.stderr)


def test_escaped_text_is_still_shown(hostile_home: Path) -> None:
    out = ckptd(hostile_home, "ls", check=True).stdout
    assert len(out.strip().splitlines()) == 2  # header + one run: no fake row
    assert "\\x1b]52;c;" in out and "\\u202e" in out
    tail = ckptd(hostile_home, "tail", "-n", "50").stdout
    assert tail.count("evil\\x1b]0;pwned") >= 2  # the event and the console line


def strict_loads(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not RFC 8259 JSON: bare {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_rfc8259(hostile_home: Path) -> None:
    rows = [strict_loads(line) for line in
            ckptd(hostile_home, "metrics", "--format", "jsonl", check=True).stdout.splitlines()]
    values = {r["key"]: r["value"] for r in rows}
    assert values["loss"] == "NaN" and values["big"] == "Infinity"
    assert values["small"] == "-Infinity" and values[EVIL] == 1.0
    show = strict_loads(ckptd(hostile_home, "show", "--json", check=True).stdout)
    assert show["name"] == EVIL and show["config"] == {"x": "NaN"}
    for args in (["ls", "--json"], ["ckpt", "ls", "--json"], ["status", "--json"]):
        strict_loads(ckptd(hostile_home, *args).stdout)


def test_metrics_key_typo_names_the_keys(hostile_home: Path) -> None:
    proc = ckptd(hostile_home, "metrics", "--key", "Loss")
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "'Loss'" in err and "'loss'" in err, err
    no_raw_controls(err)


def test_version_short_help_and_plain_flags(tmp_path: Path) -> None:
    home = tmp_path / "h"
    from ckptd import __version__

    assert ckptd(home, "--version").stdout.strip() == f"ckptd {__version__}"
    for args in (["-h"], ["ls", "-h"], ["ckpt", "ls", "-h"]):
        proc = ckptd(home, *args)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (args, proc.stderr)
    help_text = ckptd(home, "ls", "--help").stdout
    assert "--json " in help_text and "<bool>" not in help_text
    assert "--home" in help_text


@pytest.mark.parametrize("args", [[], ["ckpt"], ["service"]])
def test_bare_groups_print_their_help_once(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True,
                          text=True, env={**os.environ, "CKPTD_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).count("Usage:") == 1, proc.stdout + proc.stderr
    assert "Exit status" in ckptd(tmp_path, "--help").stdout


def test_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-dir"
    bad.write_text("x")
    for args in (["ls"], ["ls", "--json"], ["show"]):
        proc = ckptd(bad, *args)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "not a directory" in proc.stderr
    client = subprocess.run(
        [sys.executable, "-c", "import ckptd_client as c\ntry:\n c.init()\n"
         "except c.CkptdError as e:\n print('clean', e)"],
        capture_output=True, text=True, env={**os.environ, "CKPTD_HOME": str(bad)})
    assert client.stdout.startswith("clean") and "not a directory" in client.stdout, \
        client.stdout + client.stderr


def test_home_after_the_subcommand_wins(tmp_path: Path, hostile_home: Path) -> None:
    env = {**os.environ, "CKPTD_HOME": str(tmp_path / "elsewhere")}
    for args in (["ls", "--home", str(hostile_home)], ["--home", str(hostile_home), "ls"],
                 ["ckpt", "--home", str(hostile_home), "ls"]):
        proc = subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0 and "no runs yet" not in proc.stdout, (args, proc.stderr)
    assert not paths.db_path(tmp_path / "elsewhere").exists()


def test_tail_follow_of_an_ended_run_prints_and_exits(hostile_home: Path) -> None:
    proc = ckptd(hostile_home, "tail", "-f", timeout=20)  # main: followed forever
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].endswith("finished"), \
        proc.stdout + proc.stderr


def test_show_has_max_restarts_and_signal_names(hostile_home: Path) -> None:
    info = strict_loads(ckptd(hostile_home, "show", "--json", check=True).stdout)
    assert "max_restarts" in info and "signal_name" in info
    assert all("signal_name" in a for a in info["attempts"])
    text = ckptd(hostile_home, "show", check=True).stdout
    assert re.search(r"^max_restarts: +-$", text, re.M) and re.search(r"^signal: +-$", text,
                                                                      re.M)
