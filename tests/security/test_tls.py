"""TLS between clients and nats-server, on real servers with certificates the tests make.

A nats-server runs with a certificate of a throwaway CA (`make_certificates`); the server's own
monitoring (`/connz`) says which connections are TLS, so "it is TLS" is the server's word, not
the client's. Refusals are checked by their error: a wrong CA, a certificate for another host,
a server without TLS where TLS was asked, a client that speaks plain text to a TLS server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import stat
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from newfuse.agents import AgentClient
from newfuse.cli.auth import DEV_SERVER_NAME, write_dev_config
from newfuse.config import load_settings
from newfuse.errors import (
    ConfigError,
    ConnectionLostError,
    PermissionDeniedError,
    UntrustedServerError,
)
from newfuse.eventstore import NO_STREAM, open_event_store
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import NatsServer, connect
from newfuse.nats.connection import Credentials
from newfuse.nats.tls import Certificates, client_context, make_certificates
from newfuse.schemas import NewEvent
from newfuse.security.identities import IdentityStore
from support import (
    dev_environment,
    new_prefix,
    run_fuse,
    start_echo_agent,
    start_fuse_dev,
    wait_for,
)


@dataclass(frozen=True)
class TLSServer:
    server: NatsServer
    certificates: Certificates

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def connections(self) -> list[dict[str, Any]]:
        """The server's client connections as its monitoring endpoint lists them."""
        url = f"http://127.0.0.1:{self.server.monitor_port}/connz"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        listed: list[dict[str, Any]] = json.loads(body)["connections"] or []
        return listed

    async def tls_version_of(self, name: str) -> str | None:
        """The TLS version the server negotiated with the connection named `name`."""
        for connection in await self.connections():
            if connection.get("name") == name:
                version: str | None = connection.get("tls_version")
                return version
        raise AssertionError(f"no connection named {name!r} on the server")


@pytest.fixture(scope="module")
async def tls(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TLSServer]:
    folder = tmp_path_factory.mktemp("tls")
    certificates = make_certificates(folder / "certs")
    server = NatsServer(data_dir=folder / "nats", monitor_port=-1, tls=certificates)
    async with server:
        yield TLSServer(server, certificates)


def test_certificates_are_owner_only_and_name_the_hosts(tmp_path: Path) -> None:
    made = make_certificates(tmp_path, hosts=("127.0.0.1", "bus.example.test"))
    for path in (made.ca, made.cert, made.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in made.key.read_bytes()
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in (made.ca, made.cert))
    assert Certificates.existing(tmp_path) == made
    made.cert.unlink()
    assert Certificates.existing(tmp_path) is None


async def test_an_event_store_appends_and_reads_over_tls(tls: TLSServer) -> None:
    assert tls.server.url.startswith("tls://")
    prefix = new_prefix()
    async with await JetStreamEventStore.connect(
        tls.server.url, prefix=prefix, ca=tls.certificates.ca, name="tls-store"
    ) as store:
        await store.append("agent.t1", [NewEvent(type="note", data={"n": 1})], NO_STREAM)
        records = [record async for record in store.read("agent.t1")]
        assert [record.data for record in records] == [{"n": 1}]
        assert (await tls.tls_version_of("tls-store") or "").startswith("1.")


async def test_a_nats_url_with_a_ca_is_upgraded_to_tls(tls: TLSServer) -> None:
    nc = await connect(f"nats://127.0.0.1:{tls.port}", name="upgraded", ca=tls.certificates.ca)
    try:
        assert (await tls.tls_version_of("upgraded") or "").startswith("1.")
    finally:
        await nc.close()


async def test_a_server_signed_by_another_ca_is_untrusted_at_once(
    tls: TLSServer, tmp_path: Path
) -> None:
    other = make_certificates(tmp_path / "other")
    # a timeout far beyond the test's: waiting it out would be a ConnectionLostError instead
    with pytest.raises(UntrustedServerError, match="unable to get local issuer") as refused:
        await connect(tls.server.url, ca=other.ca, timeout=100)
    assert refused.value.url == tls.server.url
    assert refused.value.ca == str(other.ca)
    assert str(other.ca) in str(refused.value) and "FUSE_NATS_CA" in str(refused.value)
    assert not refused.value.retryable


