"""A queue's Worker whose handler calls a model, for the replay tests
(`fuse agents replay summary_worker:summaries --task ID`).

Its first attempt of a task with `"flaky": true` raises after its model call; the retry asks
the same and gets the recorded answer back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from newfuse.agents import TaskContext, Worker
from newfuse.agents.models import ChatMessage, LocalModelProvider, Tool, echo

answered: list[str] = []
"""Every model call the local model answered in this process (by model name)."""


def counted(
    messages: Sequence[ChatMessage], model: str, tools: Sequence[Tool], params: dict[str, Any]
) -> str:
    answered.append(model)
    return echo(messages, model, tools, params)


provider = LocalModelProvider(counted)


async def summarize(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    answer = await ctx.chat(
        provider, [ChatMessage(role="user", content=job["text"])], model="sum-1"
    )
    if job.get("flaky") and ctx.attempt == 1:
        raise RuntimeError("failed after its model call, on purpose")
    ctx.publish("summaries", "summary.made", {"task": ctx.task_id})
    return {"summary": answer.content, "priority": ctx.priority}


summaries = Worker("summaries", summarize, backoff=(0.05, 0.1), heartbeat=0.5)
