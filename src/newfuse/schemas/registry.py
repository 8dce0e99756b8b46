"""The type registry: payload structs by (type name, schema version), upcasters, strict categories.

The registry is open. A registered type's payload is validated on append and decoded into the
newest struct version on read (older versions pass through the chain of upcasters). An
unregistered type is stored and delivered as raw JSON, unless its stream's category is declared
strict, which rejects unregistered types on append.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgspec

from newfuse.errors import (
    InvalidPayloadError,
    MissingUpcasterError,
    SchemaRegistrationError,
    UnknownTypeError,
    UnknownVersionError,
)
from newfuse.schemas.a2a import LIFECYCLE_TYPES, DeadLetter, TaskStatusUpdate
from newfuse.schemas.aggregate import AggregateClosed, AggregateLate
from newfuse.schemas.audit import AUDIT_TYPES
from newfuse.schemas.card import AgentCard
from newfuse.schemas.circuit import CIRCUIT_TYPES
from newfuse.schemas.lock import LOCK_TYPES
from newfuse.schemas.model import ModelInvoked
from newfuse.schemas.names import check_category, check_type_name
from newfuse.schemas.payloads import A2AMessage, StateUpdate, Transaction
from newfuse.schemas.review import REVIEW_TYPES
from newfuse.schemas.saga import SAGA_TYPES
from newfuse.schemas.sealed import KEY_FORGOTTEN, KeyForgotten, SealPlan, seal_plan
from newfuse.schemas.security import SECURITY_TYPES

S = TypeVar("S", bound=type[msgspec.Struct])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_PATH_RE = re.compile(r" - at `(\$[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `([^`]*)`$")
_JSON = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


def _split_validation(error: msgspec.ValidationError | msgspec.DecodeError) -> tuple[str, str]:
    """msgspec says "Expected `int`, got `str` - at `$.version`": return (path, reason).

    For a missing field msgspec gives the path of the object that lacks it; the field is appended
    so the path names the field itself (`$.metadata.sender`).
    """
    text = str(error)
    match = _PATH_RE.search(text)
    path, reason = (match.group(1), text[: match.start()]) if match else ("$", text)
    missing = _MISSING_RE.match(reason)
    if missing:
        path = f"{path}.{missing.group(1)}"
    return path, reason


class SchemaRegistry:
    """Maps event types to payload structs per schema version, and chains upcasters.

    Example:
        >>> registry = SchemaRegistry()
        >>> @registry.register("order.placed", 2)
        ... class OrderPlaced(msgspec.Struct, frozen=True, kw_only=True):
        ...     order_id: str
        ...     amount_cents: int
        >>> @registry.upcaster("order.placed", 1)
        ... def _v1_to_v2(v1: dict[str, Any]) -> dict[str, Any]:
        ...     return {"order_id": v1["id"], "amount_cents": round(v1["amount"] * 100)}

        Now `registry.decode("order.placed", 1, b'{"id": "o1", "amount": 2.5}')` returns
        `OrderPlaced(order_id="o1", amount_cents=250)`.
    """

    def __init__(self) -> None:
        self._structs: dict[str, dict[int, type[msgspec.Struct]]] = {}
        self._decoders: dict[tuple[str, int], msgspec.json.Decoder[Any]] = {}
        # Per type: its newest version and that version's decoder (decode's fast path).
        self._newest: dict[str, tuple[int, msgspec.json.Decoder[Any]]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._by_class: dict[type[msgspec.Struct], tuple[str, int]] = {}
        self._strict: set[str] = set()
        self._sealed: dict[tuple[str, int], SealPlan] = {}
        self.any_sealed = False
        """Whether any registered struct declares sealed fields (decode's quick check)."""

    # -- declaring -------------------------------------------------------------------------------

    def register(self, type_name: str, version: int = 1) -> Callable[[S], S]:
        """Class decorator: declare `cls` as the payload of `type_name` at schema `version`.

        Args:
            type_name: the event type, dot-separated tokens such as `order.placed`.
            version: the schema version the struct describes (>= 1).

        Returns:
            A decorator that registers the class and returns it unchanged.
        """

        def decorate(cls: S) -> S:
            self.add(type_name, version, cls)
            return cls

        return decorate

    def add(self, type_name: str, version: int, cls: type[msgspec.Struct]) -> None:
        """Declare `cls` as the payload of `type_name` at schema `version` (>= 1).

        Registering the same class again at the same place is a no-op.

        Raises:
            InvalidNameError: `type_name` is not a valid type name.
            SchemaRegistrationError: the version is below 1, `cls` is not a msgspec Struct, the
                place is taken by another class, or `cls` is registered elsewhere.
        """
        check_type_name(type_name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SchemaRegistrationError(
                type_name=type_name, version=version, reason="schema versions start at 1"
            )
        if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
            raise SchemaRegistrationError(
                type_name=type_name,
                version=version,
                reason=f"{cls!r} is not a msgspec.Struct class",
            )
        versions = self._structs.get(type_name, {})
        taken = versions.get(version)
        if taken is not None and taken is not cls:
            raise SchemaRegistrationError(
                type_name=type_name,
                version=version,
                reason=f"it is already registered as {taken.__qualname__}",
            )
        elsewhere = self._by_class.get(cls)
        if elsewhere is not None and elsewhere != (type_name, version):
            raise SchemaRegistrationError(
                type_name=type_name,
                version=version,
                reason=f"{cls.__qualname__} is already registered as {elsewhere[0]!r} "
                f"v{elsewhere[1]}; one struct class describes one type and version",
            )
        decoder = msgspec.json.Decoder(cls)  # fails here, not on first use, if cls is unusable
        try:
            plan = seal_plan(type_name, version, cls)
        except ValueError as error:
            raise SchemaRegistrationError(
                type_name=type_name, version=version, reason=str(error)
            ) from None
        if plan is not None:
            self._sealed[(type_name, version)] = plan
            self.any_sealed = True
        self._structs.setdefault(type_name, {})[version] = cls
        self._decoders[(type_name, version)] = decoder
        newest = max(self._structs[type_name])
        self._newest[type_name] = (newest, self._decoders[(type_name, newest)])
        self._by_class[cls] = (type_name, version)

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: a function turning a v`from_version` payload (a dict) into v+1.

        The function receives and returns plain JSON values (dicts keyed by wire names, e.g.
        `agentId`); upcasters chain, so v1 data passes v1->v2->v3 to reach a v3 struct.

        Raises:
            SchemaRegistrationError: `from_version` is below 1, or another function already
                upcasts that version.
        """
        check_type_name(type_name)
        if not isinstance(from_version, int) or isinstance(from_version, bool) or from_version < 1:
            raise SchemaRegistrationError(
                type_name=type_name,
                version=from_version,
                reason="an upcaster starts from a schema version >= 1",
            )

        def decorate(fn: Upcaster) -> Upcaster:
            taken = self._upcasters.get((type_name, from_version))
            if taken is not None and taken is not fn:
                raise SchemaRegistrationError(
                    type_name=type_name,
                    version=from_version,
                    reason=f"an upcaster to v{from_version + 1} exists already "
                    f"({getattr(taken, '__qualname__', taken)!r})",
                )
            self._upcasters[(type_name, from_version)] = fn
            return fn

        return decorate

    def declare_strict(self, category: str) -> None:
        """Reject appends of unregistered types to streams of `category`."""
        self._strict.add(check_category(category))

    # -- looking up ------------------------------------------------------------------------------

    def is_registered(self, type_name: str) -> bool:
        """Whether `type_name` has at least one registered payload struct."""
        return type_name in self._structs

    def is_strict(self, category: str) -> bool:
        """Whether streams of `category` reject unregistered types."""
        return category in self._strict

    def latest_version(self, type_name: str) -> int:
        """The newest schema version of a registered type.

        Raises:
            UnknownTypeError: the type is not registered.
        """
        versions = self._structs.get(type_name)
        if not versions:
            raise UnknownTypeError(type_name=type_name)
        return max(versions)

    def struct_for(self, type_name: str, version: int | None = None) -> type[msgspec.Struct]:
        """The struct of `type_name` at `version` (default: the newest).

        Raises:
            UnknownTypeError: the type is not registered.
            UnknownVersionError: the type has no struct at `version`.
        """
        versions = self._structs.get(type_name)
        if not versions:
            raise UnknownTypeError(type_name=type_name)
        version = max(versions) if version is None else version
        if version not in versions:
            raise UnknownVersionError(type_name=type_name, version=version, known=sorted(versions))
        return versions[version]

    def type_of(self, payload: msgspec.Struct | type[msgspec.Struct]) -> tuple[str, int]:
        """(type name, schema version) under which a payload's struct class is registered.

        Raises:
            UnknownTypeError: the class is not registered (the error names the class).
        """
        cls = payload if isinstance(payload, type) else type(payload)
        try:
            return self._by_class[cls]
        except KeyError:
            raise UnknownTypeError(
                type_name=cls.__name__, context="struct class has no registered type name"
            ) from None

    def sealed(self, type_name: str, version: int) -> SealPlan | None:
        """The plan of the personal and secret fields `type_name` declares at `version`, None
        when it declares none (or is not registered). Payloads the registry encodes and decodes
        are the plaintext; the store seals and opens them (newfuse.schemas.sealed)."""
        return self._sealed.get((type_name, version)) if self.any_sealed else None

    def types(self) -> Iterator[tuple[str, int, type[msgspec.Struct]]]:
        """Every registered (type name, version, struct), sorted by name then version."""
        for name in sorted(self._structs):
            for version in sorted(self._structs[name]):
                yield name, version, self._structs[name][version]

    def upcasters(self) -> Iterator[tuple[str, int]]:
        """Every registered upcaster as (type name, from version), sorted."""
        yield from sorted(self._upcasters)

    # -- encoding and decoding ---------------------------------------------------------------------

    def encode(self, type_name: str, version: int, data: Any) -> bytes:
        """Validate `data` (a struct or plain JSON value) against its schema and encode it.

        Unregistered types are encoded as they are. A registered type's payload must be its
        struct at `version`, or a value that converts to it. Struct instances are checked too
        (msgspec does not validate on construction), so a wrongly typed field never reaches
        the wire.

        Raises:
            UnknownVersionError: the type is registered, but not at `version`.
            InvalidPayloadError: `data` does not match the schema; names the field path.
        """
        versions = self._structs.get(type_name)
        if versions is None:
            try:
                return _ENCODER.encode(data)
            except (TypeError, msgspec.EncodeError) as error:
                raise InvalidPayloadError(
                    type_name=type_name, version=version, path="$", reason=str(error)
                ) from None
        if version not in versions:
            raise UnknownVersionError(type_name=type_name, version=version, known=sorted(versions))
        cls = versions[version]
        if not isinstance(data, cls):
            if isinstance(data, msgspec.Struct):
                raise InvalidPayloadError(
                    type_name=type_name,
                    version=version,
                    path="$",
                    reason=f"got a {type(data).__name__}, expected {cls.__name__}",
                )
            try:
                data = msgspec.convert(data, cls)
            except msgspec.ValidationError as error:
                path, reason = _split_validation(error)
                raise InvalidPayloadError(
                    type_name=type_name, version=version, path=path, reason=reason
                ) from None
        try:
            encoded = _ENCODER.encode(data)
        except (TypeError, msgspec.EncodeError) as error:
            raise InvalidPayloadError(
                type_name=type_name, version=version, path="$", reason=str(error)
            ) from None
        self._decode_exact(type_name, version, encoded)  # what we write, we can read back
        return encoded

    def newest_decoder(self, type_name: str, version: int) -> msgspec.json.Decoder[Any] | None:
        """The decoder of `type_name` if `version` is its newest registered version (a payload
        it decodes needs no upcasting), else None: then only `decode` knows what to do."""
        newest_known = self._newest.get(type_name)
        if newest_known is not None and newest_known[0] == version:
            return newest_known[1]
        return None

    def decode(self, type_name: str, version: int, raw: bytes | msgspec.Raw) -> Any:
        """Decode a payload into the newest struct of its type, upcasting older versions.

        An unregistered type decodes to its raw JSON value.

        Raises:
            UnknownVersionError: `version` is newer than the newest, or neither registered nor
                upcastable; MissingUpcasterError (a subclass) when the chain has a gap.
            InvalidPayloadError: the payload does not match the schema of `version`, or an
                upcaster failed or produced something the newest schema rejects.
        """
        newest_known = self._newest.get(type_name)
        if newest_known is not None and newest_known[0] == version:  # the common case
            try:
                return newest_known[1].decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass  # invalid: decoded again below, which reports where and why
        versions = self._structs.get(type_name)
        if versions is None:
            try:
                return _JSON.decode(raw)
            except msgspec.DecodeError as error:
                path, reason = _split_validation(error)
                raise InvalidPayloadError(
                    type_name=type_name, version=version, path=path, reason=reason
                ) from None
        newest = max(versions)
        if version == newest:
            return self._decode_exact(type_name, version, raw)
        known = sorted(versions)
        if version > newest or (
            version not in versions and (type_name, version) not in self._upcasters
        ):
            raise UnknownVersionError(type_name=type_name, version=version, known=known)
        # Check the whole chain before decoding, so a gap is reported as such.
        for step in range(version, newest):
            if (type_name, step) not in self._upcasters:
                raise MissingUpcasterError(
                    type_name=type_name,
                    version=version,
                    known=known,
                    missing_from=step,
                    newest=newest,
                )
        # Older version: plain JSON values through the upcaster chain, then the newest struct.
        if version in versions:
            value: Any = msgspec.to_builtins(self._decode_exact(type_name, version, raw))
        else:
            try:
                value = _JSON.decode(raw)
            except msgspec.DecodeError as error:
                path, reason = _split_validation(error)
                raise InvalidPayloadError(
                    type_name=type_name, version=version, path=path, reason=reason
                ) from None
        for step in range(version, newest):
            upcast = self._upcasters[(type_name, step)]
            try:
                value = upcast(value)
            except Exception as error:
                raise InvalidPayloadError(
                    type_name=type_name,
                    version=version,
                    path="$",
                    reason=f"upcaster v{step}->v{step + 1} "
                    f"({getattr(upcast, '__qualname__', upcast)}) raised "
                    f"{type(error).__name__}: {error}",
                ) from error
        try:
            return msgspec.convert(value, versions[newest])
        except msgspec.ValidationError as error:
            path, reason = _split_validation(error)
            raise InvalidPayloadError(
                type_name=type_name,
                version=newest,
                path=path,
                reason=f"{reason} (after upcasting from v{version})",
            ) from None

    def _decode_exact(self, type_name: str, version: int, raw: bytes | msgspec.Raw) -> Any:
        try:
            return self._decoders[(type_name, version)].decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            path, reason = _split_validation(error)
            raise InvalidPayloadError(
                type_name=type_name, version=version, path=path, reason=reason
            ) from None


def default_registry() -> SchemaRegistry:
    """A new registry with newfuse's built-in types."""
    registry = SchemaRegistry()
    registry.add("a2a.message", 1, A2AMessage)
    registry.add("agent.state_update", 1, StateUpdate)
    registry.add("transaction", 1, Transaction)
    registry.add("task.status", 1, TaskStatusUpdate)
    registry.add("agent.card", 1, AgentCard)
    registry.add("agent.dead_letter", 1, DeadLetter)
    registry.add("model.invoked", 1, ModelInvoked)
    registry.add(KEY_FORGOTTEN, 1, KeyForgotten)
    for name, cls in LIFECYCLE_TYPES.items():
        registry.add(name, 1, cls)
    for name, change in CIRCUIT_TYPES.values():
        registry.add(name, 1, change)
    registry.add("aggregate.closed", 1, AggregateClosed)
    registry.add("aggregate.late", 1, AggregateLate)
    for name, struct in SAGA_TYPES.items():
        registry.add(name, 1, struct)
    for name, struct in LOCK_TYPES.items():
        registry.add(name, 1, struct)
    for name, struct in REVIEW_TYPES.items():
        registry.add(name, 1, struct)
    for name, struct in AUDIT_TYPES.items():
        registry.add(name, 1, struct)
    for name, struct in SECURITY_TYPES.items():
        registry.add(name, 1, struct)
    return registry
