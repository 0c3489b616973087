"""The ``ckptd`` command line: parse, make one library or daemon call, print.

No SQL and no file moves here. Errors a user can cause become one line on
stderr and a non-zero exit (``main`` maps ``CkptdError`` subclasses to exit
codes in one place); output works without a TTY, honours ``NO_COLOR``, and
a closed pipe (``ckptd tail -f | head``) ends the command quietly.

This package: the typer app, ``--home``, the output helpers, the error→exit
mapping and the everyday commands (here); one module per further command
group (``runs``: run/resume, ``ckpt``, ``service``, ``views``: watch/plot/ui,
``analysis``: sweep/compare/reproduce, ``export``, ``manage``: rm/rename/tag/
note/keys). May import: ``ckptd.store`` (read-only queries), ``ckptd.supervise``,
``ckptd.views``, ``ckptd.analysis``, ``ckptd.exports``, and the client's shared
modules; it talks to the daemon only over the socket (``ckptd_client.transport``),
except ``ckptd daemon``, which runs it in the foreground.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import itertools
import math
import os
import re
import shlex
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

try:  # typer >= 0.2x vendors its own click; its exceptions are not click's
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_exc
from ckptd_client import paths, transport
from ckptd_client.errors import CkptdError, DaemonUnavailable, UsageError

from ckptd import __version__
from ckptd.store import query
from ckptd.store.follow import follow, output_closed

EXIT_CODES = """Exit status: 0 done; 1 error; 2 usage error (bad option or argument, unknown
run); 3 no daemon (`status`: not running); 4 a checkpoint failed to write or
verify; 5 disk full; 6 resume refused (running or finished run, see --force).
`run` and `resume` exit with the training command's own status."""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, epilog=EXIT_CODES,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Crash-resilient experiment logger and checkpointing daemon.")
STATE: dict[str, Any] = {"home": None}
HOME_HELP = ("data home (default: $CKPTD_HOME, else $XDG_DATA_HOME/ckptd); "
             "goes before or after the command")


def _print_version(value: bool) -> None:
    if value:
        echo(f"ckptd {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True,
                                       callback=_print_version,
                                       help="print the version and exit")) -> None:
    """Crash-resilient experiment logger and checkpointing daemon."""


def home() -> Path:
    """The data home of this invocation: the last ``--home`` given, else the default;
    refused when it is not a directory, or when another user owns it (she could
    have swapped the store: ``ckptd resume`` would run her command)."""
    path = paths.checked_home(STATE["home"])
    if STATE.get("checked") != path:
        paths.secure_home(path, create=False)
        STATE["checked"] = path
    return path


def _set_home(value: str | None) -> None:
    if value is not None:
        STATE["home"] = value


def _home_option() -> Any:
    """The ``--home`` option as typer builds it (typer's click has no public Option)."""
    probe = typer.Typer()

    @probe.command()
    def _probe(home: str | None = typer.Option(None, "--home", metavar="DIR", help=HOME_HELP,
                                                callback=_set_home, expose_value=False),
               ) -> None:
        """Never run."""

    return typer.main.get_command(probe).params[0]


def build_command() -> Any:
    """The click command tree, with ``--home`` on every command and group.

    Users paste ``ckptd ls --home H`` as often as ``ckptd --home H ls``; one
    option added here (rather than a parameter on every function) keeps the
    two spellings, and each command's ``--help``, in step.
    """
    command = typer.main.get_command(app)
    option = _home_option()

    def walk(cmd: Any) -> None:
        cmd.rich_markup_mode = None  # plain help: flags read `--json`, not `--json <bool>`
        cmd.params.append(option)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(command)
    return command


# ------------------------------------------------------------------ output

def color_enabled() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and \
        os.environ.get("TERM") != "dumb"


COLORS = {"warning": "33", "error": "31", "critical": "31;1", "stderr": "31", "metric": "36",
          "status": "35", "debug": "2"}


