"""`fuse models usage` (calls, tokens and latency per agent and model version, from the log)
and `fuse agents replay MODULE:AGENT --context ID | --task ID` (a past conversation, or a
queue's task, handled again, its model calls answered from their records or by another model,
compared with what was stored)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import msgspec

from newfuse.agents import Agent, Worker
from newfuse.agents.models import LocalModelProvider, ModelProvider, OpenAICompatibleProvider
from newfuse.agents.models.usage import ModelCalls, Usage, usage
from newfuse.agents.replay import Replay, ReplayedMessage
from newfuse.cli._common import (
    Commands,
    load_attribute,
    message_keys,
    message_stream,
    optional_time,
)
from newfuse.cli._output import note, print_json, print_table, rfc3339, stdout_console
from newfuse.errors import ConfigError


def register(commands: Commands) -> None:
    models = commands.add_parser("models")
    actions = models.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    usage_parser = actions.add_parser(
        "usage",
        help="calls, errors, tokens and latency per agent and model version",
        description="Sum the model.invoked records of the log per agent type and model "
        "version (provider, model asked for, model that answered, revision): a table, or "
        "JSON Lines with --json. Reads by direct get: nothing is consumed or written.",
    )
    usage_parser.add_argument("--agent", metavar="TYPE", help="only this agent type's calls")
    usage_parser.add_argument("--context", metavar="ID", help="only this conversation's calls")
    usage_parser.add_argument(
        "--since", metavar="TIME", help="only calls from TIME on (RFC 3339, or 10m, 2h ago)"
    )
    usage_parser.set_defaults(handler=run_usage)


def register_replay_action(actions: Any) -> None:
    replay = actions.add_parser(
        "replay",
        help="handle a past conversation again, model calls answered from the log",
        description="Run MODULE:AGENT's handlers again, in this process, over the messages "
        "of conversation --context (or of task --task) that reached its type, with every "
        "model call answered from its recorded model.invoked result (deterministic, no model "
        "is called), or by --provider / --model; print per message whether the model answers "
        "and the effects (replies, sends, task changes) are the ones stored. MODULE:AGENT may "
        "name a queue's Worker: its tasks are handled again as its workers did (the return "
        "value as the completed status). Nothing is written to the bus.",
    )
    replay.add_argument(
        "agent", metavar="MODULE:AGENT", help="an Agent or a Worker, e.g. myapp.agents:writer"
    )
    replay.add_argument("--context", metavar="ID", help="the conversation")
    replay.add_argument("--task", metavar="ID", help="the task (a queue's, or any A2A task)")
    replay.add_argument(
        "--provider",
        metavar="SPEC",
        help="answer model calls with this provider: `local` (the echo model), an "
        "OpenAI-compatible base URL (http://host:11434/v1; key from $OPENAI_API_KEY), or "
        "MODULE:NAME of a provider or of a function that returns one",
    )
    replay.add_argument(
        "--model", metavar="NAME", help="ask for this model instead of the one the handler names"
    )
    replay.add_argument(
        "--details", action="store_true", help="print each call and effect, not only the summary"
    )
    replay.set_defaults(handler=run_replay)


def usage_json(row: Usage) -> dict[str, Any]:
    """A usage row as the JSON Lines of `--json`."""
    return {
        "agent": row.agent,
        "provider": row.provider,
        "request_model": row.request_model,
        "response_model": row.response_model,
        "revision": row.revision,
        "calls": row.calls,
        "errors": row.errors,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "latency_ms": round(row.latency_ms, 3),
        "mean_latency_ms": round(row.mean_latency_ms, 3),
        "first": rfc3339(row.first),
        "last": rfc3339(row.last),
    }


async def run_usage(args: argparse.Namespace) -> int:
    since = optional_time(args.since, flag="--since")
    async with message_stream(args, name="fuse-models-usage") as (nc, prefix):
        calls = ModelCalls(nc, prefix=prefix)
        found = [
            stored
            async for stored in calls.records(
                agent=args.agent, context_id=args.context, since=since
            )
        ]
    rows = usage(found)
    for skipped in calls.skipped:
        note(f"skipped: {skipped}")
    if args.json:
        for row in rows:
            print_json(usage_json(row))
        return 0
    print_table(
        [
            [
                row.agent,
                row.provider,
                row.request_model,
                row.response_model,
                row.revision,
                row.calls,
                row.errors,
                row.input_tokens,
                row.output_tokens,
                f"{row.latency_ms:.1f}",
                f"{row.mean_latency_ms:.1f}",
            ]
            for row in rows
        ],
        [
            "AGENT",
            "PROVIDER",
            "MODEL",
            "RESPONSE MODEL",
            "REVISION",
            "CALLS",
            "ERRORS",
            "IN TOKENS",
            "OUT TOKENS",
            "LATENCY MS",
            "MEAN MS",
        ],
    )
    note(f"{sum(row.calls for row in rows)} call(s) in {len(rows)} row(s)")
    return 0


def load_provider(spec: str) -> ModelProvider:
    """The provider `--provider` names.

    Raises:
        ConfigError: MODULE:NAME does not name a provider (or a function returning one).
    """
    if spec == "local":
        return LocalModelProvider()
    if spec.startswith(("http://", "https://")):
        return OpenAICompatibleProvider(spec, api_key=os.environ.get("OPENAI_API_KEY"))
    found = load_attribute(spec, option="--provider", example="myapp.models:provider")
    if callable(found) and not hasattr(found, "chat"):
        found = found()
    if not (hasattr(found, "chat") and hasattr(found, "stream") and hasattr(found, "name")):
        raise ConfigError(
            variable="--provider",
            value=spec,
            reason=f"it is a {type(found).__name__}, not a model provider (name, chat, stream)",
        )
    provider: ModelProvider = found
    return provider


def replayed_json(replayed: ReplayedMessage) -> dict[str, Any]:
    """One replayed message as the JSON Lines of `--json`."""
    built: dict[str, Any] = msgspec.to_builtins(replayed)
    return built


def _short(value: Any, keep: int = 60) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= keep else text[: keep - 1] + "…"


def _summary(replayed: ReplayedMessage) -> str:
    if replayed.error is not None:
        return f"handler raised {replayed.error}"
    for call in replayed.calls:
        if call.diverged:
            old = call.recorded.content if call.recorded else None
            new = call.replayed.content if call.replayed else None
            return f"call {call.call}: {call.reason}: {_short(old, 40)!s} -> {_short(new, 40)!s}"
    for effect in replayed.effects:
        if effect.change != "same":
            return f"{effect.type} {effect.change} on {effect.subject.split('.', 1)[-1]}"
    return ""


def _pair(console: Any, recorded: Any, replayed: Any) -> None:
    for label, value in (("recorded", recorded), ("replayed", replayed)):
        console.print(f"    {label}: {_short(value, 200)}", highlight=False, markup=False)


def load_replayable(spec: str) -> Agent | Worker:
    """The Agent or Worker named by `module:attribute`.

    Raises:
        ConfigError: it cannot be found, or is neither.
    """
    found = load_attribute(spec, option="MODULE:AGENT", example="myapp.agents:writer")
    if not isinstance(found, Agent | Worker):
        raise ConfigError(
            variable="MODULE:AGENT",
            value=spec,
            reason=f"it is a {type(found).__name__}, not a newfuse.agents.Agent or Worker",
        )
    return found


async def run_replay(args: argparse.Namespace) -> int:
    if args.context is None and args.task is None:
        raise ConfigError(
            variable="--context/--task",
            value=None,
            reason="name the conversation (--context ID) or the task (--task ID) to replay",
        )
    agent = load_replayable(args.agent)
    provider = load_provider(args.provider) if args.provider else None
    try:
        async with (
            message_stream(args, name="fuse-agents-replay") as (nc, prefix),
            message_keys(nc, prefix) as cipher,
        ):
            replay = Replay(
                nc, agent, prefix=prefix, provider=provider, model=args.model, cipher=cipher
            )
            results = [
                replayed async for replayed in replay.messages(args.context, task_id=args.task)
            ]
    finally:
        if isinstance(provider, OpenAICompatibleProvider):
            await provider.aclose()
    for skipped in replay.skipped:
        note(f"skipped: {skipped}")
    diverged = sum(1 for replayed in results if replayed.diverged)
    if not results:
        what = " and ".join(
            f"{name} {value!r}"
            for name, value in (("conversation", args.context), ("task", args.task))
            if value is not None
        )
        note(f"no message of {what} reached agent type {replay.agent.type!r}")
    if args.json:
        for replayed in results:
            print_json(replayed_json(replayed))
    else:
        _print_replay(results, details=args.details)
    if results:
        note(f"{len(results)} message(s) replayed, {diverged} diverged from the log")
    return 0


def _print_replay(results: list[ReplayedMessage], *, details: bool) -> None:
    print_table(
        [
            [
                replayed.position,
                replayed.type,
                len(replayed.calls),
                sum(1 for e in replayed.effects if e.change != "missing"),
                "diverged" if replayed.diverged else "same",
                _summary(replayed),
            ]
            for replayed in results
        ],
        ["POS", "TYPE", "CALLS", "EFFECTS", "RESULT", "WHERE"],
    )
    if details:
        console = stdout_console()
        for replayed in results:
            console.print(f"[bold]message {replayed.position}[/] ({replayed.type})")
            for call in replayed.calls:
                old = call.recorded.content if call.recorded else None
                new = call.replayed.content if call.replayed else None
                mark = call.reason or "same"
                console.print(f"  call {call.call}: {mark}", highlight=False)
                _pair(console, old, new)
            for effect in replayed.effects:
                console.print(f"  {effect.type} {effect.id[:8]}: {effect.change}", highlight=False)
                if effect.change == "changed":
                    _pair(console, effect.recorded, effect.replayed)
