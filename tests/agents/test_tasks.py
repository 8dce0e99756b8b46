"""A2A tasks: the fold and its lifecycle rules, and a human answering through `fuse tasks`."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from messages import payload, stored
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context, RunningAgent, Task, Tasks, fold, wire
from newfuse.agents.tasks import SENDER, TaskEvent, decode_task_event
from newfuse.errors import InvalidEnvelopeError
from newfuse.nats import MessageStreamSpec, Subjects
from newfuse.schemas import A2AMessage, A2AMetadata, Artifact, Part, TaskStatusUpdate
from support import run_fuse, wait_for

TASK = "t-1"
SUBJECT = "fuse.a2a._task.t-1"


class Log:
    """Task events as they would be stored: encoded, then decoded back through the checks."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    def _add(self, type_name: str, data: Any, sender: str | None = None) -> None:
        position = len(self.events) + 1
        body, _ = wire.encode(
            f"task.{TASK}",
            type_name,
            data,
            event_id=f"e{position}",
            metadata={SENDER: sender} if sender else None,
        )
        self.events.append(decode_task_event(body, position=position, subject=SUBJECT))

    def message(self, text: str, *, role: str = "user", task_id: str = TASK) -> None:
        self._add(
            "a2a.message",
            A2AMessage(
                type="expense.submit",
                metadata=A2AMetadata(sender="alice"),
                message_id=f"m{len(self.events) + 1}",
                task_id=task_id,
                context_id="c-1",
                role=role,  # type: ignore[arg-type]
                parts=[Part(text=text)],
            ),
        )

    def status(self, state: str, **fields: Any) -> None:
        self._add(
            "task.status",
            TaskStatusUpdate(
                task_id=fields.pop("task_id", TASK),
                context_id=fields.pop("context_id", "c-1"),
                state=state,  # type: ignore[arg-type]
                **fields,
            ),
            sender="clerk/1",
        )

    def fold(self) -> Task:
        task = fold(TASK, self.events)
        assert task is not None
        return task


def test_the_fold_follows_a_task_from_its_first_message_to_completed() -> None:
    log = Log()
    log.message("file 120 EUR")
    assert log.fold().state == "submitted"  # a task that received a message and no status yet
    log.status("working")
    question = A2AMessage(
        type="expense.submit",
        metadata=A2AMetadata(sender="clerk/1"),
        message_id="q",
        role="agent",
        parts=[Part(text="Which cost centre?")],
    )
    log.status("input-required", message=question)
    log.message("CC-42")
    log.status(
        "completed",
        artifacts=[Artifact(artifact_id="r", name="receipt", parts=[Part(data={"n": 1})])],
    )
    task = log.fold()
    assert (task.id, task.context_id, task.state, task.agent) == (
        TASK,
        "c-1",
        "completed",
        "clerk/1",
    )
    assert [s.state for s in task.statuses] == ["working", "input-required", "completed"]
    assert [s.position for s in task.statuses] == [2, 3, 5]
    assert [m.message_id for m in task.history] == ["m1", "q", "m4"]
    assert [a.name for a in task.artifacts] == ["receipt"]
    assert task.position == 5 and task.ignored == []
    assert task.created <= task.updated


def test_nothing_moves_a_task_out_of_a_terminal_state_and_what_tries_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for terminal in ("completed", "canceled", "failed", "rejected"):
        log = Log()
        log.status("working")
        log.status(terminal)
        log.status("working")
        log.message("too late")
        with caplog.at_level(logging.WARNING, logger="newfuse.agents"):
            task = log.fold()
        assert task.state == terminal
        assert [s.state for s in task.statuses] == ["working", terminal]
        assert task.history == [] and task.position == 2
        assert task.ignored == [
            f"position 3: status 'working' refused: the task is {terminal}, a terminal state: "
            "A2A allows no change after it",
            f"position 4: a message refused: the task is {terminal}, a terminal state: A2A "
            "allows no change after it",
        ]
        assert f"position 3: status 'working' refused: the task is {terminal}" in caplog.text


def test_a_task_is_submitted_once_and_interrupted_states_may_come_and_go() -> None:
    log = Log()
    log.status("submitted")
    log.status("auth-required")
    log.status("working")
    log.status("submitted")
    log.status("input-required")
    log.status("working")
    task = log.fold()
    assert [s.state for s in task.statuses] == [
        "submitted",
        "auth-required",
        "working",
        "input-required",
        "working",
    ]
    assert task.ignored == [
        "position 4: status 'submitted' refused: the task is working; a task is submitted "
        "once, where it starts"
    ]
    assert task.question is None  # only an input-required task has one


