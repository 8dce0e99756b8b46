"""Saga steps that are agent requests or queued tasks: action builders for `Saga.step`.

`ask(client, agent, message_type, build_input)` is an action that sends a request through the
log to an agent and returns its reply's payload; `enqueue(queues, queue, build_input)` submits
a task to a work queue and returns its result. Either may be a compensation too.

Both are asked once per step phase: the request's message id and reply token, and the task's
id, are derived from the step's `StepContext.idempotency_key`, so a retried attempt, or one an
orchestrator re-drives after another crashed, finds what the earlier one asked (and its answer,
when it came) instead of asking again (AgentClient.request_once, TaskQueue.submit).

Example:
    >>> from newfuse.core import Saga, ask, enqueue
    >>> def build(ctx): return {"order": ctx.input["order"]}
    >>> def define(client, queues):
    ...     order = Saga("order")
    ...     order.step("price")(ask(client, "pricer", "price.quote", build))
    ...     order.step("pack")(enqueue(queues, "packing", build, priority=5))
    ...     order.compensate("pack")(ask(client, "packer", "pack.undo", build))
    ...     return order
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from newfuse.agents.address import AgentId
from newfuse.agents.client import AgentClient
from newfuse.agents.queues import RESULT_ARTIFACT, TaskQueue
from newfuse.agents.tasks import Task
from newfuse.agents.wire import derived_id
from newfuse.core.saga import Action, StepContext
from newfuse.errors import StepTaskFailedError

BuildInput = Callable[[StepContext], Any]
"""What a step sends, from what it sees (the saga's input, the earlier steps' outputs)."""

UNBOUNDED: Final = 86_400.0
"""Seconds a step waits for its answer by default: the step's own timeout ends it first."""


def _saga_input(ctx: StepContext) -> Any:
    return ctx.input


def ask(
    client: AgentClient,
    agent: AgentId | str,
    message_type: str,
    build_input: BuildInput = _saga_input,
    *,
    timeout: float = UNBOUNDED,  # how long one attempt waits for the reply
) -> Action:
    """An action that asks `agent` (one instance, or any instance of a type) `message_type`
    with `build_input(ctx)` (default: the saga's input) and returns the reply's payload.

    The request is asked once per step phase (its ids come from the idempotency key). An
    attempt that gets no reply within `timeout` fails retryably (the next one waits for the
    same request's reply); an error answer fails the step for good (RequestFailedError).
    """

    async def action(ctx: StepContext) -> Any:
        reply = await client.request_once(
            agent,
            message_type,
            build_input(ctx),
            key=ctx.idempotency_key,
            timeout=timeout,
            context_id=ctx.saga_id,
        )
        return reply.payload

    action.__name__ = action.__qualname__ = f"ask {agent} {message_type}"
    return action


def enqueue(
    queues: TaskQueue,
    queue: str,
    build_input: BuildInput = _saga_input,
    *,
    priority: int = 0,
    max_attempts: int | None = None,
    timeout: float = UNBOUNDED,  # how long one attempt waits for the task
) -> Action:
    """An action that submits `build_input(ctx)` (default: the saga's input) as a task to
    `queue` and returns its result (the `result` artifact's data or text; None without one).

    The task is submitted once per step phase (its id comes from the idempotency key): a
    later attempt waits for the same task. A task that ends failed, canceled or rejected fails
    the step for good (StepTaskFailedError: the queue has spent its own attempts).
    """

    async def action(ctx: StepContext) -> Any:
        task_id = task_id_of(ctx)
        await queues.submit(
            queue,
            build_input(ctx),
            priority=priority,
            max_attempts=max_attempts,
            task_id=task_id,
            context_id=ctx.saga_id,
        )
        task = await queues.wait(task_id, timeout=timeout)
        if task.state != "completed":
            raise StepTaskFailedError(
                queue=queue, task_id=task_id, state=task.state, reason=_why(task)
            )
        return result_of(task)

    action.__name__ = action.__qualname__ = f"enqueue {queue}"
    return action


def task_id_of(ctx: StepContext) -> str:
    """The id of the task a step's phase submits (the same on every attempt)."""
    return derived_id(ctx.idempotency_key, "saga", "task")


def result_of(task: Task) -> Any:
    """A completed task's result: its `result` artifact's data (or text); None without one."""
    for artifact in task.artifacts:
        if artifact.artifact_id == RESULT_ARTIFACT and artifact.parts:
            part = artifact.parts[0]
            return part.data if part.data is not None else part.text
    return None


def _why(task: Task) -> str:
    """What the task's last status said (its error text), or that it said nothing."""
    said = task.statuses[-1].message if task.statuses else None
    texts = [part.text for part in said.parts if part.text] if said is not None else []
    return "; ".join(texts)[:500] or "its status says no more"