async def test_a_certificate_for_another_host_is_untrusted(tmp_path: Path) -> None:
    elsewhere = make_certificates(tmp_path / "certs", hosts=("bus.example.test",))
    async with NatsServer(data_dir=tmp_path / "nats", tls=elsewhere) as server:
        with pytest.raises(UntrustedServerError, match="mismatch"):
            await connect(server.url, ca=elsewhere.ca, timeout=100)


async def test_a_client_without_the_ca_is_refused(tls: TLSServer) -> None:
    """Without a CA the certificate is checked against the system's CAs, which never signed a
    throwaway one; the error says where the CA comes from."""
    with pytest.raises(UntrustedServerError, match="system's CAs") as refused:
        await connect(f"nats://127.0.0.1:{tls.port}", timeout=100)
    assert refused.value.ca is None


async def test_the_tls_server_refuses_a_client_that_speaks_plain_text(tls: TLSServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tls.port)
    try:
        info = json.loads((await reader.readline()).split(b" ", 1)[1])
        assert info["tls_required"] is True
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        async with asyncio.timeout(30):
            answer = await reader.read()  # until the server closes the connection
    finally:
        writer.close()
    assert b"PONG" not in answer


async def test_a_server_without_tls_is_refused_where_tls_was_asked(
    tls: TLSServer, nats_server: NatsServer
) -> None:
    plain = f"nats://127.0.0.1:{nats_server.port}"
    with pytest.raises(UntrustedServerError, match="offers no TLS"):
        await connect(plain, ca=tls.certificates.ca)
    with pytest.raises(UntrustedServerError, match="offers no TLS"):
        await connect(f"tls://127.0.0.1:{nats_server.port}")


async def test_credentials_and_tls_together_and_a_reload_keeps_tls(tmp_path: Path) -> None:
    """Identities over TLS: the credentials file carries its CA (relative to itself), the
    server still refuses an anonymous client, and an identity added with a reload (SIGHUP, as
    `fuse auth add` does) connects over TLS: the reload kept the included TLS block."""
    certificates = make_certificates(tmp_path / "certs")
    identities = IdentityStore(tmp_path / "auth")
    identities.add("admin", "admin")
    config = tmp_path / "auth.conf"
    # as a secure `fuse dev` writes it: a reload refuses a file without the server's name
    write_dev_config(config, identities, "fuse", DEV_SERVER_NAME)
    server = NatsServer(
        data_dir=tmp_path / "nats", monitor_port=-1, config=config, tls=certificates
    )
    async with server:
        served = TLSServer(server, certificates)
        carried = tmp_path / "carried"
        carried.mkdir()
        (carried / "ca.pem").write_bytes(certificates.ca.read_bytes())
        replace(identities.credentials("admin"), ca="ca.pem").save(carried / "admin.creds")
        admin = Credentials.load(carried / "admin.creds")
        assert admin.ca == str(carried / "ca.pem")

        async with await JetStreamEventStore.connect(
            server.url, prefix=new_prefix(), credentials=admin, name="tls-admin"
        ) as store:
            await store.append("agent.c1", [NewEvent(type="note", data={"by": "admin"})])
            assert [r.data async for r in store.read("agent.c1")] == [{"by": "admin"}]
            assert (await served.tls_version_of("tls-admin") or "").startswith("1.")

        with pytest.raises(PermissionDeniedError, match="anonymous"):
            await connect(server.url, ca=certificates.ca)

        identities.add("later", "service")
        write_dev_config(config, identities, "fuse", DEV_SERVER_NAME)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGHUP)
        later = identities.credentials("later")

        async def later_is_let_in() -> bool:
            # refused until the reload: nats-py retries a refusal until the timeout, which a
            # loaded machine may pass before the server said why (then it is unreachable)
            try:
                nc = await connect(server.url, credentials=later, ca=certificates.ca, timeout=2)
            except (PermissionDeniedError, ConnectionLostError):
                return False
            await nc.close()
            return True

        await wait_for(later_is_let_in, timeout=60)
        nc = await connect(server.url, name="later", credentials=later, ca=certificates.ca)
        try:
            assert (await served.tls_version_of("later") or "").startswith("1.")
        finally:
            await nc.close()


