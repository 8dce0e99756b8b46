"""An agent module for `fuse agents run echo_agent:echo` in the CLI test."""

from __future__ import annotations

from typing import Any

from newfuse.agents import Agent, Context

echo = Agent("echo", description="answers with what it was sent")
not_an_agent = "echo"


@echo.handler("ping")
async def ping(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    return {"echo": body, "by": str(ctx._runtime.agent_id)}
