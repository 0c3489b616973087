"""``ckptd ui``: a local, read-only web page of the runs (Starlette + uvicorn).

Safety: it listens on 127.0.0.1 unless ``--host`` says otherwise, and every
request (page, API, the vendored chart library) must carry the token printed
at start, as ``?token=`` (the first page load, which then sets an
``HttpOnly; SameSite=Strict`` cookie) or that cookie; anything else is 401.
The store is opened read-only per request (:class:`ckptd.store.query.Reader`), so
a page left open never holds a lock the daemon needs.

The URL is printed once the server has answered a request of its own (the
first request of a process pays for lazy imports and thread start-up; the
page's first chart should not).

Live updates: one task looks at ``PRAGMA data_version`` four times a second
(a read of a counter in the shared WAL index, no I/O) and tells every open
page through Server-Sent Events; the page then re-asks for what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ckptd.store.query import Reader, json_safe, printable, redact
from ckptd.views import series

STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 0.25
COOKIE = "ckptd_ui"


def make_app(home: Path, token: str,
             ready: Callable[[], Awaitable[None]] | None = None) -> Any:
    """The Starlette app; ``ready`` runs as a task once it serves."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Route

    changes = _Changes(home)

    class TokenGate:
        """Every request shows the token, or is refused before any route runs."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            req = Request(scope)
            given = req.query_params.get("token") or req.cookies.get(COOKIE) or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                await Response("401 unauthorized: open the URL with ?token=... that "
                               "`ckptd ui` printed\n", status_code=401,
                               media_type="text/plain")(scope, receive, send)
                return
            await self.app(scope, receive, send)

    def js(data: Any) -> JSONResponse:
        return JSONResponse(json_safe(data))

    def index(request: Request) -> Response:
        resp = HTMLResponse(PAGE)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = STATIC / name
        if name not in ("uplot.iife.min.js", "uplot.min.css"):
            return Response("not found", status_code=404)
        return FileResponse(path)

    def runs(request: Request) -> Response:
        with Reader(home) as reader:
            return js(series.run_rows(reader))

    def run(request: Request) -> Response:
        with Reader(home) as reader:
            info = reader.show(request.path_params["run"])
            info["keys"] = series.keys(reader, info["id"])
            info["markers"] = [m.__dict__ for m in series.markers(reader, info["id"])]
            lines, _ = reader.lines(info["id"], with_metrics=False, all_attempts=False)
        info["env"] = redact(info.get("env") or {})
        info["lines"] = [{"time": ln.time, "kind": ln.kind, "level": ln.level,
                          "message": printable(ln.message, lines=True)} for ln in lines[-200:]]
        return js(info)

    def chart(request: Request) -> Response:
        q = request.query_params
        buckets = min(max(int(q.get("buckets", "800")), 10), 4000)
        lo = int(float(q["lo"])) if q.get("lo") else None
        hi = int(float(q["hi"])) if q.get("hi") else None
        with Reader(home) as reader:
            run_id = reader.resolve(q.get("run"))["id"]
            s = series.downsample(reader, run_id, q["key"], buckets, lo, hi)
            out = s.as_json()
            out["markers"] = [m.__dict__ for m in series.markers(reader, run_id)]
            # a dot per 8 pixels at most, in the range shown (a zoom into an
            # old stretch has its checkpoints, not the newest ones)
            out["dots"] = series.checkpoint_dots(reader, run_id, q["key"], series.checkpoint_steps(
                reader, run_id, lo, hi, max(1, buckets // 8)))
        return js(out)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            seen = changes.version
            yield "retry: 1000\nevent: hello\ndata: {}\n\n"
            while not await request.is_disconnected():
                seen = await changes.wait(seen, timeout=15)
                yield f"event: change\ndata: {json.dumps({'v': seen})}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    from ckptd_client.errors import NotFound

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(changes.run())
        announce = asyncio.create_task(ready()) if ready is not None else None
        try:
            yield
        finally:
            task.cancel()
            if announce is not None:
                announce.cancel()

    return Starlette(routes=[
        Route("/", index), Route("/static/{name}", static), Route("/api/runs", runs),
        Route("/api/run/{run}", run), Route("/api/series", chart),
        Route("/api/events", events),
    ], middleware=[Middleware(TokenGate)], exception_handlers={NotFound: not_found},
        lifespan=lifespan)


class _Changes:
    """The store's commit counter, watched by one task for every open page."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.version = 0
        self._cond: asyncio.Condition | None = None

    async def run(self) -> None:
        self._cond = asyncio.Condition()
        reader = Reader(self.home)
        last = None
        try:
            while True:
                dv = reader.conn.execute("PRAGMA data_version").fetchone()[0]
                if last is not None and dv != last:
                    async with self._cond:
                        self.version += 1
                        self._cond.notify_all()
                last = dv
                await asyncio.sleep(POLL_S)
        finally:
            reader.close()

    async def wait(self, seen: int, timeout: float) -> int:
        if self._cond is None:
            await asyncio.sleep(POLL_S)
            return self.version
        async with self._cond:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._cond.wait_for(lambda: self.version != seen),
                                       timeout)
        return self.version


def serve(home: Path, host: str, port: int, out: Callable[[str], None],
          token: str | None = None) -> None:
    """Serve until Ctrl-C; prints the URL (with the token) and an ``ssh -L`` line."""
    import uvicorn

    token = token or secrets.token_urlsafe(24)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from ckptd_client.errors import CkptdError

        raise CkptdError(f"cannot listen on {host}:{port}: {exc.strerror}; "
                         "pick another with --port") from None
    # listening before the URL is printed: a browser or script that opens it
    # at once waits in the backlog instead of being refused
    sock.listen(128)
    port = sock.getsockname()[1]
    shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host

    async def announce() -> None:
        """Print the URL once the server has answered a request of its own: the
        first request of a new process paid 100-150 ms of lazy imports and
        thread start-up (the page's first chart with them), now nobody's."""
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(_warm_up(_local(host), port, token), timeout=10)
        out(f"ckptd ui: http://{shown}:{port}/?token={token}")
        out(f"from a laptop: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}  "
            f"then open http://localhost:{port}/?token={token}")
        sys.stdout.flush()

    config = uvicorn.Config(make_app(home, token, ready=announce), log_level="warning",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


def _local(host: str) -> str:
    """An address of this machine the server listens on (for its own request)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


async def _warm_up(host: str, port: int, token: str) -> None:
    """One request to the runs table over a real connection: what any request
    of this process will use is imported and started."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET /api/runs?token={token} HTTP/1.1\r\nHost: {host}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        while await reader.read(65536):
            pass
    finally:
        writer.close()


PAGE = (STATIC.parent / "page.html").read_text() if (STATIC.parent / "page.html").exists() \
    else ""