async def test_refused_tls_connects_end_on_a_busy_event_loop(tmp_path: Path) -> None:
    """Anonymous connects to a TLS server that asks for an identity, while other tasks keep
    the event loop busy: each ends in PermissionDeniedError. (nats-py's close of such a client
    was seen to wait forever for its transport; `connect` bounds that wait.)"""
    certificates = make_certificates(tmp_path / "certs")
    identities = IdentityStore(tmp_path / "auth")
    identities.add("admin", "admin")
    config = tmp_path / "auth.conf"
    write_dev_config(config, identities, "fuse", DEV_SERVER_NAME)

    async def busy(seed: int) -> None:
        pauses = random.Random(seed)  # fixed: the same run each time
        while True:
            time.sleep(pauses.random() / 100)  # blocks the loop, as CPU-bound handlers would
            await asyncio.sleep(0)

    hogs = [asyncio.create_task(busy(seed)) for seed in (1, 2, 3)]
    try:
        async with NatsServer(data_dir=tmp_path / "nats", config=config, tls=certificates) as s:
            for attempt in range(12):
                refused = asyncio.create_task(connect(s.url, ca=certificates.ca, timeout=1))
                done, _ = await asyncio.wait((refused,), timeout=60)
                assert done, f"connect {attempt} did not end"  # else left to run: it is stuck
                with pytest.raises(PermissionDeniedError, match="anonymous"):
                    refused.result()
    finally:
        for hog in hogs:
            hog.cancel()
        await asyncio.wait(hogs)
    assert all(hog.cancelled() for hog in hogs), "the busy tasks ran to the end"


async def test_fuse_nats_ca_is_the_ca_of_the_api_and_the_cli(
    tls: TLSServer, tmp_path: Path
) -> None:
    prefix = new_prefix()
    environ = {"FUSE_NATS_URL": tls.server.url, "FUSE_NATS_CA": str(tls.certificates.ca)}
    settings = load_settings(environ, prefix=prefix)
    async with await open_event_store(settings=settings) as store:
        await store.append("agent.e1", [NewEvent(type="note", data={"via": "env"})])

    env = {**dev_environment(tmp_path / "state"), **environ, "FUSE_PREFIX": prefix}
    assert '"via":"env"' in run_fuse("replay", env=env).stdout
    del env["FUSE_NATS_CA"]
    flagged = run_fuse("--ca", str(tls.certificates.ca), "replay", env=env)
    assert '"via":"env"' in flagged.stdout
    untrusted = run_fuse("replay", env=env, check=False)
    assert untrusted.returncode != 0
    assert "not trusted with the system's CAs" in untrusted.stderr

    with pytest.raises(ConfigError, match=r"FUSE_NATS_CA=.*no such file"):
        load_settings({"FUSE_NATS_CA": str(tmp_path / "missing.pem")})
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM CA certificate"):
        client_context(not_pem)


