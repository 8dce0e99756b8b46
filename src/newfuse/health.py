"""The probe and scrape endpoints of a long-running process: /healthz, /readyz, /metrics.

- `GET /healthz`: 200 `ok` while the event loop answers (liveness).
- `GET /readyz`: 200 when every readiness check passes, else 503; one line per check,
  `<name> ok` or `<name> not ready: <reason>`. Checks run concurrently, each within a timeout.
- `GET /metrics`: the Prometheus text exposition format (what `metrics()` returns).

HTTP/1.1 with `Connection: close`, GET and HEAD only: what kubelet probes and a Prometheus
scraper send. A leaf: it imports only other leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from newfuse._closing import AsyncClosing
from newfuse.config import split_address
from newfuse.errors import HealthServerError

log = logging.getLogger("newfuse.health")

Check = Callable[[], Awaitable[str | None]]
"""A readiness check: None when ready, else why not (raising or timing out also means not)."""

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 8192
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer(AsyncClosing):
    """Serves /healthz, /readyz and /metrics on `address` until closed.

    Example:
        async with await HealthServer("127.0.0.1:0", checks={"nats": nats_ok}).start() as health:
            print(health.url)

    Args:
        address: `host:port`; port 0 takes a free port (see `port` once started).
        checks: readiness checks by name.
        metrics: returns the /metrics body; None answers 404 there.
        check_timeout: seconds each readiness check may take before it counts as not ready.
        request_timeout: seconds a client has to send its request.
    """

    def __init__(
        self,
        address: str,
        *,
        checks: Mapping[str, Check] | None = None,
        metrics: Callable[[], bytes] | None = None,
        check_timeout: float = 2.0,
        request_timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.checks: dict[str, Check] = dict(checks or {})
        self.metrics = metrics
        self.check_timeout = check_timeout
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """`http://host:port` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> HealthServer:
        """Listen on the address (idempotent).

        Raises:
            HealthServerError: the address cannot be bound (in use, not an address of this host).
        """
        if self._server is None:
            try:
                self._server = await asyncio.start_server(
                    self._serve, self.host, self.port, limit=_MAX_REQUEST
                )
            except OSError as error:
                raise HealthServerError(address=self.address, reason=str(error)) from error
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def readiness(self) -> dict[str, str | None]:
        """Every check's result now: None when ready, else the reason."""

        async def run(check: Check) -> str | None:
            try:
                async with asyncio.timeout(self.check_timeout):
                    return await check()
            except TimeoutError:
                return f"no answer within {self.check_timeout:g}s"
            except Exception as error:
                return f"{type(error).__name__}: {error}"

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[name]) for name in names))
        return dict(zip(names, results, strict=True))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            async with asyncio.timeout(self.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path = _request_line(head)
            status, content_type, body = await self._respond(method, path)
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that sent no (or no sane) request gets no answer
        except ConnectionError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET and HEAD\n"
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            results = await self.readiness()
            lines = [
                f"{name} ok" if reason is None else f"{name} not ready: {reason}"
                for name, reason in results.items()
            ]
            ready = all(reason is None for reason in results.values())
            return (200 if ready else 503), text, "\n".join(lines).encode() + b"\n"
        if path == "/metrics" and self.metrics is not None:
            return 200, PROMETHEUS_CONTENT_TYPE, self.metrics()
        return 404, text, b"try /healthz, /readyz or /metrics\n"

    async def close(self) -> None:
        """Stop listening and end the requests being answered. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients)
        await server.wait_closed()


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, path without query) of an HTTP/1.x request head; ValueError if it is not one."""
    method, target, version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not HTTP/1.x: {version!r}")
    return method, target.split("?", 1)[0]
