"""Addresses: AgentId(type, key) as in AutoGen, and how each address maps onto a subject."""

from __future__ import annotations

from typing import NamedTuple

from newfuse.errors import InvalidNameError
from newfuse.schemas import check_token


def check_agent_name(value: str, *, kind: str) -> str:
    """An agent type, key or topic: one subject token that can also name a durable consumer.

    Raises:
        InvalidNameError: not a token, or it contains `/` or `\\` (not allowed in consumer
            names), or it starts with `_` (reserved: `_topic`, `_reply`, `_handled`, `_dead`,
            `_task`).
    """
    check_token(value, kind=kind)
    for char in "/\\":
        if char in value:
            raise InvalidNameError(
                kind=kind, name=value, reason=f"it contains {char!r} (it names a consumer)"
            )
    if value.startswith("_"):
        raise InvalidNameError(
            kind=kind, name=value, reason="names starting with '_' are reserved for the runtime"
        )
    return value


class AgentId(NamedTuple):
    """One agent instance: its type and its key (string form `type/key`)."""

    type: str
    key: str

    @classmethod
    def parse(cls, text: str) -> AgentId:
        """`type/key` -> AgentId; InvalidNameError naming the part that is wrong."""
        agent_type, slash, key = text.partition("/")
        if not slash:
            raise InvalidNameError(kind="agent id", name=text, reason="write it as type/key")
        return cls.of(agent_type, key)

    @classmethod
    def of(cls, agent_type: str, key: str) -> AgentId:
        """A checked AgentId."""
        return cls(
            check_agent_name(agent_type, kind="agent type"), check_agent_name(key, kind="agent key")
        )

    def __str__(self) -> str:
        return f"{self.type}/{self.key}"
