"""The built-in projections (agent state in Redis, the audit index in SQLite) and their models.

Projections of higher layers (the saga layer's `transactions`, core/transactions.py) join them
as `extra` SQLite projections, kept in the same file as the audit index: this layer does not
import theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from newfuse._closing import AsyncClosing
from newfuse.errors import UnknownProjectionError
from newfuse.eventstore import EventStore
from newfuse.projections import agent_state, audit
from newfuse.projections.base import Projection, ReadModel
from newfuse.projections.redis_model import RedisReadModel
from newfuse.projections.runner import ProjectionRunner
from newfuse.projections.sqlite_model import SQLiteBatch, SQLiteReadModel

BUILTIN_NAMES: tuple[str, ...] = (agent_state.NAME, audit.NAME)


class BuiltinProjections(AsyncClosing):
    """Opens the read models of the built-in projections and pairs each projection with its own.

    Example:
        async with await BuiltinProjections.open(redis_url=..., audit_db="audit.db") as builtin:
            runners = builtin.runners(store)
    """

    def __init__(
        self,
        redis: RedisReadModel,
        sqlite: SQLiteReadModel,
        *,
        extra: Sequence[Projection[SQLiteBatch]] = (),
    ) -> None:
        self.redis = redis
        self.sqlite = sqlite
        self._pairs: dict[str, tuple[Projection[Any], ReadModel[Any]]] = {
            agent_state.NAME: (agent_state.agent_state_projection(), redis),
            audit.NAME: (audit.audit_projection(), sqlite),
        }
        for projection in extra:
            if projection.name in self._pairs:
                raise ValueError(f"projection {projection.name!r} is built in already")
            self._pairs[projection.name] = (projection, sqlite)

    @classmethod
    async def open(
        cls,
        *,
        redis_url: str,
        audit_db: str,
        prefix: str = "fuse",
        extra: Sequence[Projection[SQLiteBatch]] = (),
    ) -> BuiltinProjections:
        """Connect to Redis at `redis_url` and open (creating) the SQLite file `audit_db`;
        `extra`: more SQLite projections kept in that file.

        The Redis keys live under `<prefix>:proj`, so two prefixes sharing a Redis keep apart.
        """
        redis = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
        try:
            sqlite = await SQLiteReadModel.open(audit_db)
        except BaseException:
            await redis.close()
            raise
        return cls(redis, sqlite, extra=extra)

    @property
    def names(self) -> list[str]:
        return list(self._pairs)

    def get(self, name: str) -> tuple[Projection[Any], ReadModel[Any]]:
        """The projection called `name` and the read model holding it."""
        try:
            return self._pairs[name]
        except KeyError:
            raise UnknownProjectionError(name=name, known=self.names) from None

    def runners(
        self, store: EventStore, names: Sequence[str] = (), **options: Any
    ) -> list[ProjectionRunner[Any]]:
        """A runner per projection named (default: all), reading `store`."""
        chosen = list(names) or self.names
        return [ProjectionRunner(*self._pair(name, store), **options) for name in chosen]

    def _pair(
        self, name: str, store: EventStore
    ) -> tuple[Projection[Any], EventStore, ReadModel[Any]]:
        projection, model = self.get(name)
        return projection, store, model

    async def close(self) -> None:
        """Close both read models. Idempotent."""
        await self.redis.close()
        await self.sqlite.close()
