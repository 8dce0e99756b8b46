"""A Valkey (Redis) ACL user for the projection runners, limited to their keys.

The runners of one prefix keep every key under `<prefix>:proj` (projections/builtin.py). Their
user may run the data, transaction and scripting commands they use on those keys only: no
other key, no administration (CONFIG, ACL, FLUSHALL, SHUTDOWN, DEBUG, KEYS), no Pub/Sub
channel. Scripts run with the caller's permissions, so a script cannot reach further.
"""

from __future__ import annotations

import secrets
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as redis

from newfuse.errors import IdentityError

CATEGORIES: Final[tuple[str, ...]] = (
    "+@read",
    "+@write",
    "+@keyspace",
    "+@hash",
    "+@string",
    "+@set",
    "+@sortedset",
    "+@list",
    "+@transaction",
    "+@scripting",
    "+@connection",
)
DENIED: Final[tuple[str, ...]] = ("-@admin", "-@dangerous", "-@pubsub")


def projection_user(prefix: str) -> str:
    """The ACL user name of the projection runners of `prefix`."""
    return f"newfuse-projections-{prefix}"


def rules(prefix: str, password: str) -> list[str]:
    """The `ACL SETUSER` rules of that user (its keys: `<prefix>:proj` and below)."""
    return [
        "reset",
        "on",
        f">{password}",
        f"~{prefix}:proj",
        f"~{prefix}:proj:*",
        "resetchannels",
        "-@all",
        *CATEGORIES,
        *DENIED,
    ]


def with_user(url: str, user: str, password: str) -> str:
    """`url` logging in as `user`."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def ensure_projection_user(admin_url: str, prefix: str) -> str:
    """Create (or reset, with a new password) the projection runners' user of `prefix`, via
    an admin connection; returns the URL the runners connect with."""
    password = secrets.token_urlsafe(24)
    user = projection_user(prefix)
    client = redis.Redis.from_url(admin_url)
    try:
        answer = await client.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", user, *rules(prefix, password)
        )
    except redis.ResponseError as error:
        raise IdentityError(
            name=user, reason=f"the Redis server refused the user: {error}"
        ) from None
    finally:
        await client.aclose()
    if answer not in (b"OK", "OK", True):
        raise IdentityError(name=user, reason=f"ACL SETUSER answered {answer!r}")
    return with_user(admin_url, user, password)
