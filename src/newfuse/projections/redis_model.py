"""Projections in Redis: each batch and its checkpoint in one WATCH/MULTI/EXEC, generations by
key prefix, and an active-generation pointer that readers resolve inside one Lua script.

Keys, under `root` (default `fuse:proj`) and the projection's name `n`:

- `<root>:{<n>}:active` - the generation readers see;
- `<root>:{<n>}:generations` - a counter allocating generation numbers;
- `<root>:{<n>}:g<g>:checkpoint`, `<root>:{<n>}:g<g>:dead` (hash position -> JSON dead letter);
- `<root>:{<n>}:g<g>:m:<...>` - the model's own keys (`RedisBatch.key`);
- `<root>:{<n>}:stats` - what the runner last reported; `<root>:names` - the projections held.

`{<n>}` is a Redis Cluster hash tag: every key of a projection, of all its generations and its
pointer, hashes to one slot, so a batch's MULTI/EXEC, its WATCH and a Lua script that reads the
pointer and then the model it names all stay on one node. `<root>:names` is only ever written
alone. A Redis Cluster spreads projections over its masters, one projection per slot.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import msgspec
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from newfuse.errors import PartialBatchError, ReadModelUnavailableError, RebuildConflictError
from newfuse.projections.base import (
    Batch,
    BatchConflict,
    DeadLetter,
    Projection,
    ReadModel,
    RunnerStats,
)

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_DEAD_DECODER = msgspec.json.Decoder(DeadLetter)
_STATS_DECODER = msgspec.json.Decoder(RunnerStats)
_ENCODER = msgspec.json.Encoder()

Command = tuple[str, tuple[Any, ...]] | tuple[str, str, tuple[str, ...], tuple[Any, ...]]


class RedisBatch(Batch):
    """Commands a handler queues; sent with the checkpoint in one MULTI/EXEC.

    Handlers only queue writes (no reads: the transaction has not begun). A change that depends
    on stored values (e.g. "only if newer") is a Lua script queued with `eval`.
    """

    def __init__(self, *, projection: str, generation: int, prefix: str) -> None:
        super().__init__(projection=projection, generation=generation)
        self.prefix = prefix
        self.commands: list[Command] = []

    def key(self, *parts: str | int) -> str:
        """The Redis key of a model part in this batch's generation, e.g. `key("agent", id)`."""
        return self.prefix + ":".join(str(part) for part in parts)

    def command(self, *args: Any) -> None:
        """Queue any Redis command, e.g. `command("HINCRBY", key, field, 1)`."""
        self.commands.append(("cmd", args))

    def eval(self, lua: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Queue a Lua script (loaded once per server, run with EVALSHA inside the MULTI).

        Consecutive calls of one script in a batch are sent as one EVALSHA of a wrapper that
        runs the script once per call, in order; the script's return value is not used.
        """
        self.commands.append(("lua", lua, tuple(keys), tuple(args)))

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        """Queue HSET of several fields."""
        flat: list[Any] = []
        for field, value in mapping.items():
            flat += [field, value]
        self.command("HSET", key, *flat)

    def sadd(self, key: str, *members: Any) -> None:
        """Queue SADD."""
        self.command("SADD", key, *members)

    def rpush(self, key: str, *values: Any) -> None:
        """Queue RPUSH."""
        self.command("RPUSH", key, *values)

    def incrby(self, key: str, amount: int = 1) -> None:
        """Queue INCRBY."""
        self.command("INCRBY", key, amount)

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        """Queue HINCRBY."""
        self.command("HINCRBY", key, field, amount)


class RedisReadModel(ReadModel[RedisBatch]):
    """A Redis (or valkey) server holding projections; see the module docstring for its keys.

    Example:
        async with await RedisReadModel.connect("redis://127.0.0.1:6379/0") as model:
            runner = ProjectionRunner(projection, store, model)
    """

    def __init__(
        self, client: redis.Redis | RedisCluster, *, url: str, root: str = "fuse:proj"
    ) -> None:
        self.client: Any = client  # the two clients share the commands used here
        self.url = url
        self.root = root
        self.cluster = isinstance(client, RedisCluster)
        self.description = f"redis {'cluster ' if self.cluster else ''}{url} ({root})"
        self._scripts: dict[str, AsyncScript] = {}
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        root: str = "fuse:proj",
        timeout: float = 5.0,  # noqa: ASYNC109 - redis-py's socket timeouts, not an await
        cluster: bool = False,
    ) -> RedisReadModel:
        """Connect to the server at `url` (nothing is sent until the first use).

        Args:
            url: `redis://host:port/db`; with `cluster`, any node of the cluster.
            root: the prefix of every key this model writes.
            timeout: seconds allowed per command and per connection attempt.
            cluster: `url` is a Redis Cluster node: route each projection's commands to the
                master of its slot (see the module docstring).
        """
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # No hidden retries: the runner owns the waiting (and a retried EXEC must never run
            # twice; WATCH already turns a lost connection into a conflict).
            "retry": Retry(NoBackoff(), 0),
        }
        if cluster:
            return cls(RedisCluster.from_url(url, **options), url=url, root=root)
        return cls(redis.Redis.from_url(url, **options), url=url, root=root)

    # -- key layout --------------------------------------------------------------------------------

    def namespace(self, name: str) -> str:
        """`<root>:{<name>}`: the prefix of every key of a projection (a cluster hash tag)."""
        return f"{self.root}:{{{name}}}"

    def active_key(self, name: str) -> str:
        """The key of the active-generation pointer."""
        return f"{self.namespace(name)}:active"

    def generation_prefix(self, name: str, generation: int) -> str:
        """The prefix of every key of one generation."""
        return f"{self.namespace(name)}:g{generation}:"

    def model_prefix(self, name: str, generation: int) -> str:
        """The prefix of a generation's model keys (what `RedisBatch.key` builds on)."""
        return f"{self.generation_prefix(name, generation)}m:"

    def _checkpoint_key(self, name: str, generation: int) -> str:
        return f"{self.generation_prefix(name, generation)}checkpoint"

    def _dead_key(self, name: str, generation: int) -> str:
        return f"{self.generation_prefix(name, generation)}dead"

    # -- helpers -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        try:
            yield
        except WatchError:
            raise BatchConflict(operation) from None
        except _UNAVAILABLE as error:
            raise ReadModelUnavailableError(
                model=self.description,
                operation=operation,
                reason=f"{type(error).__name__}: {error}",
            ) from error

    def _pipeline(self) -> Any:
        return self.client.pipeline(transaction=True)

    def script(self, lua: str) -> AsyncScript:
        """The registered script of a Lua source (one per source text)."""
        digest = hashlib.sha1(lua.encode()).hexdigest()
        script = self._scripts.get(digest)
        if script is None:
            script = self._scripts[digest] = self.client.register_script(lua)
        return script

    async def read_active(self, name: str, lua: str, *args: Any) -> Any:
        """Run a reading Lua script that resolves the active generation itself.

        The script gets KEYS[1] = the pointer key and ARGV[1] = `<root>:<name>:g`; it builds the
        model prefix as `ARGV[1] .. GET(KEYS[1]) .. ':m:'`. Pointer and data are read in one
        atomic step, so a reader never sees a half-swapped model. Further `args` follow.
        """
        with self._guard(f"read projection {name!r}"):
            return await self.script(lua)(
                keys=[self.active_key(name)], args=[f"{self.namespace(name)}:g", *args]
            )

    async def _load(self, scripts: set[AsyncScript]) -> None:
        """On a cluster, load the batch's scripts on every master before its EXEC (a cluster
        pipeline does not, as a standalone one does with `pipe.scripts`)."""
        if self.cluster:
            for script in scripts:
                await self.client.script_load(script.script)

    def _queue(self, pipe: Any, batch: RedisBatch) -> set[AsyncScript]:
        """Queue the batch's commands, dead letters and checkpoint; the scripts it uses."""
        used: set[AsyncScript] = set()
        commands = batch.commands
        index = 0
        while index < len(commands):
            command = commands[index]
            if len(command) == 2:
                pipe.execute_command(*command[1])
                index += 1
                continue
            # A run of calls of one script goes as one call of its batched form, all the calls'
            # keys and args in one JSON argument: one command to pack, send and answer instead
            # of one per event (redis-py packs ~30 us of arguments per call); same effects, same
            # order.
            lua = command[1]
            end = index + 1
            while end < len(commands) and len(commands[end]) == 4 and commands[end][1] == lua:
                end += 1
            # (A script with a `#!lua` shebang cannot become a function body: one call each.)
            batchable = end - index > 1 and not lua.lstrip().startswith("#!")
            calls = _json_calls(commands[index:end]) if batchable else None
            if calls is None:
                for _, _, keys, args in commands[index:end]:  # type: ignore[misc]
                    script = self.script(lua)
                    used.add(script)
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            else:
                script = self.script(_batched(lua))
                used.add(script)
                # one declared key (unused by the script) routes the call to the generation's
                # slot on a cluster; every key the calls touch hashes there too
                anchor = self._checkpoint_key(batch.projection, batch.generation)
                pipe.execute_command("EVALSHA", script.sha, 1, anchor, calls)
            index = end
        for letter in batch.dead:
            pipe.hset(
                self._dead_key(batch.projection, batch.generation),
                str(letter.position),
                _ENCODER.encode(letter),
            )
        if batch.advanced_to is not None:
            pipe.set(self._checkpoint_key(batch.projection, batch.generation), batch.advanced_to)
        if not self.cluster:
            pipe.scripts.update(used)  # the pipeline loads them before it sends the MULTI
        return used

    # -- ReadModel ---------------------------------------------------------------------------------

    async def active_generation(self, name: str) -> int | None:
        with self._guard(f"read the active generation of {name!r}"):
            value = await self.client.get(self.active_key(name))
        return int(value) if value is not None else None

    async def checkpoint(self, name: str, generation: int | None = None) -> int:
        if generation is None:
            generation = await self.active_generation(name)
            if generation is None:
                return 0
        with self._guard(f"read the checkpoint of {name!r}"):
            value = await self.client.get(self._checkpoint_key(name, generation))
        return int(value) if value is not None else 0

    async def _allocate(self, projection: Projection[RedisBatch], *, activate: bool) -> int:
        name = projection.name
        with self._guard(f"create a generation of {name!r}"):
            generation = int(await self.client.incr(f"{self.namespace(name)}:generations"))
        batch = RedisBatch(
            projection=name, generation=generation, prefix=self.model_prefix(name, generation)
        )
        await projection.prepare(batch)
        batch.advance(0)
        with self._guard(f"create generation {generation} of {name!r}"):
            async with self._pipeline() as pipe:
                await pipe.watch(self.active_key(name))
                if activate and await pipe.get(self.active_key(name)) is not None:
                    raise WatchError("prepared by another runner")
                pipe.multi()
                await self._load(self._queue(pipe, batch))
                if activate:
                    pipe.set(self.active_key(name), generation)
                await pipe.execute()
        return generation

    async def prepare(self, projection: Projection[RedisBatch]) -> int:
        for _attempt in range(10):
            active = await self.active_generation(projection.name)
            if active is None:
                with contextlib.suppress(BatchConflict):
                    active = await self._allocate(projection, activate=True)
            if active is not None:
                # Listed on its own (the set is in another slot than the projection's keys, so
                # not in their MULTI), once it has a generation, at every prepare: a crash
                # between the two writes leaves it unlisted only until the next runner starts.
                with self._guard(f"list projection {projection.name!r}"):
                    await self.client.sadd(f"{self.root}:names", projection.name)
                return active
        raise BatchConflict(f"prepare {projection.name!r}: the pointer kept changing")

    async def new_generation(self, projection: Projection[RedisBatch]) -> int:
        return await self._allocate(projection, activate=False)

    @contextlib.asynccontextmanager
    async def batch(
        self, name: str, generation: int, expected_checkpoint: int, *, active: bool
    ) -> AsyncIterator[RedisBatch]:
        batch = RedisBatch(
            projection=name, generation=generation, prefix=self.model_prefix(name, generation)
        )
        yield batch
        if batch.advanced_to is None and not batch.commands and not batch.dead:
            return
        checkpoint_key = self._checkpoint_key(name, generation)
        active_key = self.active_key(name)
        with self._guard(f"apply a batch to {name!r} generation {generation}"):
            async with self._pipeline() as pipe:
                await pipe.watch(checkpoint_key, active_key)
                # MGET (and EVALSHA below) by name: a cluster pipeline blocks its mget() and
                # evalsha() methods, not the commands (the keys share a slot here)
                stored, pointer = await pipe.execute_command("MGET", checkpoint_key, active_key)
                if int(stored or 0) != expected_checkpoint or (
                    active and (pointer is None or int(pointer) != generation)
                ):
                    raise BatchConflict(f"{name!r}: checkpoint {stored!r}, active {pointer!r}")
                pipe.multi()
                await self._load(self._queue(pipe, batch))
                results = await pipe.execute(raise_on_error=False)
        refused = [result for result in results if isinstance(result, ResponseError)]
        if refused:
            raise PartialBatchError(
                projection=name,
                generation=generation,
                position=batch.advanced_to or expected_checkpoint,
                reason=str(refused[0]),
            )

    async def swap(self, name: str, generation: int, *, expected_active: int) -> bool:
        active_key = self.active_key(name)
        new_key = self._checkpoint_key(name, generation)
        old_key = self._checkpoint_key(name, expected_active)
        try:
            with self._guard(f"swap {name!r} to generation {generation}"):
                async with self._pipeline() as pipe:
                    await pipe.watch(active_key, new_key, old_key)
                    pointer, new, old = await pipe.execute_command(
                        "MGET", active_key, new_key, old_key
                    )
                    if pointer is None or int(pointer) != expected_active:
                        await pipe.unwatch()
                        raise RebuildConflictError(
                            projection=name,
                            expected=expected_active,
                            actual=int(pointer or 0),
                        )
                    if int(new or 0) < int(old or 0):
                        return False
                    pipe.multi()
                    pipe.set(active_key, generation)
                    await pipe.execute()
        except BatchConflict:
            return False
        return True

    async def drop_generation(self, name: str, generation: int) -> None:
        if await self.active_generation(name) == generation:
            raise ValueError(f"drop {name!r} generation {generation}: it is the active one")
        with self._guard(f"drop {name!r} generation {generation}"):
            chunk: list[str] = []
            async for key in self.client.scan_iter(
                match=f"{self.generation_prefix(name, generation)}*", count=1000
            ):
                chunk.append(key)
                if len(chunk) >= 500:
                    await self.client.unlink(*chunk)
                    chunk.clear()
            if chunk:
                await self.client.unlink(*chunk)

    async def dead_letters(self, name: str, generation: int | None = None) -> list[DeadLetter]:
        if generation is None:
            generation = await self.active_generation(name)
            if generation is None:
                return []
        with self._guard(f"read the dead letters of {name!r}"):
            values = await self.client.hvals(self._dead_key(name, generation))
        return sorted((_DEAD_DECODER.decode(value) for value in values), key=_by_position)

    async def write_stats(self, name: str, stats: RunnerStats) -> None:
        with self._guard(f"report the stats of {name!r}"):
            await self.client.set(f"{self.namespace(name)}:stats", _ENCODER.encode(stats))

    async def read_stats(self, name: str) -> RunnerStats | None:
        with self._guard(f"read the stats of {name!r}"):
            value = await self.client.get(f"{self.namespace(name)}:stats")
        return _STATS_DECODER.decode(value) if value is not None else None

    async def projections(self) -> list[str]:
        with self._guard("list projections"):
            names = await self.client.smembers(f"{self.root}:names")
        return sorted(str(name) for name in names)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()


def _by_position(letter: DeadLetter) -> int:
    return letter.position


@functools.cache
def _batched(lua: str) -> str:
    """A script that runs `lua` once per call listed in ARGV[1].

    ARGV[1] is a JSON array with one `[keys, args]` pair per call, every value a string (as
    redis-py would send it). The original source becomes the body of a function whose
    parameters shadow KEYS and ARGV, so it runs unchanged (its return value is dropped). The
    keys travel in the argument, not in KEYS: KEYS[1] is only the generation's checkpoint key,
    which routes the call on a cluster; the keys of one generation share its hash tag, so they
    are all in the slot of that key.
    """
    return (
        "local function call(KEYS, ARGV)\n"
        f"{lua}\n"
        "end\n"
        "local calls = cjson.decode(ARGV[1])\n"
        "for i = 1, #calls do call(calls[i][1], calls[i][2]) end\n"
        "return #calls\n"
    )


def _as_redis_text(value: Any) -> str | None:
    """The text redis-py would send for `value`, or None for what JSON cannot carry as such."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None  # redis-py refuses booleans; let it say so on the ordinary path
    if isinstance(value, int | float):
        return repr(value)  # what redis-py's encoder does
    return None  # bytes and others: sent as they are, one call each


def _json_calls(commands: Sequence[Command]) -> bytes | None:
    """ARGV[1] of the batched form of these script calls, or None if a value is not text."""
    calls: list[tuple[list[str], list[str]]] = []
    for command in commands:
        _, _, keys, args = command  # type: ignore[misc]
        texts: list[str] = []
        for value in (*keys, *args):
            text = _as_redis_text(value)
            if text is None:
                return None
            texts.append(text)
        calls.append((texts[: len(keys)], texts[len(keys) :]))
    try:
        return _ENCODER.encode(calls)
    except (msgspec.EncodeError, UnicodeEncodeError):
        return None  # e.g. a lone surrogate: the ordinary path reports it
