"""An agent whose handler calls a model twice, for the replay and usage tests
(`fuse agents replay writer_agent:writer`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from newfuse.agents import Agent, Context
from newfuse.agents.models import ChatMessage, LocalModelProvider, Tool, echo

answered: list[str] = []
"""Every model call the writer's local model answered in this process (by model name)."""


def counted(
    messages: Sequence[ChatMessage], model: str, tools: Sequence[Tool], params: dict[str, Any]
) -> str:
    answered.append(model)
    return echo(messages, model, tools, params)


def shouting(
    messages: Sequence[ChatMessage], model: str, tools: Sequence[Tool], params: dict[str, Any]
) -> str:
    return echo(messages, model, tools, params).upper()


provider = LocalModelProvider(counted)
loud = LocalModelProvider(shouting, name="loud", revision="loud-1")

writer = Agent("writer", description="drafts, then reviews its draft")


@writer.handler("write")
async def write(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    draft = await ctx.chat(
        provider, [ChatMessage(role="user", content=body["topic"])], model="draft-1"
    )
    review = await ctx.chat(
        provider,
        [
            ChatMessage(role="system", content="Tighten this."),
            ChatMessage(role="user", content=draft.content or ""),
        ],
        model="review-1",
        params={"temperature": 0},
    )
    ctx.send("editor", "article", {"text": review.content})
    return {"text": review.content}