def test_events_naming_another_task_or_context_are_skipped_and_an_artifact_id_replaces() -> None:
    log = Log()
    log.status("working", artifacts=[Artifact(artifact_id="a", name="draft")])
    log.status("working", task_id="t-2")
    log.status("working", context_id="c-other")
    log.message("for another task", task_id="t-2")
    log.status("completed", artifacts=[Artifact(artifact_id="a", name="final")])
    task = log.fold()
    assert [a.name for a in task.artifacts] == ["final"]
    assert task.ignored == [
        "position 2: it names task 't-2', not this one",
        "position 3: its context 'c-other' is not the task's 'c-1'",
        "position 4: it names task 't-2', not this one",
    ]
    assert fold("t-9", []) is None


def test_a_body_that_is_not_a_task_event_is_refused_naming_where_and_why() -> None:
    body, _ = wire.encode("task.t-1", "note", {}, event_id="x")
    for raw, why in ((b"{not json", "at \\$: JSON is malformed"), (body, "at \\$.type: 'note'")):
        with pytest.raises(InvalidEnvelopeError, match=rf"at position 7 on {SUBJECT} {why}"):
            decode_task_event(raw, position=7, subject=SUBJECT)


# -- on a real server, with `fuse tasks` as a process ---------------------------------------------

clerk = Agent("clerk", backoff=(0.05, 0.2))


@clerk.handler("expense.submit")
async def submit(ctx: Context, body: dict[str, Any]) -> None:
    # Decided by the message, not by the stored task: a redelivered handler may find its own
    # earlier effects stored, and must emit the same ones again (they are then not stored).
    if ctx.message.task_id is None:  # a new task: ask the human which cost centre
        ctx.task_status("working", text=f"filing {body['amount']} EUR")
        ctx.task_status("input-required", text="Which cost centre?")
        return
    task = await ctx.task()
    assert task is not None
    ctx.task_status(
        "completed",
        text=f"filed under {ctx.text}",
        artifacts=[
            Artifact(
                artifact_id="receipt",
                name="receipt",
                parts=[Part(data={"amount": task.history[0].payload["amount"], "cc": ctx.text})],
            )
        ],
    )


class DiesBeforeItsMarker(RunningAgent):
    """An instance that, the first time it commits a message's effects, stores them and fails
    before the handled marker and the ack (as a process that died there would): the message
    comes back and its handler runs again."""

    died: set[int]

    async def _commit(
        self,
        effects: list[Any],
        consumer: str,
        position: int,
        attempt: int = 1,
        *,
        marker: bool = False,
    ) -> None:
        if position in self.died:
            await super()._commit(effects, consumer, position, attempt, marker=marker)
            return
        self.died.add(position)
        for effect in effects:
            await self._publish(*effect)
        raise RuntimeError("died before the marker")  # no marker, no ack: it comes back


def _fuse(nats_url: str, prefix: str, *args: str, check: bool = True) -> Any:
    return asyncio.to_thread(run_fuse, "--nats", nats_url, "--prefix", prefix, *args, check=check)


async def test_a_human_answers_an_input_required_task_with_fuse_tasks_reply(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    tasks = Tasks(nc, prefix=prefix)
    async with (
        clerk.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream, sender="alice") as client,
    ):
        sent = await client.send("clerk", "expense.submit", {"amount": 120}, context_id="c-7")

        async def asked() -> bool:
            return [t.state for t in await tasks.all()] == ["input-required"]

        await wait_for(asked, timeout=30)
        listed = await _fuse(nats_url, prefix, "tasks", "list", "--json")
        (line,) = listed.stdout.splitlines()
        task_id = json.loads(line)["id"]
        assert task_id == client.task_id("clerk", sent)  # derived: the sender can know it
        assert json.loads(line)["agent"] == "clerk/1"
        waiting = await _fuse(nats_url, prefix, "tasks", "list", "--state", "input-required")
        assert task_id in waiting.stdout and "1 task(s)" in waiting.stderr

        answered = await _fuse(nats_url, prefix, "tasks", "reply", task_id, "CC-42")
        assert f"answered task {task_id}: message " in answered.stdout
        assert "(expense.submit) to clerk/1" in answered.stdout

        async def completed() -> bool:
            task = await tasks.get(task_id)
            return task is not None and task.state == "completed"

        await wait_for(completed, timeout=30)
        assert running.handled == 2 and running.dead_lettered == 0
        again = await _fuse(nats_url, prefix, "tasks", "reply", task_id, "CC-43", check=False)

    shown = json.loads((await _fuse(nats_url, prefix, "tasks", "show", task_id, "--json")).stdout)
    assert (shown["id"], shown["context_id"], shown["state"]) == (task_id, "c-7", "completed")
    assert [s["state"] for s in shown["statuses"]] == ["working", "input-required", "completed"]
    said = [
        (m["role"], m["metadata"]["sender"], m.get("parts", [{}])[0].get("text"))
        for m in shown["history"]
    ]
    assert said == [
        ("user", "alice", None),
        ("agent", "clerk/1", "filing 120 EUR"),
        ("agent", "clerk/1", "Which cost centre?"),
        ("user", "fuse-cli", "CC-42"),
        ("agent", "clerk/1", "filed under CC-42"),
    ]
    assert shown["history"][0]["messageId"] == sent
    assert shown["history"][3]["inReplyTo"] == shown["history"][2]["messageId"]  # the question
    assert all(m["taskId"] == task_id for m in shown["history"])
    receipt = {"data": {"amount": 120, "cc": "CC-42"}}
    assert shown["artifacts"] == [{"artifactId": "receipt", "name": "receipt", "parts": [receipt]}]
    assert shown["ignored"] == []
    # each status once, the answer once: no event stored twice
    events = await _stored_on(nc, prefix, Subjects(prefix).task_events(task_id))
    assert len(events) == len(set(events)) == 5

    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert (
        f"task '{task_id}' (completed) cannot be answered: only an input-required task takes "
        "an answer, and it has ended" in again.stderr
    )
    table = await _fuse(nats_url, prefix, "tasks", "show", task_id)
    assert "filed under CC-42" in table.stdout and "receipt" in table.stdout
    missing = await _fuse(nats_url, prefix, "tasks", "show", "no-such-task", check=False)
    assert missing.returncode == 1 and "no task 'no-such-task'" in missing.stderr


