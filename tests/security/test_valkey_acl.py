"""The projection runners' Valkey ACL user: it keeps and rebuilds the agent-state read model,
and cannot touch any other key nor administer the server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.exceptions import NoPermissionError

from newfuse.nats import ValkeyServer
from newfuse.security.valkey import ensure_projection_user, with_user
from support import run_fuse


async def test_the_projection_user_reaches_its_keys_only(tmp_path: Path) -> None:
    async with ValkeyServer(
        data_dir=tmp_path / "valkey", extra_args=["--requirepass", "admin-secret"]
    ) as server:
        admin_url = with_user(server.url, "default", "admin-secret")
        admin = redis.Redis.from_url(admin_url)
        await admin.set("other:key", "mine")
        user_url = await ensure_projection_user(admin_url, "fuse")
        assert "admin-secret" not in user_url
        runner = redis.Redis.from_url(user_url)
        try:
            await runner.hset("fuse:proj:probe", "a", "1")
            with pytest.raises(NoPermissionError):
                await runner.get("other:key")
            with pytest.raises(NoPermissionError):
                await runner.set("other:key", "theirs")
            with pytest.raises(NoPermissionError):
                await runner.hset("fuse2:proj:x", "a", "1")  # another prefix's read models
            for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("ACL", "LIST"), ("KEYS", "*")):
                with pytest.raises(NoPermissionError):
                    await runner.execute_command(*command)
            with pytest.raises(NoPermissionError):  # a script runs with the caller's rights
                await runner.eval("return redis.call('GET', KEYS[1])", 1, "other:key")
            assert await admin.get("other:key") == b"mine"

            # the real runner under that user: a rebuild of agent_state, then a read of it
            env = {
                **os.environ,
                "FUSE_STORE": f"sqlite://{tmp_path / 'log.db'}",
                "FUSE_REDIS_URL": user_url,
                "FUSE_AUDIT_DB": str(tmp_path / "read-models.db"),
                "FUSE_STATE_DIR": str(tmp_path / "state"),
            }
            data = json.dumps({"agentId": "r1", "state": {"step": "plan"}, "version": 1})
            run_fuse("publish", "agent.r1", "agent.state_update", "--data", data, env=env)
            rebuilt = json.loads(
                run_fuse("projections", "rebuild", "agent_state", "--json", env=env).stdout
            )
            assert rebuilt["applied"] == 1
            state = json.loads(run_fuse("agents", "state", "r1", "--json", env=env).stdout)
            assert state["state"] == {"step": "plan"}
        finally:
            await runner.aclose()
            await admin.aclose()
