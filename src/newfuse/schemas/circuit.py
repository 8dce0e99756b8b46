"""Circuit breaker state changes as events: `circuit.opened`, `circuit.half_opened`,
`circuit.closed` (registered types; the agents layer appends them, newfuse.reliability makes
the changes)."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

BreakerState = Literal["closed", "open", "half-open"]


class CircuitChange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A circuit breaker moved from `previous` to the state its type names.

    Attributes:
        circuit: the breaker's name (what it guards).
        previous: the state it left.
        failures: failures in a row when it moved (what opened it).
        timestamp: when it moved (the writer's clock).
    """

    circuit: str
    previous: BreakerState
    failures: int = 0
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class CircuitOpened(CircuitChange, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `circuit.opened`: calls are refused until a trial."""


class CircuitHalfOpened(CircuitChange, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `circuit.half_opened`: trial calls go through."""


class CircuitClosed(CircuitChange, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `circuit.closed`: calls go through again."""


CIRCUIT_TYPES: Final[dict[BreakerState, tuple[str, type[CircuitChange]]]] = {
    "open": ("circuit.opened", CircuitOpened),
    "half-open": ("circuit.half_opened", CircuitHalfOpened),
    "closed": ("circuit.closed", CircuitClosed),
}
"""The event type and payload of a move into each state."""
