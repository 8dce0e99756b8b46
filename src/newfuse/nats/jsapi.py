"""JetStream API requests (`$JS.API.*`) in one place: their subjects, one failure mapping."""

from __future__ import annotations

from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError

from newfuse.errors import StoreUnavailableError
from newfuse.nats.connection import guarded
from newfuse.nats.jserrors import ApiError, client_error

API: Final = "$JS.API"
"""The JetStream API's subject prefix (default domain)."""

NANOSECONDS: Final = 1_000_000_000
"""Per second: the JetStream API gives durations and times in nanoseconds."""


def nanoseconds(seconds: float) -> int:
    """`seconds` as the JetStream API's duration."""
    return int(seconds * NANOSECONDS)


async def api_request(
    nc: Client,
    subject: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the answer, as in nats.py's request
    operation: str,
) -> dict[str, Any]:
    """Send one JetStream API request and return its decoded answer (which may hold `error`).

    Raises:
        StoreUnavailableError: no answer (timeout, no responders, connection closed); it names
            `operation`.
    """
    try:
        msg = await guarded(
            nc,
            subject,
            nc.request(
                subject, b"" if body is None else msgspec.json.encode(body), timeout=timeout
            ),
        )
    except NatsError as error:
        if not client_error(operation, error).retryable:  # a closed connection stays closed
            raise client_error(operation, error) from None
        raise StoreUnavailableError(
            operation=operation,
            reason=f"JetStream API {subject}: {type(error).__name__} (is JetStream enabled on "
            f"the server?)",
        ) from None
    answer: dict[str, Any] = msgspec.json.decode(msg.data)
    return answer


def api_error(answer: dict[str, Any]) -> ApiError | None:
    """The `error` of a JetStream API answer, None when it succeeded."""
    error = answer.get("error")
    return None if error is None else msgspec.convert(error, ApiError)


async def stream_info(
    nc: Client,
    stream: str,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the answer
    operation: str,
) -> dict[str, Any]:
    """The answer to `STREAM.INFO` of `stream`: its `config` and `state`, or an `error`."""
    return await api_request(
        nc, f"{API}.STREAM.INFO.{stream}", timeout=timeout, operation=operation
    )


async def stream_create(
    nc: Client,
    config: dict[str, Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the answer
    operation: str,
) -> dict[str, Any]:
    """The answer to `STREAM.CREATE` with `config` (which names the stream)."""
    return await api_request(
        nc, f"{API}.STREAM.CREATE.{config['name']}", config, timeout=timeout, operation=operation
    )


async def consumer_create(
    nc: Client,
    stream: str,
    config: dict[str, Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the answer
    operation: str,
) -> dict[str, Any]:
    """The answer to `CONSUMER.CREATE` of an ephemeral consumer on `stream`."""
    return await api_request(
        nc,
        f"{API}.CONSUMER.CREATE.{stream}",
        {"stream_name": stream, "config": config},
        timeout=timeout,
        operation=operation,
    )


async def consumer_delete(
    nc: Client,
    stream: str,
    consumer: str,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the answer
    operation: str,
) -> dict[str, Any]:
    """The answer to `CONSUMER.DELETE` of `consumer` on `stream`."""
    return await _consumer_request(nc, "DELETE", stream, consumer, timeout, operation)


async def consumer_info(
    nc: Client,
    stream: str,
    consumer: str,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the answer
    operation: str,
) -> dict[str, Any]:
    """The answer to `CONSUMER.INFO` of `consumer` on `stream`."""
    return await _consumer_request(nc, "INFO", stream, consumer, timeout, operation)


async def _consumer_request(
    nc: Client, verb: str, stream: str, consumer: str, wait: float, operation: str
) -> dict[str, Any]:
    return await api_request(
        nc, f"{API}.CONSUMER.{verb}.{stream}.{consumer}", timeout=wait, operation=operation
    )