async def _stored_on(nc: Client, prefix: str, subject: str) -> list[str]:
    return [envelope.id for envelope in await stored(nc, prefix, subject)]


async def test_a_foreign_body_on_a_task_subject_is_reported_and_skipped(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    subjects = Subjects(prefix)
    js = nc.jetstream()
    await js.publish(subjects.task_events("t-5"), b"\x00 not an envelope")
    body, wire_headers = wire.encode(
        "task.t-5",
        "task.status",
        TaskStatusUpdate(task_id="t-5", state="working"),
        event_id="status-1",
        metadata={SENDER: "clerk/1"},
    )
    await js.publish(subjects.task_events("t-5"), body, headers=wire_headers)
    await js.publish(subjects.task_events("t-6"), b"[]")  # a subject with nothing but junk

    tasks = Tasks(nc, prefix=prefix)
    (task,) = await tasks.all()
    assert (task.id, task.state) == ("t-5", "working")
    assert len(task.ignored) == 1 and task.ignored[0].startswith("position ")
    assert "not a task event" in task.ignored[0]
    assert len(tasks.skipped) == 1 and "t-6" in tasks.skipped[0]
    shown = await _fuse(nats_url, prefix, "tasks", "show", "t-5")
    assert "not a task event" in shown.stderr and "working" in shown.stdout


async def test_a_handler_run_again_after_storing_its_task_events_stores_none_twice(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    asker = Agent("asker", ack_wait=1.0)
    runs: list[int] = []

    @asker.handler("ask")
    async def ask(ctx: Context, body: dict[str, Any]) -> None:
        runs.append(ctx.attempt)
        ctx.task_status("working")
        ctx.task_status("input-required", text="Sure?", answer_type="ask.answer")

    running = asker.run(nc, key="1", prefix=prefix, stream=stream)
    instance = DiesBeforeItsMarker(
        asker, nc, running.agent_id, running.subjects, stream, fast_path=False
    )
    instance.died = set()
    tasks = Tasks(nc, prefix=prefix)
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        await client.send("asker", "ask", {}, task_id="t-again")

        async def handled_again() -> bool:
            return instance.handled == 1

        await wait_for(handled_again, timeout=30)
    assert runs == [1, 2]  # the marker was missing: the handler ran again...
    events = await _stored_on(nc, prefix, Subjects(prefix).task_events("t-again"))
    assert len(events) == 3  # ...and stored nothing twice: the message, two statuses
    task = await tasks.get("t-again")
    assert task is not None and [s.state for s in task.statuses] == ["working", "input-required"]
    assert task.question is not None and task.question.message is not None
    assert task.question.message.type == "ask.answer"


async def test_a_task_id_that_names_no_subject_or_a_state_outside_a2a_is_a_dead_letter(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    strict = Agent("strict")

    @strict.handler("move")
    async def move(ctx: Context, body: dict[str, str]) -> None:
        ctx.task_status(body["state"])  # type: ignore[arg-type]

    async with (
        strict.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        await client.send("strict", "move", {"state": "working"}, task_id="a.b.>")
        await client.send("strict", "move", {"state": "done"}, task_id="t-ok")

        async def both_dead() -> bool:
            return running.dead_lettered == 2

        await wait_for(both_dead, timeout=30)
    letters = await stored(nc, prefix, Subjects(prefix).dead_letters("strict"))
    errors = sorted(payload(letter).error for letter in letters)
    assert errors[0].startswith("InvalidNameError: ") and "task id 'a.b.>'" in errors[0]
    assert errors[1] == (
        "InvalidPayloadError: invalid payload for 'task.status' v1 at $.state: 'done' is not an "
        "A2A task state (submitted, working, input-required, auth-required, completed, "
        "canceled, failed, rejected)"
    )
    assert await Tasks(nc, prefix=prefix).all() == []