def paint(text: str, level: str) -> str:
    code = COLORS.get(level)
    return f"\x1b[{code}m{text}\x1b[0m" if code and color_enabled() else text


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def fmt_num(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    return str(v)


def format_line(line: query.Line) -> str:
    """One ``tail`` line; what the run wrote is made printable before colour is added."""
    text = _plain_line(line)
    return paint(text, "metric" if line.kind == "log" else
                 "status" if line.kind == "status" else line.level)


def _plain_line(line: query.Line) -> str:
    safe = query.printable
    stamp = dt.datetime.fromtimestamp(line.time).strftime("%H:%M:%S.%f")[:-3]
    if line.kind == "log":
        body = "  ".join(f"{k}={fmt_num(v)}" for k, v in (line.fields or {}).items())
        return safe(f"{stamp} step {line.step}  {line.message + ' ' if line.message else ''}"
                    f"{body}")
    if line.kind == "console":
        return f"{stamp} | {safe(line.message)}"
    if line.kind == "status":
        return f"{stamp} -- {safe(line.message)}"
    extra = ""
    if line.fields:
        extra = "  " + " ".join(f"{k}={v}" for k, v in line.fields.items())
    return safe(f"{stamp} {line.level.upper():<7} {line.message}{extra}")


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[query.printable(r[c]) if r.get(c) is not None else "-" for c in columns]
             for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    heads = [query.printable(c.upper()) for c in columns]  # metric keys are column names
    widths = [max(w, len(h)) for w, h in zip(widths, heads, strict=True)]
    echo("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip())
    for row in cells:
        echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def emit_json(value: Any) -> None:
    echo(query.to_json(value, indent=2))


# ----------------------------------------------------------------- daemon

@app.command()
def daemon(max_concurrent_resumes: int | None = typer.Option(
        None, "--max-concurrent-resumes", min=1,
        help="auto-resumed runs starting up at once (default 2, or "
             "$CKPTD_MAX_CONCURRENT_RESUMES); the others wait, `queued`")) -> None:
    """Run the daemon in the foreground (what systemd runs)."""
    from ckptd.daemon.server import run_foreground

    raise typer.Exit(run_foreground(home(), max_concurrent_resumes))


@app.command()
def start() -> None:
    """Start the daemon in the background if none is running for this home."""
    s = transport.connect_or_start(home())
    s.close()
    info = transport.call(home(), "status", autostart=False)
    echo(f"ckptd daemon running (pid {info['pid']}) for {info['home']}")


@app.command()
def stop(timeout: float = typer.Option(60.0, help="seconds to wait for a clean stop"),
         force: bool = typer.Option(False, "--force",
                                    help="stop even while runs are connected (they restart "
                                         "a daemon at once)")) -> None:
    """Stop the daemon: it commits everything queued, then exits (refused while runs
    are connected, unless --force)."""
    try:
        info = transport.call(home(), "stop", {"force": force}, autostart=False)
    except DaemonUnavailable:
        echo("ckptd daemon is not running")
        return
    sock = paths.socket_path(home())
    deadline = time.monotonic() + timeout
    # The socket goes first, the store is closed last: wait for the process
    # itself, or "stopped" would be said while it still commits (found by
    # tests/faults/test_security.py: a store copied right after `stop` was stale).
    from ckptd.daemon.liveness import process_alive  # here: psutil stays out of other commands

    pid = info.get("stopping")
    while (sock.exists() or process_alive(pid, None)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if sock.exists() or process_alive(pid, None):
        raise CkptdError(f"stop: daemon pid {info['stopping']} did not exit within {timeout} s")
    echo(f"ckptd daemon stopped (pid {info['stopping']})")
    if info.get("connected"):
        from ckptd.daemon.control import describe

        print(f"ckptd: warning: {len(info['connected'])} run(s) were connected "
              f"({describe(info['connected'])}); their clients start a new daemon",
              file=sys.stderr)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Say whether the daemon for this home is running (exit 3 when not)."""
    try:
        info = transport.call(home(), "status", autostart=False, timeout=10)
    except DaemonUnavailable:
        info = {"running": False, "pid": None, "home": os.fspath(home()),
                "socket": os.fspath(paths.socket_path(home())), "version": __version__}
    if as_json:
        emit_json({k: info.get(k) for k in ("running", "pid", "home", "socket", "version")})
    elif info["running"]:
        echo(f"running  pid {info['pid']}  home {info['home']}  socket {info['socket']}")
    else:
        echo(f"not running  home {info['home']}")
    if not info["running"]:
        raise typer.Exit(3)


# ------------------------------------------------------------------- runs

@app.command("ls")
def ls(status: str | None = typer.Option(None, "--status", help="only runs in this state"),
       group: str | None = typer.Option(None, "--group", help="only runs in this group"),
       project: str | None = typer.Option(None, "--project", help="only runs of this project"),
       tag: list[str] = typer.Option([], "--tag", help="only runs with this tag (repeatable: "
                                     "all of them)"),
       name: str | None = typer.Option(None, "--name", help="only runs whose name matches "
                                       "this glob, e.g. 'lr-*'"),
       where: str | None = typer.Option(None, "--where", help="only runs where KEY OP VALUE "
                                        "holds (clauses joined by `and`; KEY is config.PATH, "
                                        "a run field or a metric's last value), e.g. "
                                        "'config.lr<1e-3 and loss<0.5'"),
       columns: str | None = typer.Option(None, "--columns", help="extra columns, e.g. "
                                          "config.lr,loss"),
       as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List runs, oldest first."""
    from ckptd.store import runfilter

    if status and status not in ("running", "finished", "failed", "interrupted", "queued"):
        raise UsageError(f"unknown status {status!r}; use running, finished, failed, "
                         "interrupted or queued")
    clauses = runfilter.parse_where(where) if where else []
    extra = [c.strip() for c in columns.split(",") if c.strip()] if columns else []
    try:
        reader = query.Reader(home())
    except query.NotFound:
        if as_json:
            emit_json([])
        else:
            echo("no runs yet")
        return
    with reader:
        rows = runfilter.list_runs(
            reader, status=status, group=group, project=project, tags=tag, name=name, where=clauses,
            with_last=as_json or runfilter.needs_last([c.key for c in clauses] + extra))
        ranks = [reader.rank_processes(r["id"], r["attempt"]) if r["world_size"] > 1 else []
                 for r in rows]
    if as_json:
        emit_json(rows)
        return
    shown = [r | {"started": fmt_time(r["started"]), "ended": fmt_time(r["ended"]),
                  "tags": " ".join(r["tags"]) or None}
             | {c: runfilter.cell(r, c) for c in extra} for r in rows]
    for r, procs in zip(shown, ranks, strict=True):
        if r["world_size"] > 1:  # live rank processes / world size, and their nodes
            r["ranks"] = f"{sum(p['alive'] for p in procs)}/{r['world_size']}"
            r["hosts"] = ",".join(sorted({p["host"] for p in procs if p["host"]})) or None
    table(shown, ["id", "name", "status", "attempt", "step", "started", "ended",
                  *(["ranks", "nodes", "hosts"] if any(r["world_size"] > 1 for r in rows)
                    else []),
                  *(["tags"] if any(r["tags"] for r in rows) else []), *extra])


@app.command()
def show(run: str | None = typer.Argument(None, help="run id, unique prefix or name"),
         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show one run: command, provenance, attempts, checkpoints."""
    with query.Reader(home()) as reader:
        info = reader.show(run)
    if as_json:
        emit_json(info)
        return
    say = _say
    for key in ("id", "name", "status", "attempt", "step", "project", "group", "tags", "note",
                "seed", "cwd", "reason",
                "exit_code", "signal_name", "auto_resume", "restarts", "max_restarts"):
        label = "signal" if key == "signal_name" else key
        value = " ".join(info[key]) or None if key == "tags" else info.get(key)
        say(f"{label + ':':<13} {value if value is not None else '-'}")
    say(f"{'started:':<13} {fmt_time(info['started'])}")
    say(f"{'ended:':<13} {fmt_time(info['ended'])}")
    if info["world_size"] > 1 or info["ranks"] or info["nodes"] > 1:
        say(f"{'world size:':<13} {info['world_size']}")
        say(f"{'nodes:':<13} {info['nodes']}: " + (
            "this store is node 0's: it owns the run and its checkpoints"
            if not info.get("node_rank") else
            f"this store is node {info['node_rank']}'s (its ranks' metrics and console); "
            "the run and its checkpoints are in node 0's store"))
        say(f"{'hosts:':<13} {' '.join(info['hosts']) or '-'}")
        say(f"ranks of this node (attempt {info['attempt']}):")
        for r in info["ranks"]:
            state = "alive" if r["alive"] else f"ended {fmt_time(r['ended'])}"
            say(f"  rank {r['rank']}: {r['host'] or '-'} pid {r['pid']}  {state}, last seen "
                f"{fmt_time(r['last_seen'])}")
    if info.get("command"):
        say(f"{'command:':<13} {shlex.join(info['command'])}")
    if info.get("retention"):
        say(f"{'retention:':<13} {query.to_json(info['retention'])}")
    prov = info.get("provenance") or {}
    if prov:
        say("provenance:")
        for k, v in prov.items():
            if k != "git_diff":
                say(f"  {k}: {v}")
    if info["attempts"]:
        say("attempts:")
        for a in info["attempts"]:
            ended_by = f"  by {a['signal_name']}" if a.get("signal_name") else ""
            say(f"  #{a['attempt']} {a['status']}{ended_by}  started {fmt_time(a['started'])}"
                f"  ended {fmt_time(a['ended'])}" + _restored_note(a.get("restored_step")))
    if info["checkpoints"]:
        say("checkpoints:")
        for c in info["checkpoints"]:
            say(f"  step {c['step']}  {c['status']}  {c['bytes'] or 0} bytes")
    if info.get("traceback"):
        say("traceback:")
        echo(query.printable(info["traceback"].rstrip(), lines=True))


def _say(text: str) -> None:
    """One line of human-readable output with what a run wrote in it."""
    echo(query.printable(text))


def _restored_note(step: int | None) -> str:
    if step is None:
        return ""
    return f"  resumed after checkpoint step {step}" if step >= 0 else \
        "  started over (no checkpoint)"


@app.command()
def tail(
    run: str | None = typer.Argument(None, help="run id, prefix or name (default: newest)"),
    follow_: bool = typer.Option(False, "-f", "--follow",
                                 help="keep printing new lines until the run ends (and "
                                      "through a pending auto-resume)"),
    n: int = typer.Option(20, "-n", help="how many lines to print first"),
    metrics: bool = typer.Option(False, "--metrics", help="include logged metrics"),
    grep: str | None = typer.Option(None, "--grep", help="only lines matching this regex"),
    all_attempts: bool = typer.Option(False, "--all-attempts",
                                      help="include lines superseded by a resume"),
    rank_: str = typer.Option("0", "--rank", help="which rank's lines: N or all"),
) -> None:
    """Print a run's events and console output (with --metrics, its metrics too)."""
    rank = parse_rank(rank_)
    try:
        pattern = re.compile(grep) if grep else None
    except re.error as exc:
        raise UsageError(f"--grep {grep!r} is not a valid regular expression: {exc}") from None
    if n < 0:
        raise UsageError("-n must be >= 0")
    with query.Reader(home()) as reader:
        info = reader.resolve(run)
        lines, cursor = reader.tail(
            info["id"], n, with_metrics=metrics, all_attempts=all_attempts, rank=rank,
            keep=(lambda ln: bool(pattern.search(format_line(ln)))) if pattern else None)
        for line in lines:
            echo(format_line(line))
        sys.stdout.flush()
        if not follow_:
            return
        with ctrl_c_stops(reader) as stop:
            try:
                for line in follow(reader, info["id"], cursor, with_metrics=metrics,
                                   all_attempts=all_attempts, until_done=True, stop=stop,
                                   out_fd=sys.stdout.fileno(), rank=rank):
                    text = format_line(line)
                    if pattern and not pattern.search(text):
                        continue
                    echo(text)
                    sys.stdout.flush()
            except sqlite3.OperationalError:
                if not stop.is_set():
                    raise  # not our interrupt


@contextlib.contextmanager
def ctrl_c_stops(reader: query.Reader) -> Iterator[threading.Event]:
    """Make Ctrl-C end ``tail -f`` at once, with status 0.

    Ctrl-C only sets ``stop`` (the follow loop ends at its next look), so
    no KeyboardInterrupt lands at an arbitrary point of the loop, the store
    reader or the output. And since Python runs a SIGINT handler only
    between bytecodes, a Ctrl-C that lands while SQLite waits inside C (its
    busy handler may wait up to the reader's 30 s busy_timeout) is answered
    by a thread woken through the signal wake-up pipe, which interrupts the
    query (SQLite allows that from any thread). Why: a CI run saw `tail -f`
    ignore SIGINT for 15 s; where it waited was not captured, and these are
    the two places a Python process can sit out a SIGINT.
    """
    stop = threading.Event()
    r, w = os.pipe()
    os.set_blocking(w, False)

    def watch() -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data or stop.is_set():
                return
            if signal.SIGINT in data:
                stop.set()
                reader.conn.interrupt()
                return

    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="ckptd-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_handler)
        if not stop.is_set():
            stop.set()
            os.write(w, b"\0")  # wakes the watcher, which sees stop and returns
        watcher.join(timeout=1.0)
        os.close(w)
        os.close(r)


def parse_rank(text: str) -> int | None:
    """``--rank``: a rank number, or ``all`` (None)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise CkptdError(f"--rank {text!r} must be a rank number (0, 1, ...) or 'all'")
    return int(text)


@app.command("metrics")
def metrics_cmd(
    run: str | None = typer.Argument(None, help="run id, prefix or name (default: newest)"),
    key: str | None = typer.Option(None, "--key", help="only this metric"),
    fmt: str = typer.Option("table", "--format", help="table, csv or jsonl"),
    all_attempts: bool = typer.Option(False, "--all-attempts",
                                      help="include values superseded by a resume"),
    rank_: str = typer.Option("0", "--rank", help="which rank's values: N or all "
                              "(jsonl/csv rows then carry \"rank\")"),
) -> None:
    """Print a run's metrics: the effective timeline unless --all-attempts."""
    rank = parse_rank(rank_)
    if fmt not in ("table", "csv", "jsonl"):
        raise UsageError(f"--format {fmt!r} is not one of table, csv, jsonl")
    with query.Reader(home()) as reader:
        info = reader.resolve(run)
        # rows stream from the store to stdout as they are read (`| head` gets
        # its first line at once; memory stays constant on any run length)
        rows = reader.iter_metrics(info["id"], key, all_attempts, rank=rank)
        first = next(rows, None)
        if key is not None and first is None:
            known = reader.keys(info["id"])
            if key not in known:
                raise query.UnknownKey(
                    f"run {info['id']} has no metric {key!r}; its keys: "
                    + (", ".join(map(repr, known)) or "none (nothing logged yet)"))
        rows = itertools.chain([first] if first is not None else [], rows)
        if fmt != "table":
            _write_rows(rows, fmt, list(first) if first is not None
                        else ["step", "key", "value", "attempt", "time"])
            return
        steps: dict[tuple[int, int], dict[str, Any]] = {}
        keys: list[str] = []
        for r in rows:
            who = r.get("rank", 0)
            steps.setdefault((r["step"], who), {"step": r["step"], "rank": who})[r["key"]] = \
                fmt_num(r["value"])
            if r["key"] not in keys:
                keys.append(r["key"])
    table(list(steps.values()), ["step", *(["rank"] if rank is None else []), *keys])


def _write_rows(rows: Iterator[dict[str, Any]], fmt: str, fields: list[str]) -> None:
    """``metrics --format csv|jsonl``: each row written as it comes."""
    if fmt == "jsonl":
        for line in query.iter_jsonl(rows):
            echo(line)
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow(r | {"key": query.printable(r["key"])})


@app.command()
def demo(steps: int = typer.Option(300, help="training steps")) -> None:
    """Train a small model with ckptd end to end and show where to look."""
    from ckptd.demo import run_demo

    run_demo(home(), steps=steps, out=echo)


def _register_subcommands() -> None:
    """The command groups, one module each: this list is what the CLI has beyond
    the commands above (daemon, status, ls, show, tail, metrics, demo)."""
    from ckptd.cli import analysis, ckpt, export, manage, runs, service, views

    for module in (ckpt, runs, service, views, analysis, export, manage):
        module.register(app)


_register_subcommands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line and an exit code for every user error."""
    command = build_command()
    try:
        rv = command.main(args=argv, prog_name="ckptd", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except click_exc.NoArgsIsHelpError as exc:
        # bare `ckptd`, `ckptd ckpt`: the help, once, where `| less` sees it
        echo(exc.format_message())
        code = 2
    except click_exc.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except typer.Abort:
        code = 130
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 0
    except SystemExit as exc:
        # click turns a write to a closed stdout (EPIPE) into sys.exit(1)
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except CkptdError as exc:
        print(f"ckptd: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except OSError as exc:
        if exc.errno == 28:
            print(f"ckptd: error: disk full: {exc}", file=sys.stderr)
        else:
            print(f"ckptd: error: {exc}", file=sys.stderr)
        code = 1
    if not _stdout_ok() or output_closed(sys.__stdout__.fileno()):
        # a closed pipe (`| head`) must end quietly: no "Exception ignored" at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        code = 0 if code in (0, 1) else code
    sys.exit(code)


def _stdout_ok() -> bool:
    try:
        sys.stdout.flush()
        return True
    except (BrokenPipeError, ValueError):
        return False