async def test_fuse_dev_secure_tls_serves_every_command_over_tls(tmp_path: Path) -> None:
    env = dev_environment(tmp_path / "state")
    refused = run_fuse("dev", "--tls", "--cluster", "3", env=env, check=False)
    assert refused.returncode != 0
    assert "--tls=True: not with --cluster yet" in refused.stderr

    with start_fuse_dev(env, "dev", "--secure", "--tls", "--data-dir", str(tmp_path / "d")) as dev:
        assert dev.process.stdout is not None
        name, _, ca = dev.process.stdout.readline().strip().partition("=")
        assert name == "FUSE_NATS_CA" and Path(ca) == tmp_path / "d" / "tls" / "ca.pem"
        url = dev.urls["FUSE_NATS_URL"]
        assert url.startswith("tls://")
        assert json.loads((tmp_path / "state" / "dev.json").read_text())["ca"] == ca

        # every command finds the CA in the state file, as it finds the URL and the admin
        run_fuse("publish", "agent.x", "demo.thing", "--data", '{"a": 1}', env=env)
        assert '"a":1' in run_fuse("replay", env=env).stdout
        assert "agent_state" in run_fuse("--json", "projections", "status", env=env).stdout
        auth = tmp_path / "state" / "auth"
        run_fuse(*"auth add echo-1 --role agent --agent echo/1".split(), env=env)
        run_fuse(*"auth add caller --role agent --agent caller/1 --send-to echo".split(), env=env)

        agent = start_echo_agent(tmp_path, env, auth / "echo-1.creds")
        try:
            nc = await connect(url, credentials=Credentials.load(auth / "caller.creds"), ca=ca)
            try:
                async with AgentClient(nc, sender="caller") as client:
                    reply = await client.request("echo", "ping", {"n": 1}, timeout=30)
            finally:
                await nc.close()
            assert reply.payload == {"pong": {"n": 1}}
        finally:
            agent.terminate()
            _, agent_errors = agent.communicate(timeout=30)
        assert "eof_received" not in agent_errors
        listed = run_fuse("--json", "agents", "list", env=env)
        assert "echo" in listed.stdout and "eof_received" not in listed.stderr

        # with the URL given, the CA is not taken from the dev: the system's CAs refuse it
        untrusted = run_fuse("--nats", url, "replay", env=env, check=False)
        assert untrusted.returncode != 0 and "not trusted" in untrusted.stderr


async def test_a_store_over_tls_carries_on_over_tls_after_its_server_is_killed(
    tmp_path: Path,
) -> None:
    certificates = make_certificates(tmp_path / "certs")
    server = NatsServer(data_dir=tmp_path / "nats", monitor_port=-1, tls=certificates)
    async with server:
        restarted = TLSServer(server, certificates)
        async with await JetStreamEventStore.connect(
            server.url, prefix="fuse", ca=certificates.ca, name="tls-survivor"
        ) as store:
            await store.append("agent.t1", [NewEvent(type="note", data={"n": 1})], NO_STREAM)
            await server.kill()
            await server.restart()  # same port, data and certificate
            # the append waits out the reconnect (one deadline), then goes over TLS again
            await store.append("agent.t1", [NewEvent(type="note", data={"n": 2})], 1)
            records = [record.data async for record in store.read("agent.t1")]
            version = await restarted.tls_version_of("tls-survivor")
    assert records == [{"n": 1}, {"n": 2}]
    assert (version or "").startswith("1.")


def test_fuse_auth_add_on_a_tls_bus_writes_the_ca_into_the_credentials(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "certs")
    env = dev_environment(tmp_path / "state", FUSE_NATS_CA=str(certificates.ca))
    folder = tmp_path / "auth"
    IdentityStore(folder).add("admin", "admin")  # agents' certificates are an admin's to issue
    run_fuse(
        "auth", "--dir", str(folder), "add", "w1", "--role", "agent", "--agent", "w/1", env=env
    )
    kept = Credentials.load(folder / "w1.creds")
    assert kept.ca == os.path.abspath(certificates.ca)
    # without a CA anywhere (no FUSE_NATS_CA, no TLS dev running) the file names none
    plain = dev_environment(tmp_path / "state")
    run_fuse(
        "auth", "--dir", str(folder), "add", "w2", "--role", "agent", "--agent", "w/2", env=plain
    )
    assert Credentials.load(folder / "w2.creds").ca == ""
