"""`fuse review list|show|claim|approve|reject|edit|feedback`: people decide saga steps that
wait for review, and score agents' results.

On a secured bus (the store connects with credentials and checks who signed each event) you
are who your credentials say: the name and the groups come from their certificate (`fuse auth
add NAME --role reviewer --group ops`); `--as` and `--group` (or $FUSE_REVIEWER and
$FUSE_REVIEWER_GROUPS) are not needed, and naming someone else, or a group the certificate does
not, is an error. Elsewhere you are what you say: `--as NAME` (else $FUSE_REVIEWER, else the
OS user) and `--group G` (repeatable; else $FUSE_REVIEWER_GROUPS, comma-separated). Either way
the review checks the group against the ones it declares.
"""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

import msgspec

from newfuse.cli._common import Commands, message_stream, open_store, read_data
from newfuse.cli._output import note, print_json, print_table, rfc3339
from newfuse.core import feedback, review
from newfuse.core.review import Reviewer, ReviewState
from newfuse.errors import ConfigError, FuseError, ReviewNotFoundError
from newfuse.eventstore import EventStore

REVIEWER_ENV = "FUSE_REVIEWER"
GROUPS_ENV = "FUSE_REVIEWER_GROUPS"


def register(commands: Commands) -> None:
    """Add `fuse review` and its actions."""
    parser = commands.add_parser("review")
    actions = parser.add_subparsers(dest="review_action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="every review: status, saga and step, who may decide, deadline",
        description="Every review (its `review.<id>` stream folded); JSON Lines with --json: "
        "id, status, saga_id, step, summary, groups, claimed_by, deadline, decided_by, ...",
    )
    listing.add_argument("--status", choices=review.STATUSES, help="only reviews in this status")
    listing.set_defaults(handler=run_list)
    show = actions.add_parser(
        "show", help="one review: what to review, the input, who did what and when"
    )
    show.add_argument("review", metavar="ID")
    show.set_defaults(handler=run_show)
    for name, text in (
        ("claim", "take a review: from now only you may edit or decide it"),
        ("approve", "approve: the step runs with the review's input"),
        ("reject", "reject: the step fails for good, the saga compensates"),
        ("edit", "replace the input the step runs with when approved"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("review", metavar="ID")
        _identity(action)
        if name in ("approve", "reject"):
            action.add_argument(
                "--comment", required=name == "reject", default="", help="why (kept in the log)"
            )
        if name == "edit":
            action.add_argument(
                "--input", required=True, metavar="JSON", help="a JSON object, @FILE or -"
            )
        action.set_defaults(handler=run_decide)
    scoring = actions.add_parser(
        "feedback",
        help="score an agent's result: linked to the message and the model that made it",
        description="Append feedback.given {messageId, score, comment, by, model} on "
        "feedback.<MESSAGE_ID>; the model version is the one the message's handling recorded "
        "in its last model.invoked, when it recorded one.",
    )
    scoring.add_argument("message", metavar="MESSAGE_ID")
    scoring.add_argument("--score", type=int, required=True, help="a whole number, -10 to 10")
    scoring.add_argument("--comment", default="")
    _identity(scoring, groups=False)
    scoring.set_defaults(handler=run_feedback)


def _identity(parser: argparse.ArgumentParser, *, groups: bool = True) -> None:
    parser.add_argument(
        "--as",
        dest="reviewer",
        metavar="NAME",
        help=f"who you are (${REVIEWER_ENV}, OS user; on a secured bus your credentials say it)",
    )
    if groups:
        parser.add_argument(
            "--group",
            action="append",
            default=None,
            metavar="GROUP",
            help=f"a group you act for (repeatable; ${GROUPS_ENV}, comma-separated)",
        )


def reviewer_of(args: argparse.Namespace, store: EventStore | None = None) -> Reviewer:
    """The reviewer `store` signs as, when it checks signers (the flags or the environment,
    when given, must agree); else the one the flags, else the environment, else the OS user
    name say."""
    name = args.reviewer or os.environ.get(REVIEWER_ENV)
    given = getattr(args, "group", None)
    if given is None:
        given = [g.strip() for g in os.environ.get(GROUPS_ENV, "").split(",") if g.strip()]
    if store is not None and store.verifies_signers:
        return review.signed_reviewer(store, name, given)
    return Reviewer(name or getpass.getuser(), tuple(given))


def review_json(state: ReviewState) -> dict[str, Any]:
    """A review as `--json` prints it."""
    return {
        "id": state.id,
        "status": state.status,
        "saga_id": state.saga_id,
        "step": state.step,
        "action": state.action,
        "summary": state.summary,
        "proposed_input": state.proposed,
        "input": state.input,
        "groups": state.groups,
        "escalated": state.escalated,
        "claimed_by": state.claimed_by,
        "deadline": rfc3339(state.deadline),
        "on_deadline": state.on_deadline,
        "decided_by": state.decided_by,
        "decided_at": rfc3339(state.decided_at),
        "comment": state.comment,
        "requested_at": rfc3339(state.requested_at),
        "history": state.history,
        "ignored": state.ignored,
        "version": state.version,
    }


async def run_list(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        found = [s async for s in review.list_reviews(store) if args.status in (None, s.status)]
    found.sort(key=lambda s: (s.requested_at is None, s.requested_at))
    if args.json:
        for state in found:
            print_json(review_json(state))
        return 0
    print_table(
        [
            [
                s.id,
                s.status,
                s.saga_id,
                s.step,
                ", ".join(s.groups),
                s.claimed_by or s.decided_by or "",
                s.deadline,
                s.summary,
            ]
            for s in found
        ],
        ["ID", "STATUS", "SAGA", "STEP", "GROUPS", "BY", "DEADLINE", "SUMMARY"],
    )
    note(f"{len(found)} review(s)")
    return 0


async def run_show(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        state = await review.read_review(store, args.review)
    if not state.requested:
        raise ReviewNotFoundError(review_id=args.review)
    _print(state, args)
    return 0


def _print(state: ReviewState, args: argparse.Namespace) -> None:
    if args.json:
        print_json(review_json(state))
        return
    print(f"review {state.id}: {state.status} ({state.action}, saga {state.saga_id})")
    print(f"  {state.summary}")
    print(f"  decided by: {', '.join(state.groups)}; deadline {rfc3339(state.deadline)}")
    print(f"  input: {msgspec.json.encode(state.input).decode()}")
    for line in state.history:
        print(f"  {line}")
    for ignored in state.ignored:
        note(f"ignored: {ignored}")


async def run_decide(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        reviewer = reviewer_of(args, store)
        action = args.review_action
        if action == "claim":
            state = await review.claim(store, args.review, reviewer)
        elif action == "approve":
            state = await review.approve(store, args.review, reviewer, args.comment)
        elif action == "reject":
            state = await review.reject(store, args.review, reviewer, args.comment)
        else:
            state = await review.edit(store, args.review, reviewer, _input(args.input))
    _print(state, args)
    return 0


def _input(text: str) -> Any:
    raw = read_data(text, flag="--input")
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as error:
        raise ConfigError(variable="--input", value=text, reason=f"not JSON: {error}") from None


async def run_feedback(args: argparse.Namespace) -> int:
    by = args.reviewer or os.environ.get(REVIEWER_ENV) or getpass.getuser()
    # a wrong score or name is refused before the model records are searched
    feedback.check_feedback(args.message, score=args.score, by=by, comment=args.comment)
    found = None
    try:
        async with message_stream(args, name="fuse-review-feedback") as (nc, prefix):
            from newfuse.agents.models.usage import ModelCalls

            found = await feedback.model_of(ModelCalls(nc, prefix=prefix), args.message)
    except FuseError as error:  # no message stream here: the feedback links the message only
        note(f"no model records read ({error})")
    agent, model = found if found is not None else (None, None)
    async with await open_store(args, create=True) as store:
        given = await feedback.give_feedback(
            store,
            args.message,
            score=args.score,
            by=by,
            comment=args.comment,
            model=model,
            agent=agent,
        )
    if args.json:
        print_json(msgspec.to_builtins(given))
        return 0
    made = "no model call recorded"
    if model is not None:
        made = f"{model.provider} {model.response_model or model.request_model}"
        made += f" (revision {model.revision})" if model.revision else ""
    print(f"feedback on {args.message}: score {given.score} by {given.by}; model: {made}")
    return 0
