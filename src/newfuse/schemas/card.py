"""The agent card: what an agent type is, what it accepts and how to reach it (A2A AgentCard).

Field names are the A2A 1.0 `AgentCard`'s where it has one (camelCase on the wire, like the other
A2A structs); `messageTypes`, `protocolVersions` and `subjects` are newfuse's: the message types
the agent has handlers for, the range of A2A protocol versions it speaks, and the NATS subjects
that reach it. Every field but `name` and `version` has a default, so a card from a newer writer
with fewer fields still decodes.
"""

from __future__ import annotations

import msgspec


class AgentProvider(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Who runs the agent (A2A `AgentProvider`)."""

    organization: str
    url: str | None = None


class AgentSkill(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One thing the agent can do (A2A `AgentSkill`)."""

    id: str
    name: str
    description: str = ""
    tags: list[str] = []
    examples: list[str] = []


class AgentCapabilities(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Optional protocol features the agent supports (A2A `AgentCapabilities`)."""

    streaming: bool = False
    push_notifications: bool = msgspec.field(default=False, name="pushNotifications")
    state_transition_history: bool = msgspec.field(default=False, name="stateTransitionHistory")


class ProtocolVersions(msgspec.Struct, frozen=True, kw_only=True):
    """The A2A protocol versions the agent accepts, oldest and newest (inclusive)."""

    min: str = "1.0"
    max: str = "1.0"


class AgentSubjects(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where the agent is reached on NATS: its type's inbox (any instance, on the message
    stream), the instance inbox pattern (`<key>` stands for the key), the fast path (core NATS
    request/reply; absent when the agent does not answer it) and its topics."""

    inbox: str
    instance: str
    rpc: str | None = None
    topics: list[str] = []


class AgentCard(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An agent type's card (type `agent.card`), carried by `agent.registered` events.

    `name` is the agent's human name (its type unless given), `version` a semantic version.
    """

    name: str
    description: str = ""
    version: str
    provider: AgentProvider | None = None
    skills: list[AgentSkill] = []
    capabilities: AgentCapabilities = AgentCapabilities()
    default_input_modes: list[str] = msgspec.field(default=[], name="defaultInputModes")
    default_output_modes: list[str] = msgspec.field(default=[], name="defaultOutputModes")
    protocol_version: str = msgspec.field(default="1.0", name="protocolVersion")
    message_types: list[str] = msgspec.field(default=[], name="messageTypes")
    protocol_versions: ProtocolVersions = msgspec.field(
        default=ProtocolVersions(), name="protocolVersions"
    )
    protocol_range: str | None = msgspec.field(default=None, name="protocolRange")
    """The range as the agent declares it (`Agent(protocols=...)`, e.g. `>=1.0,<2.0`): what
    it accepts; `protocolVersions` says the oldest it accepts and the newest it reads as is."""
    subjects: AgentSubjects | None = None
    accepts: dict[str, list[str]] | None = None
    """The agent's message policy (`Agent(accepts=...)`): sender type -> the message types it
    accepts from it (`*`: any). None: no policy declared, every type from every sender."""
