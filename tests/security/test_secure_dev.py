"""`fuse dev --secure` and `fuse auth` as a user runs them: the admin is made and used by every
other command, an agent identity added while the dev runs works at once (the server reloaded),
and what its role does not allow is refused by the server, naming the identity."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import msgspec

from newfuse.agents import AgentClient
from newfuse.nats import connect
from newfuse.nats.connection import Credentials
from newfuse.security import KeyServiceClient
from newfuse.security.key_service import SealField
from support import dev_environment, run_fuse, start_echo_agent, start_fuse_dev, wait_for


async def test_secure_dev_admin_agents_and_refusals(tmp_path: Path) -> None:
    env = dev_environment(tmp_path / "state")
    with start_fuse_dev(env, "dev", "--secure"):
        auth = tmp_path / "state" / "auth"
        admin = auth / "admin.creds"
        assert stat.S_IMODE(admin.stat().st_mode) == 0o600
        # every other command connects as the admin the dev made
        run_fuse("publish", "agent.x", "demo.thing", "--data", '{"a": 1}', env=env)
        assert '"a":1' in run_fuse("replay", env=env).stdout
        # valkey asks for a password (in the owner-only state file); the runners use their
        # own ACL user, and the read side works for the CLI
        state_file = tmp_path / "state" / "dev.json"
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        redis_url = json.loads(state_file.read_text())["redis_url"]
        assert redis_url.startswith("redis://default:")
        status = run_fuse("--json", "projections", "status", env=env)
        assert "agent_state" in status.stdout
        # no identity: refused at connect
        anonymous = run_fuse(
            "--nats",
            json.loads((tmp_path / "state" / "dev.json").read_text())["nats_url"],
            "replay",
            env=env,
            check=False,
        )
        assert anonymous.returncode != 0 and "permission denied" in anonymous.stderr.lower()

        added = json.loads(
            run_fuse(
                "--json", "auth", "add", "echo-1", "--role", "agent", "--agent", "echo/1", env=env
            ).stdout
        )
        assert added["credentials"] == str(auth / "echo-1.creds")
        run_fuse(
            "auth",
            "add",
            "caller",
            "--role",
            "agent",
            "--agent",
            "caller/1",
            "--send-to",
            "echo",
            env=env,
        )
        listed = [
            json.loads(line)
            for line in run_fuse("--json", "auth", "list", env=env).stdout.splitlines()
        ]
        assert {row["name"]: row["role"] for row in listed} == {
            "admin": "admin",
            "system": "system",
            "keys": "service",
            "echo-1": "agent",
            "caller": "agent",
        }
        assert all("seed" not in json.dumps(row).lower() for row in listed)

        agent = start_echo_agent(tmp_path, env, auth / "echo-1.creds")
        try:
            caller = {**env, "FUSE_NATS_CREDENTIALS": str(auth / "caller.creds")}
            url = json.loads((tmp_path / "state" / "dev.json").read_text())["nats_url"]
            nc = await connect(url, credentials=Credentials.load(auth / "caller.creds"))
            try:
                async with AgentClient(nc, sender="caller") as client:
                    reply = await client.request("echo", "ping", {"n": 1}, timeout=20)
                # the dev's key service (as its service identity `keys`) seals for an agent
                field = SealField(path="$.payload.email", subject="c-1", value=msgspec.Raw(b'"a"'))
                sealed = await KeyServiceClient(nc).seal("e-1", [field])
                assert sealed[0].sub == "c-1"
            finally:
                await nc.close()
            assert reply.payload == {"pong": {"n": 1}}
            # the caller may not write the log, nor read it
            denied = run_fuse(
                "publish", "agent.x", "demo.thing", "--data", "{}", env=caller, check=False
            )
            assert denied.returncode != 0
            assert "identity 'caller' may not publish to" in denied.stderr
            assert "identity 'caller'" in run_fuse("replay", env=caller, check=False).stderr
        finally:
            agent.terminate()
            agent.communicate(timeout=30)

        # a queue's worker (type task-<queue>): its queue's ten consumers are made at once
        run_fuse("auth", "add", "resizer-1", "--role", "agent", "--agent", "task-resize/1", env=env)
        nc = await connect(url, credentials=Credentials.load(admin))
        try:
            js = nc.jetstream()
            made = {
                (await js.consumer_info("FUSE_A2A", f"task-resize-p{n}")).name for n in range(10)
            }
        finally:
            await nc.close()
        assert made == {f"task-resize-p{n}" for n in range(10)}

        run_fuse("auth", "revoke", "caller", env=env)
        revoked = run_fuse(
            "replay", env={**env, "FUSE_NATS_CREDENTIALS": str(auth / "caller.creds")}, check=False
        )
        assert revoked.returncode != 0 and "caller.creds" in revoked.stderr
        # the admin fuse dev made at its start, the agents added and the revocation: in the log
        rows = [
            json.loads(line)
            for line in run_fuse("audit", "security", "--json", env=env).stdout.splitlines()
        ]
        seen = {(r["type"], r["data"]["name"]) for r in rows if r["type"].startswith("identity.")}
        assert {("identity.created", "echo-1"), ("identity.revoked", "caller")} <= seen
        assert any(kind == "identity.created" and name != "echo-1" for kind, name in seen)

        # the anonymous login refused above, heard by the dev in the server's system account
        # (written as soon as it was heard: polled, not assumed)
        async def refusal_recorded() -> bool:
            listed = run_fuse("audit", "security", "--json", env=env).stdout.splitlines()
            refused = [r["data"] for r in map(json.loads, listed) if r["type"] == "auth.failed"]
            return any(r["presented"] == "" and r["seenBy"] == "fuse dev" for r in refused)

        await wait_for(refusal_recorded, timeout=30)
    assert not os.path.exists(tmp_path / "state" / "dev.json")
