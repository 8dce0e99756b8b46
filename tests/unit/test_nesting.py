"""The nesting limit appends check (MAX_NESTING_DEPTH; test_body_bounds tests the scanner)."""

from __future__ import annotations

import pytest

from newfuse.errors import InvalidPayloadError, NestingTooDeepError
from newfuse.schemas import MAX_NESTING_DEPTH, check_data_depth


def test_data_at_the_limit_passes_and_one_level_deeper_is_refused_naming_both() -> None:
    at_limit = b"[" * MAX_NESTING_DEPTH + b"]" * MAX_NESTING_DEPTH
    assert check_data_depth(at_limit, type_name="t", version=1) is at_limit
    deeper = b"[" + at_limit + b"]"
    with pytest.raises(NestingTooDeepError, match=r"'t' v2 at \$: it nests 65 levels.*limit is 64"):
        check_data_depth(deeper, type_name="t", version=2)


def test_many_brackets_side_by_side_are_not_depth() -> None:
    wide = b"[" + b",".join([b"[]"] * 10_000) + b"]"
    assert check_data_depth(wide, type_name="t", version=1) is wide


def test_nesting_too_deep_is_an_invalid_payload_and_not_retryable() -> None:
    error = NestingTooDeepError(type_name="t", version=1, depth=None, limit=64)
    assert isinstance(error, InvalidPayloadError) and not error.retryable
    assert (error.depth, error.limit) == (None, 64)
