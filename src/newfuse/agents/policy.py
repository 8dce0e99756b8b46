"""An agent type's message policy: which message types it accepts from which sender types.

nats-server decides who may write to an agent's inbox at all (an identity's `send_to`,
security/identities.py); within that, the receiving runtime checks each message against the
policy its Agent declares (`Agent(accepts={"planner": ["task.assign"]})`) before a handler
runs. An agent that declares no policy accepts every type from every sender, as before
policies existed; one that declares a policy accepts only what it names (an empty one,
nothing). `*` stands for any sender type, or any message type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from newfuse.agents.address import check_agent_name
from newfuse.errors import AgentConfigError, InvalidNameError

ANY: Final = "*"
"""As a sender type: any sender; as a message type: any type."""


def _quoted(name: str, keep: int = 64) -> str:
    # a claimed sender is any text a client writes (without identities): quoted cut short
    return repr(name) if len(name) <= keep else f"{name[:keep]!r}... ({len(name)} characters)"


def sender_type(sender: str) -> str:
    """The agent type a sender name stands for: `planner/1` (an instance, as agents sign what
    they emit) and `planner` are both `planner`."""
    return sender.partition("/")[0]


class MessagePolicy:
    """What one agent type accepts: sender type -> the message types it may send.

    Raises (on construction):
        AgentConfigError: a sender type that is not an agent name, or message types given as
            one string instead of a list (`"task.assign"` would mean its letters).
    """

    def __init__(self, agent: str, accepts: Mapping[str, Iterable[str]]) -> None:
        self.agent = agent
        self._accepts: dict[str, frozenset[str]] = {}
        for sender, types in accepts.items():
            if sender != ANY:
                try:
                    check_agent_name(sender, kind="sender type")
                except InvalidNameError as error:
                    raise AgentConfigError(
                        agent=agent,
                        field="accepts",
                        value=sender,
                        reason=f"a key is a sender's agent type or '*' ({error})",
                    ) from None
            if isinstance(types, str) or not all(isinstance(t, str) and t for t in types):
                raise AgentConfigError(
                    agent=agent,
                    field=f"accepts[{sender!r}]",
                    value=types,
                    reason="give a list of message types, e.g. ['task.assign'] (or ['*'])",
                )
            self._accepts[sender] = frozenset(types)

    def allows(self, sender: str, message_type: str) -> bool:
        """Whether a message of `message_type` from a sender of type `sender` is accepted."""
        for key in (sender, ANY):
            types = self._accepts.get(key, frozenset())
            if message_type in types or ANY in types:
                return True
        return False

    def refusal(self, sender: str) -> str:
        """Why a message from `sender` (a type) was denied: what the policy accepts from it."""
        types = self._accepts.get(sender, frozenset()) | self._accepts.get(ANY, frozenset())
        if types:
            return f"from sender type {_quoted(sender)} it accepts {', '.join(sorted(types))}"
        senders = ", ".join(sorted(self._accepts)) or "none"
        return (
            f"it accepts nothing from sender type {_quoted(sender)} (senders it accepts: {senders})"
        )

    def as_card(self) -> dict[str, list[str]]:
        """The policy as an agent card carries it (`accepts`): sorted, for people and tools."""
        return {sender: sorted(types) for sender, types in sorted(self._accepts.items())}
