"""What is retryable: only failures that waiting can cure (JetStream answers, nats-py errors)."""

from __future__ import annotations

import pytest
from nats import errors as nats_errors

from newfuse.errors import (
    ClientRefusedError,
    FuseError,
    PublishRejectedError,
    PublishUnavailableError,
    StoreConnectionClosedError,
    StoreUnavailableError,
)
from newfuse.nats.jserrors import ApiError, WrongLastSequenceError, client_error, error_for


@pytest.mark.parametrize(
    ("code", "err_code", "description", "expected", "retryable"),
    [
        (503, 10008, "JetStream system temporarily unavailable", PublishUnavailableError, True),
        (500, 10009, "JetStream cluster can not handle request", PublishUnavailableError, True),
        (429, 10210, "atomic publish too many inflight", PublishUnavailableError, True),
        (400, 10176, "atomic publish batch is incomplete", PublishUnavailableError, True),
        (503, 10077, "maximum messages exceeded", PublishRejectedError, False),
        (400, 10054, "message size exceeds maximum allowed", PublishRejectedError, False),
        (400, 10071, "wrong last sequence: 4", WrongLastSequenceError, False),
        # after an election the new leader may answer without the sequence: the store re-reads
        # the stream and retries or reports the conflict, as for 10071
        (400, 10164, "wrong last sequence", WrongLastSequenceError, False),
    ],
)
def test_publish_refusals_are_retryable_only_when_passing(
    code: int, err_code: int, description: str, expected: type[FuseError], retryable: bool
) -> None:
    error = error_for(ApiError(code, err_code, description), subject="p.ev.a.b")
    assert type(error) is expected
    assert isinstance(error, FuseError) and error.retryable is retryable
    assert description in str(error) and "'p.ev.a.b'" in str(error)
    if retryable:
        assert "retry shortly" in str(error)


@pytest.mark.parametrize(
    ("raised", "expected", "retryable"),
    [
        (nats_errors.TimeoutError(), StoreUnavailableError, True),
        (nats_errors.NoRespondersError(), StoreUnavailableError, True),
        (nats_errors.OutboundBufferLimitError(), StoreUnavailableError, True),
        (nats_errors.ConnectionReconnectingError(), StoreUnavailableError, True),
        (nats_errors.ConnectionClosedError(), StoreConnectionClosedError, False),
        (nats_errors.ConnectionDrainingError(), StoreConnectionClosedError, False),
        (nats_errors.MaxPayloadError(), ClientRefusedError, False),
        (nats_errors.BadSubjectError(), ClientRefusedError, False),
    ],
)
def test_client_errors_are_retryable_only_when_the_connection_can_come_back(
    raised: Exception, expected: type[FuseError], retryable: bool
) -> None:
    error = client_error("append to 'agent.a1'", raised)
    assert type(error) is expected and error.retryable is retryable
    assert str(error).startswith("append to 'agent.a1': ")
