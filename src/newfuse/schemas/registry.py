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

from newfuse.errors import InvalidPayloadError, UnknownTypeError, UnknownVersionError
from newfuse.schemas.payloads import A2AMessage, StateUpdate, Transaction

S = TypeVar("S", bound=type[msgspec.Struct])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_PATH_RE = re.compile(r" - at `(\$[^`]*)`$")
_JSON = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


def _split_validation(error: msgspec.ValidationError | msgspec.DecodeError) -> tuple[str, str]:
    """msgspec says "Expected `int`, got `str` - at `$.version`": return (path, reason)."""
    text = str(error)
    match = _PATH_RE.search(text)
    if match:
        return match.group(1), text[: match.start()]
    return "$", text


class SchemaRegistry:
    """Maps event types to payload structs per schema version, and chains upcasters."""

    def __init__(self) -> None:
        self._structs: dict[str, dict[int, type[msgspec.Struct]]] = {}
        self._decoders: dict[tuple[str, int], msgspec.json.Decoder[Any]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._by_class: dict[type[msgspec.Struct], tuple[str, int]] = {}
        self._strict: set[str] = set()

    # -- declaring -------------------------------------------------------------------------------

    def register(self, type_name: str, version: int = 1) -> Callable[[S], S]:
        """Class decorator: declare `cls` as the payload of `type_name` at schema `version`."""

        def decorate(cls: S) -> S:
            self.add(type_name, version, cls)
            return cls

        return decorate

    def add(self, type_name: str, version: int, cls: type[msgspec.Struct]) -> None:
        """Declare `cls` as the payload of `type_name` at schema `version` (>= 1)."""
        if version < 1:
            raise ValueError(f"schema version of {type_name!r} must be >= 1, got {version}")
        versions = self._structs.setdefault(type_name, {})
        if versions.get(version, cls) is not cls:
            raise ValueError(
                f"{type_name!r} v{version} is already registered as {versions[version].__name__}"
            )
        versions[version] = cls
        self._decoders[(type_name, version)] = msgspec.json.Decoder(cls)
        self._by_class[cls] = (type_name, version)

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: a function turning a v`from_version` payload (a dict) into v+1."""

        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[(type_name, from_version)] = fn
            return fn

        return decorate

    def declare_strict(self, category: str) -> None:
        """Reject appends of unregistered types to streams of `category`."""
        self._strict.add(category)

    # -- looking up ------------------------------------------------------------------------------

    def is_registered(self, type_name: str) -> bool:
        return type_name in self._structs

    def is_strict(self, category: str) -> bool:
        return category in self._strict

    def latest_version(self, type_name: str) -> int:
        """The newest schema version of a registered type."""
        versions = self._structs.get(type_name)
        if not versions:
            raise UnknownTypeError(type_name=type_name)
        return max(versions)

    def struct_for(self, type_name: str, version: int | None = None) -> type[msgspec.Struct]:
        """The struct of `type_name` at `version` (default: the newest)."""
        versions = self._structs.get(type_name)
        if not versions:
            raise UnknownTypeError(type_name=type_name)
        version = max(versions) if version is None else version
        if version not in versions:
            raise UnknownVersionError(type_name=type_name, version=version, known=sorted(versions))
        return versions[version]

    def type_of(self, payload: msgspec.Struct | type[msgspec.Struct]) -> tuple[str, int]:
        """(type name, schema version) under which a payload's struct class is registered."""
        cls = payload if isinstance(payload, type) else type(payload)
        try:
            return self._by_class[cls]
        except KeyError:
            raise UnknownTypeError(
                type_name=cls.__name__, context="struct class has no registered type name"
            ) from None

    def types(self) -> Iterator[tuple[str, int, type[msgspec.Struct]]]:
        """Every registered (type name, version, struct), sorted by name then version."""
        for name in sorted(self._structs):
            for version in sorted(self._structs[name]):
                yield name, version, self._structs[name][version]

    # -- encoding and decoding ---------------------------------------------------------------------

    def encode(self, type_name: str, version: int, data: Any) -> bytes:
        """Validate `data` (a struct or plain JSON value) against its schema and encode it.

        Unregistered types are encoded as they are. A registered type's payload must be its
        struct at `version`, or a value that converts to it; otherwise InvalidPayloadError names
        the field path.
        """
        versions = self._structs.get(type_name)
        if versions is None:
            return _ENCODER.encode(data)
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
        return _ENCODER.encode(data)

    def decode(self, type_name: str, version: int, raw: bytes | msgspec.Raw) -> Any:
        """Decode a payload into the newest struct of its type, upcasting older versions.

        An unregistered type decodes to its raw JSON value.
        """
        versions = self._structs.get(type_name)
        if versions is None:
            return _JSON.decode(raw)
        newest = max(versions)
        if version == newest:
            return self._decode_exact(type_name, version, raw)
        if version > newest or (
            version not in versions and (type_name, version) not in self._upcasters
        ):
            raise UnknownVersionError(type_name=type_name, version=version, known=sorted(versions))
        # Older version: plain dict through the upcaster chain, then validate as the newest.
        value: dict[str, Any] = msgspec.to_builtins(
            self._decode_exact(type_name, version, raw)
            if version in versions
            else _JSON.decode(raw)
        )
        current = version
        while current < newest:
            upcast = self._upcasters.get((type_name, current))
            if upcast is None:
                raise UnknownVersionError(
                    type_name=type_name,
                    version=version,
                    known=sorted(versions),
                ) from None
            value = upcast(value)
            current += 1
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
    return registry
