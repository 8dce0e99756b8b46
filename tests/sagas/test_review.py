"""Human review of saga steps, resolving a stuck saga, and feedback, on real orchestrators and a
real JetStream store: a review step waits for a person, exactly one of two decisions at once is
stored, deadlines reject or escalate, a rejection rolls back, and every decision is an event."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from newfuse.agents.models import LocalModelProvider, ModelRecorder
from newfuse.agents.models.usage import ModelCalls
from newfuse.core import review as reviews
from newfuse.core.feedback import give_feedback, model_of, read_feedback
from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream
from newfuse.core.resolution import resolve_saga
from newfuse.core.review import Escalate, Review, Reviewer, ReviewState
from newfuse.core.saga import AwaitReview, Run, Saga, SagaState, StepContext, next_move
from newfuse.errors import (
    ReviewClaimedError,
    ReviewDecidedError,
    ReviewerNotAllowedError,
    ReviewInputError,
    SagaNotStuckError,
)
from newfuse.eventstore import NO_STREAM
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import MessageStreamSpec, Subjects, connect, ensure_event_stream
from newfuse.schemas import (
    ChatMessage,
    NewEvent,
    ReviewApproved,
    ReviewRequested,
    SagaResolved,
    SagaStarted,
    StepCompleted,
    StepReviewed,
)
from support import run_fuse, wait_for

ADA = Reviewer("ada", ("ops",))
BOB = Reviewer("bob", ("ops",))
LEA = Reviewer("lea", ("leads",))


def _shipping(log: list[Any], review: Review) -> Saga:
    """pack -> ship (reviewed); each step and compensation logs what it saw."""
    saga = Saga("shipping")

    @saga.step("pack")
    async def pack(ctx: StepContext) -> str:
        log.append("pack")
        return "box-1"

    @saga.compensate("pack")
    async def unpack(ctx: StepContext) -> None:
        log.append("unpack")

    @saga.step("ship", review=review)
    async def ship(ctx: StepContext) -> dict[str, Any]:
        by = ctx.review.by if ctx.review is not None else None
        log.append(("ship", ctx.input, by))
        return {"shipped": ctx.input.get("to")}

    return saga


def _ops(**kwargs: Any) -> Review:
    return Review(
        group="ops",
        summary=lambda ctx: f"ship {ctx.outputs['pack']} to {ctx.input['to']}",
        propose=lambda ctx: {"to": ctx.input["to"], "box": ctx.outputs["pack"]},
        **kwargs,
    )


async def _pending(store: JetStreamEventStore, saga_id: str, step: str = "ship") -> ReviewState:
    """The review of `step` once it is requested."""
    review_id = reviews.review_id(saga_id, step)

    async def requested() -> bool:
        return (await reviews.read_review(store, review_id)).requested

    await wait_for(requested, timeout=20)
    return await reviews.read_review(store, review_id)


async def test_a_review_step_waits_holding_no_slot_and_runs_with_the_edited_input(
    store: JetStreamEventStore,
) -> None:
    log: list[Any] = []
    plain = Saga("plain")

    @plain.step("only")
    async def only(ctx: StepContext) -> None:
        log.append("plain")

    async with Orchestrator(store, [_shipping(log, _ops()), plain], concurrency=1) as orch:
        saga_id = await orch.start("shipping", {"to": "lima"})
        pending = await _pending(store, saga_id)
        assert (pending.status, pending.groups, pending.action) == (
            "pending",
            ["ops"],
            "shipping.ship",
        )
        assert pending.summary == "ship box-1 to lima"
        assert pending.proposed == {"to": "lima", "box": "box-1"}
        # one slot, and the waiting saga does not hold it: another saga runs meanwhile
        other = await orch.wait(await orch.start("plain"), timeout=20)
        assert other.status == "committed"
        assert (await read_saga(store, saga_id)).status == "active"
        await reviews.claim(store, pending.id, ADA)
        with pytest.raises(ReviewClaimedError, match="claimed by ada: bob cannot"):
            await reviews.approve(store, pending.id, BOB)
        await reviews.edit(store, pending.id, ADA, {"to": "cusco", "box": "box-1"})
        await reviews.approve(store, pending.id, ADA, "cusco, not lima")
        state = await orch.wait(saga_id, timeout=20)
    assert state.status == "committed"
    assert log == ["pack", "plain", ("ship", {"to": "cusco", "box": "box-1"}, "ada")]
    types = [event.type async for event in store.read(saga_stream(saga_id))]
    assert types.count("saga.step_reviewed") == 1
    assert types.index("saga.step_reviewed") < types.index("saga.step_started", 2)
    reviewed = state.steps["ship"].reviewed
    assert reviewed is not None
    assert (reviewed.decision, reviewed.by, reviewed.comment) == (
        "approved",
        "ada",
        "cusco, not lima",
    )
    audit = (await reviews.read_review(store, pending.id)).history
    assert [line.split(" ", 1)[1] for line in audit] == [
        "requested from ops",
        "claimed by ada",
        "input edited by ada",
        "approved by ada: cusco, not lima",
    ]


async def test_two_reviewers_deciding_at_once_store_exactly_one_decision(
    store: JetStreamEventStore,
) -> None:
    log: list[Any] = []
    outcomes: list[str] = []
    async with Orchestrator(store, [_shipping(log, _ops())]) as orch:
        for round in range(5):
            saga_id = await orch.start("shipping", {"to": "lima"}, saga_id=f"race-{round}")
            pending = await _pending(store, saga_id)
            results = await asyncio.gather(
                reviews.approve(store, pending.id, ADA, "go"),
                reviews.reject(store, pending.id, BOB, "stop"),
                return_exceptions=True,
            )
            won = [r for r in results if isinstance(r, ReviewState)]
            lost = [r for r in results if isinstance(r, ReviewDecidedError)]
            assert len(won) == 1 and len(lost) == 1, results
            winner = won[0]
            assert lost[0].by == winner.decided_by and lost[0].status == winner.status
            assert f"was {winner.status} by {winner.decided_by}" in str(lost[0])
            events = [e.type async for e in store.read(reviews.review_stream(pending.id))]
            assert events.count("review.approved") + events.count("review.rejected") == 1
            state = await orch.wait(saga_id, timeout=20)
            expected = "committed" if winner.status == "approved" else "rolled_back"
            assert state.status == expected
            outcomes.append(f"{winner.decided_by} {winner.status}")
            with pytest.raises(ReviewDecidedError, match=f"by {winner.decided_by}"):
                await reviews.claim(store, pending.id, ADA)
    print(f"\nfive races: {outcomes}")


async def test_a_rejection_fails_the_step_for_good_and_rolls_the_saga_back(
    store: JetStreamEventStore,
) -> None:
    log: list[Any] = []
    async with Orchestrator(store, [_shipping(log, _ops())]) as orch:
        saga_id = await orch.start("shipping", {"to": "lima"})
        pending = await _pending(store, saga_id)
        with pytest.raises(ReviewerNotAllowedError, match="decided by group ops; lea acts"):
            await reviews.approve(store, pending.id, LEA)
        with pytest.raises(ReviewInputError, match="a rejection says why"):
            await reviews.reject(store, pending.id, BOB, " ")
        await reviews.reject(store, pending.id, BOB, "the address is wrong")
        state = await orch.wait(saga_id, timeout=20)
    assert state.status == "rolled_back"
    assert log == ["pack", "unpack"]
    assert state.failed_step == "ship"
    assert state.error == f"review {pending.id} rejected by bob: the address is wrong"
    assert state.steps["ship"].status == "failed"


async def test_a_deadline_that_rejects_rolls_the_saga_back(store: JetStreamEventStore) -> None:
    log: list[Any] = []
    async with Orchestrator(store, [_shipping(log, _ops(deadline=0.5))]) as orch:
        saga_id = await orch.start("shipping", {"to": "lima"})
        state = await orch.wait(saga_id, timeout=20)
    assert state.status == "rolled_back" and log == ["pack", "unpack"]
    expired = await reviews.read_review(store, reviews.review_id(saga_id, "ship"))
    assert (expired.status, expired.decided_by) == ("expired", "deadline")
    assert "rejected by deadline: no decision by" in (state.error or "")


async def test_a_deadline_that_escalates_hands_the_review_to_the_other_group(
    store: JetStreamEventStore,
) -> None:
    log: list[Any] = []
    escalating = _ops(deadline=0.5, on_deadline=Escalate("leads", deadline=30))
    async with Orchestrator(store, [_shipping(log, escalating)]) as orch:
        saga_id = await orch.start("shipping", {"to": "lima"})
        pending = await _pending(store, saga_id)
        await reviews.claim(store, pending.id, ADA)

        async def escalated() -> bool:
            return (await reviews.read_review(store, pending.id)).escalated

        await wait_for(escalated, timeout=20)
        now = await reviews.read_review(store, pending.id)
        assert (now.status, now.groups, now.claimed_by) == ("pending", ["leads"], None)
        with pytest.raises(ReviewerNotAllowedError, match="decided by group leads"):
            await reviews.approve(store, pending.id, ADA)
        await reviews.approve(store, pending.id, LEA, "fine")
        state = await orch.wait(saga_id, timeout=20)
    assert state.status == "committed"
    assert log[-1] == ("ship", {"to": "lima", "box": "box-1"}, "lea")


async def test_a_review_opened_under_one_orchestrator_is_decided_under_the_next(
    store: JetStreamEventStore,
) -> None:
    log: list[Any] = []
    async with Orchestrator(store, [_shipping(log, _ops())], name="first") as first:
        saga_id = await first.start("shipping", {"to": "lima"})
        pending = await _pending(store, saga_id)
    await reviews.approve(store, pending.id, ADA)  # while no orchestrator runs
    async with Orchestrator(store, [_shipping(log, _ops())], name="second") as second:
        state = await second.wait(saga_id, timeout=20)
    assert state.status == "committed"
    assert log.count("pack") == 1
    events = [e.type async for e in store.read(reviews.review_stream(pending.id))]
    assert events == ["review.requested", "review.approved"]  # opened once


def _stuck_saga(log: list[str], bank: dict[str, bool]) -> Saga:
    saga = Saga("refund")

    @saga.step("pay")
    async def pay(ctx: StepContext) -> str:
        log.append("pay")
        return "paid"

    @saga.compensate("pay", attempts=2)
    async def refund(ctx: StepContext) -> None:
        log.append("refund")
        if not bank["up"]:
            raise RuntimeError("the bank is down")

    @saga.step("deliver", attempts=1)
    async def deliver(ctx: StepContext) -> None:
        raise RuntimeError("no truck")

    return saga


async def test_a_stuck_saga_retried_by_a_person_compensates_and_rolls_back(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    bank = {"up": False}
    async with Orchestrator(store, [_stuck_saga(log, bank)]) as orch:
        saga_id = await orch.start("refund")
        stuck = await orch.wait(saga_id, timeout=20)
        assert stuck.status == "stuck" and log == ["pay", "refund", "refund"]
        with pytest.raises(ReviewInputError, match="a resolution says why"):
            await resolve_saga(store, saga_id, "retry", by="ada", comment="")
        bank["up"] = True
        await resolve_saga(store, saga_id, "retry", by="ada", comment="the bank is back")

        async def rolled_back() -> bool:
            return (await read_saga(store, saga_id)).status == "rolled_back"

        await wait_for(rolled_back, timeout=20)
    state = await read_saga(store, saga_id)
    assert log == ["pay", "refund", "refund", "refund"]
    assert state.steps["pay"].status == "compensated"
    assert [(r.by, r.resolution) for r in state.resolutions] == [("ada", "retry")]
    assert "resolved by ada (retry): the bank is back" in state.steps["pay"].history


async def test_a_stuck_saga_undone_by_hand_is_rolled_back_and_only_once(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    async with Orchestrator(store, [_stuck_saga(log, {"up": False})]) as orch:
        saga_id = await orch.start("refund")
        assert (await orch.wait(saga_id, timeout=20)).status == "stuck"
        results = await asyncio.gather(
            resolve_saga(store, saga_id, "rolled_back", by="ada", comment="refunded by phone"),
            resolve_saga(store, saga_id, "retry", by="bob", comment="try again"),
            return_exceptions=True,
        )
        lost = [r for r in results if isinstance(r, SagaNotStuckError)]
        assert len(lost) == 1, results
        state = await read_saga(store, saga_id)
    winner = state.resolutions[0]
    assert len(state.resolutions) == 1 and lost[0].resolved_by == winner.by
    if winner.resolution == "rolled_back":
        assert state.status == "rolled_back" and state.transaction().status == "rolled_back"
        assert log == ["pay", "refund", "refund"]
    with pytest.raises(SagaNotStuckError, match=f"is .* \\({winner.by} resolved it\\), not stuck"):
        await resolve_saga(store, saga_id, "retry", by="ada", comment="again")


async def test_feedback_is_linked_to_the_message_and_the_model_version_that_answered(
    store: JetStreamEventStore, nats_url: str, prefix: str
) -> None:
    nc: Client = await connect(nats_url, name="review-test")
    try:
        await ensure_event_stream(nc, MessageStreamSpec(subjects=Subjects(prefix)))
        async with ModelRecorder(nc, source="writer", prefix=prefix) as recorder:
            model = recorder.model(LocalModelProvider(revision="v3"), correlation="msg-1")
            await model.chat([ChatMessage(role="user", content="draft")], model="draft-1")
            await model.chat([ChatMessage(role="user", content="polish")], model="polish-2")
        found = await model_of(ModelCalls(nc, prefix=prefix), "msg-1")
        assert await model_of(ModelCalls(nc, prefix=prefix), "msg-other") is None
    finally:
        await nc.close()
    assert found is not None
    agent, version = found
    assert (agent, version.request_model, version.revision, version.call) == (
        "writer",
        "polish-2",
        "v3",
        1,
    )
    await give_feedback(
        store, "msg-1", score=4, by="ada", comment="good", model=version, agent=agent
    )
    await give_feedback(store, "msg-1", score=-1, by="bob")
    with pytest.raises(ReviewInputError, match="from -10 to 10, not 11"):
        await give_feedback(store, "msg-1", score=11, by="ada")
    given = await read_feedback(store, "msg-1")
    assert [(f.by, f.score, f.model) for f in given] == [("ada", 4, version), ("bob", -1, None)]


async def test_fuse_review_lists_claims_edits_approves_rejects_and_resolves(
    store: JetStreamEventStore, nats_url: str, prefix: str
) -> None:
    log: list[Any] = []

    def fuse(*args: str, check: bool = True) -> Any:
        return run_fuse(
            "--nats",
            nats_url,
            "--prefix",
            prefix,
            *args,
            check=check,
            env={**os.environ, "FUSE_REVIEWER_GROUPS": "ops"},
        )

    async with Orchestrator(
        store, [_shipping(log, _ops()), _stuck_saga([], {"up": False})]
    ) as orch:
        one = await orch.start("shipping", {"to": "lima"}, saga_id="cli-1")
        two = await orch.start("shipping", {"to": "quito"}, saga_id="cli-2")
        first, second = await _pending(store, one), await _pending(store, two)
        listed = [
            json.loads(line)
            for line in (await asyncio.to_thread(fuse, "review", "list", "--json")).stdout.split(
                "\n"
            )
            if line
        ]
        assert {(r["saga_id"], r["status"]) for r in listed} == {
            ("cli-1", "pending"),
            ("cli-2", "pending"),
        }
        table = (await asyncio.to_thread(fuse, "review", "list", "--status", "pending")).stdout
        assert first.id in table and "ship box-1 to lima" in table
        await asyncio.to_thread(fuse, "review", "claim", first.id, "--as", "ada")
        taken = await asyncio.to_thread(
            fuse, "review", "approve", first.id, "--as", "bob", check=False
        )
        assert taken.returncode == 1 and "claimed by ada: bob cannot" in taken.stderr
        edited = await asyncio.to_thread(
            fuse, "review", "edit", first.id, "--as", "ada", "--input", '{"to": "cusco"}', "--json"
        )
        assert json.loads(edited.stdout)["input"] == {"to": "cusco"}
        await asyncio.to_thread(
            fuse, "review", "approve", first.id, "--as", "ada", "--comment", "ok"
        )
        outsider = await asyncio.to_thread(
            fuse, "review", "reject", second.id, "--as", "lea", "--group", "sales",
            "--comment", "no", check=False,
        )  # fmt: skip
        assert outsider.returncode == 1 and "decided by group ops" in outsider.stderr
        await asyncio.to_thread(
            fuse, "review", "reject", second.id, "--as", "bob", "--comment", "no"
        )
        late = await asyncio.to_thread(
            fuse, "review", "approve", second.id, "--as", "ada", check=False
        )
        assert late.returncode == 1 and "was rejected by bob" in late.stderr
        assert (await orch.wait(one, timeout=20)).status == "committed"
        assert (await orch.wait(two, timeout=20)).status == "rolled_back"
        shown = (await asyncio.to_thread(fuse, "review", "show", first.id)).stdout
        assert "approved by ada: ok" in shown and "input edited by ada" in shown
        stuck = await orch.start("refund", saga_id="cli-3")
        assert (await orch.wait(stuck, timeout=20)).status == "stuck"
        resolved = await asyncio.to_thread(
            fuse, "sagas", "resolve", stuck, "--rolled-back", "--comment", "by phone",
            "--as", "ada", "--json",
        )  # fmt: skip
        assert json.loads(resolved.stdout)["status"] == "rolled_back"
        again = await asyncio.to_thread(
            fuse, "sagas", "resolve", stuck, "--retry", "--comment", "x", check=False
        )
        assert again.returncode == 1 and "(ada resolved it), not stuck" in again.stderr
    expected = ["pack", "pack", ("ship", {"to": "cusco"}, "ada"), "unpack"]
    assert sorted(map(str, log)) == sorted(map(str, expected))  # the two sagas interleave
    scored = await asyncio.to_thread(
        fuse, "review", "feedback", "msg-9", "--score", "3", "--comment", "fine", "--as", "ada"
    )
    assert "score 3 by ada; model: no model call recorded" in scored.stdout
    given = await read_feedback(store, "msg-9")
    assert [(f.by, f.score, f.comment) for f in given] == [("ada", 3, "fine")]
    missing = await asyncio.to_thread(fuse, "review", "show", "rvnope", check=False)
    assert missing.returncode == 1 and "no review 'rvnope'" in missing.stderr


async def test_a_review_stream_written_by_someone_else_fails_the_step_and_is_never_obeyed(
    store: JetStreamEventStore,
) -> None:
    log: list[Any] = []
    forged = reviews.review_id("forged-1", "ship")
    stream = reviews.review_stream(forged)
    when = datetime.now(UTC)
    await store.append(
        stream,
        [
            NewEvent(
                data=ReviewRequested(
                    review_id=forged,
                    saga_id="someone-else",
                    step="ship",
                    summary="x",
                    action="x",
                    groups=["ops"],
                    deadline=when + timedelta(hours=1),
                )
            ),
            NewEvent(data={"reviewId": forged, "by": "mallory"}, type="review.approved.v9"),
            NewEvent(data=ReviewApproved(review_id="rvother", saga_id="forged-1", by="mallory")),
        ],
        NO_STREAM,
    )
    folded = await reviews.read_review(store, forged)
    assert folded.status == "pending" and len(folded.ignored) == 2, folded.ignored
    async with Orchestrator(store, [_shipping(log, _ops())]) as orch:
        state = await orch.wait(await orch.start("shipping", {"to": "x"}, saga_id="forged-1"))
    assert state.status == "rolled_back" and log == ["pack", "unpack"]
    assert "requests saga 'someone-else' step 'ship', not this one" in (state.error or "")
    types = [event.type async for event in store.read(saga_stream("forged-1"))]
    assert "saga.step_reviewed" not in types


async def test_a_proposal_that_raises_fails_the_step_for_good(store: JetStreamEventStore) -> None:
    log: list[Any] = []

    def broken(ctx: StepContext) -> dict[str, Any]:
        raise KeyError("box")

    async with Orchestrator(store, [_shipping(log, Review(group="ops", propose=broken))]) as orch:
        state = await orch.wait(await orch.start("shipping", {"to": "x"}), timeout=20)
    assert state.status == "rolled_back" and state.error == "review: KeyError: 'box'"
    assert not (await reviews.read_review(store, reviews.review_id(state.id, "ship"))).requested


def test_a_decision_or_resolution_out_of_place_is_ignored_and_named() -> None:
    saga = _shipping([], _ops())
    state = SagaState("s1")
    state.apply_data(SagaStarted(saga_id="s1", name="shipping", steps=["pack", "ship"]), "1")
    assert next_move(saga, state, datetime.now(UTC)) == Run("pack", "action", 1)
    state.apply_data(StepCompleted(saga_id="s1", step="pack", attempt=1, output="box"), "2")
    assert next_move(saga, state, datetime.now(UTC)) == AwaitReview("ship")
    now = datetime.now(UTC)
    decision = StepReviewed(
        saga_id="s1", step="ship", review_id="rv1", decision="approved", by="ada", decided_at=now
    )
    state.apply_data(msgspec.structs.replace(decision, step="pack"), "3")  # pack ran already
    state.apply_data(SagaResolved(saga_id="s1", step="pack", resolution="retry", by="x"), "4")
    assert state.ignored == [
        "3: step 'pack' is not waiting for its review",
        "4: the saga is active, its step is not stuck",
    ]
    state.apply_data(msgspec.structs.replace(decision, input={"to": "y"}), "5")
    state.apply_data(msgspec.structs.replace(decision, decision="rejected"), "6")  # a second one
    assert state.step_input("ship") == {"to": "y"} and len(state.ignored) == 3
    assert next_move(saga, state, datetime.now(UTC)) == Run("ship", "action", 1)


async def test_an_escalated_review_is_rejected_at_its_second_deadline_and_only_once(
    store: JetStreamEventStore,
) -> None:
    ctx = StepContext(saga_id="esc-1", step="ship", phase="action", attempt=0, input={}, outputs={})
    now = datetime.now(UTC)
    escalating = Review(group="ops", deadline=60, on_deadline=Escalate(["leads", "cto"]))
    opened = await reviews.open_review(
        store, reviews.request_for(escalating, saga_name="shipping", ctx=ctx, now=now)
    )
    again = await reviews.open_review(
        store, reviews.request_for(escalating, saga_name="shipping", ctx=ctx, now=now)
    )
    assert again.version == opened.version == 1  # opened once
    early = await reviews.expire_if_due(store, opened.id, now + timedelta(seconds=59))
    assert (early.status, early.version) == ("pending", 1)
    first, second = await asyncio.gather(
        reviews.expire_if_due(store, opened.id, now + timedelta(seconds=61)),
        reviews.expire_if_due(store, opened.id, now + timedelta(seconds=61)),
    )
    assert first.escalated and second.escalated and first.groups == ["leads", "cto"]
    assert second.deadline == now + timedelta(seconds=121)  # as long again as the first group had
    late = await reviews.expire_if_due(store, opened.id, now + timedelta(seconds=122))
    assert (late.status, late.decided_by) == ("expired", "deadline")
    types = [e.type async for e in store.read(reviews.review_stream(opened.id))]
    assert types == ["review.requested", "review.escalated", "review.expired"]
