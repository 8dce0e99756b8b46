"""Identities (NATS nkeys) and the permissions nats-server enforces for each.

An identity is an Ed25519 nkey: the seed stays in a file only its owner reads
(`<dir>/<name>.nk`), and the server knows only the public key (`U…`): it sends a nonce at
connect and checks the signature, so it never sees the seed. `identities.json` beside the seeds
lists each identity's name, role, public key and what its role lets it do; `server_config()`
turns that list into nats-server's configuration: the bus's users in the `authorization` block
(the global account, where the streams are), the system identities in the system account.

Roles:
- `admin`: everything (the CLI of an operator, `fuse dev` itself).
- `service`: the bus's own processes (projections, orchestrators, detectors): read and write the
  event log and the message stream through JetStream, but not create, delete or purge streams,
  nor delete messages. It may answer requests: the key service (security/key_service.py) runs
  as one.
- `reviewer`: a person deciding saga steps' reviews for the groups their certificate names
  (`--group`): append to review streams (and feedback), read the event log and the keys'
  bucket (what they review may hold sealed fields); nothing else.
- `agent`: one agent instance `<type>/<key>`. It may publish only: to the inboxes of the agent
  types it declares (`send_to`; `task-<queue>`, a queue's workers, also lets it submit to the
  queue and store and read the statuses of the tasks it submits there,
  `<prefix>.a2a._task.<queue>.<its name>.*`), to the topics it declares (`publish_topics`),
  replies, its own markers, dead letters, model records and heartbeats, and the status events
  of (unqueued) A2A tasks. It may read only its own durable consumers (by name), its own
  replies, its own markers (by subject), and its fast-path service. No other direct get, no
  stream read, no consumer of another inbox. It may ask the key service to seal and open
  fields (it never reads a key). Streams and consumers are created by an admin or
  service first (`fuse dev --secure` does it for the identities it knows).
  An agent of type `task-<queue>` is a worker of that queue: in place of an agent's two
  consumers it has the queue's ten (`task-<queue>-p0` ... `-p9`), and it may store and read by
  subject the statuses of the queue's tasks (`<prefix>.a2a._task.<queue>.*.*`), nothing of
  another queue's.
- `system`: a user of nats-server's system account (`SYS`), which sees nothing of the bus's
  subjects and streams, only the server's own: its advisories, among them the authentication
  failures that no other account hears of (security/auth_events.py listens as one). It has the
  whole system account, as an admin has the bus's: that is also what an operator's `nats server`
  tooling needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from newfuse.errors import IdentityError, KeyFileError
from newfuse.nats.connection import Credentials
from newfuse.nats.micro import service_name
from newfuse.nats.signing import Certified, issue
from newfuse.nats.subjects import Subjects
from newfuse.schemas import check_token
from newfuse.security.key_service import SERVICE_NAME as KEY_SERVICE
from newfuse.security.key_service import sealers_bucket
from newfuse.security.keys import bucket_name as keys_bucket

Role = Literal["admin", "service", "agent", "system", "reviewer"]
ROLES: Final[tuple[Role, ...]] = ("admin", "service", "agent", "system", "reviewer")
GROUPED_ROLES: Final[tuple[Role, ...]] = ("admin", "reviewer")
"""Roles whose certificate may name review groups (a reviewer's must name one)."""
REGISTRY_FILE: Final[str] = "identities.json"
API: Final[str] = "$JS.API"
SYSTEM_ACCOUNT: Final[str] = "SYS"
"""The account nats-server sends its own events to (`system_account`), with the `system`
identities as its users."""


@dataclass(frozen=True)
class Identity:
    """One identity: its name, role, public nkey, and (agents) what it may do."""

    name: str
    role: Role
    public_key: str
    agent_type: str = ""
    agent_key: str = ""
    send_to: tuple[str, ...] = ()
    """Agent types whose inboxes it may write to."""
    publish_topics: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    """Topics it subscribes to (its shared consumer's filters)."""
    groups: tuple[str, ...] = ()
    """The review groups its certificate names (admins and reviewers)."""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    revoked: str | None = None

    @property
    def inbox_prefix(self) -> str:
        """The core NATS inbox prefix its connection uses (only it may subscribe there)."""
        return f"_INBOX_{self.name}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Identity:
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as error:
            raise IdentityError(
                name=str(data.get("name", "?")), reason=f"{where}: {error}"
            ) from None


def check_identity_name(name: str) -> str:
    """A name usable in a subject token and a file name: letters, digits, '-' and '_'."""
    check_token(name, kind="identity name")
    if not all(c.isalnum() or c in "-_" for c in name) or len(name) > 64:
        raise IdentityError(name=name, reason="use 1-64 letters, digits, '-' and '_'")
    return name


def _check_groups(name: str, role: Role, groups: Sequence[str]) -> None:
    if groups and role not in GROUPED_ROLES:
        raise IdentityError(
            name=name,
            reason=f"--group is for the roles {' and '.join(GROUPED_ROLES)}, not {role}",
        )
    if role == "reviewer" and not groups:
        raise IdentityError(name=name, reason="a reviewer acts for one or more --group")
    for group in groups:
        if not 0 < len(group) <= 64 or not all(c.isalnum() or c in "-_." for c in group):
            raise IdentityError(
                name=name, reason=f"group {group!r}: use 1-64 letters, digits, '-', '_' and '.'"
            )


def _nkeys() -> Any:
    import nkeys  # type: ignore[import-untyped]  # the official nats-io nkeys package (what nats-py signs nonces with)

    return nkeys


def new_seed() -> bytes:
    """A new user nkey seed (`SU…`)."""
    return bytes(_nkeys().encode_seed(os.urandom(32), _nkeys().PREFIX_BYTE_USER))


def public_key_of(seed: bytes) -> str:
    pair = _nkeys().from_seed(bytearray(seed))
    try:
        return str(pair.public_key.decode())
    finally:
        pair.wipe()


class IdentityStore:
    """The identities of one deployment, in a directory: `identities.json` and one seed file
    (`<name>.nk`, owner-only) per identity."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def registry(self) -> Path:
        return self.directory / REGISTRY_FILE

    def seed_file(self, name: str) -> Path:
        """Its credentials file (seed, name, inbox prefix; owner-only): what
        `FUSE_NATS_CREDENTIALS` / `--credentials` point at."""
        return self.directory / f"{check_identity_name(name)}.creds"

    def list(self) -> list[Identity]:
        try:
            text = self.registry.read_text()
        except FileNotFoundError:
            return []
        except OSError as error:
            raise KeyFileError(path=str(self.registry), reason=str(error)) from None
        try:
            rows = json.loads(text)
        except ValueError as error:
            raise KeyFileError(path=str(self.registry), reason=f"not JSON: {error}") from None
        if not isinstance(rows, list):
            raise KeyFileError(path=str(self.registry), reason="not a JSON list of identities")
        return [Identity.from_json(row, str(self.registry)) for row in rows]

    def get(self, name: str) -> Identity:
        for identity in self.list():
            if identity.name == name:
                return identity
        known = ", ".join(i.name for i in self.list()) or "none"
        raise IdentityError(name=name, reason=f"no such identity (known: {known})")

    def name_of(self, public_key: str) -> str:
        """The name of the identity, revoked or not, whose public nkey is `public_key` ('' if
        none is)."""
        return next((i.name for i in self.list() if i.public_key == public_key), "")

    def add(
        self,
        name: str,
        role: Role,
        *,
        agent: str = "",
        send_to: Sequence[str] = (),
        publish_topics: Sequence[str] = (),
        topics: Sequence[str] = (),
        groups: Sequence[str] = (),
        ca: str = "",
    ) -> Identity:
        """Create an identity: its seed file (mode 600) and its entry; refuses a name in use.
        `groups` (admins and reviewers) go into its certificate: the review groups it acts
        for. `ca`: the CA certificate (PEM file) of the servers it will connect to over TLS,
        kept in its credentials file (so whoever uses them verifies the server the same way)."""
        check_identity_name(name)
        if role not in ROLES:
            raise IdentityError(name=name, reason=f"role {role!r} is not one of {list(ROLES)}")
        _check_groups(name, role, groups)
        agent_type, _, agent_key = agent.partition("/")
        if role == "agent":
            if not agent_type or not agent_key:
                raise IdentityError(name=name, reason="an agent identity needs --agent TYPE/KEY")
            for token in (agent_type, agent_key, *send_to, *publish_topics, *topics):
                check_token(token, kind="agent type, key or topic")
        existing = self.list()
        if any(i.name == name for i in existing):
            raise IdentityError(name=name, reason="exists already (revoke it or pick another)")
        seed = new_seed()
        public = public_key_of(seed)
        admins = [i for i in existing if i.role == "admin" and not i.revoked]
        issuer = self.seed(admins[0].name) if admins else seed.decode()
        if not admins and role != "admin":
            raise IdentityError(
                name=name,
                reason="make an admin first (`fuse auth add NAME "
                "--role admin`; `fuse dev --secure` makes one)",
            )
        certificate = issue(
            issuer,
            Certified(name=name, role=role, key=public, agent=agent, groups=tuple(groups)),
        )
        trusted = tuple(i.public_key for i in admins) or (public,)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        Credentials(
            identity=name,
            seed=seed.decode(),
            inbox_prefix=f"_INBOX_{name}",
            scoped=role == "agent",
            certificate=certificate,
            trust=trusted,
            ca=os.path.abspath(ca) if ca else "",  # valid from wherever the file is used
        ).save(self.seed_file(name))
        identity = Identity(
            name=name,
            role=role,
            public_key=public,
            agent_type=agent_type,
            agent_key=agent_key,
            send_to=tuple(send_to),
            publish_topics=tuple(publish_topics),
            topics=tuple(topics),
            groups=tuple(groups),
        )
        self._write([*existing, identity])
        return identity

    def revoke(self, name: str) -> Identity:
        """Mark an identity revoked (the next server config leaves it out) and delete its seed."""
        rows = self.list()
        found = self.get(name)
        revoked = dataclasses.replace(found, revoked=datetime.now(UTC).isoformat())
        self._write([revoked if i.name == name else i for i in rows])
        self.seed_file(name).unlink(missing_ok=True)
        return revoked

    def seed(self, name: str) -> str:
        """The seed of `name` (refuses a file others may read)."""
        return self.credentials(name).seed

    def credentials(self, name: str) -> Credentials:
        """What `connect(url, credentials=...)` needs to connect as `name`."""
        identity = self.get(name)
        if identity.revoked:
            raise IdentityError(name=name, reason=f"revoked at {identity.revoked}")
        return Credentials.load(self.seed_file(name))

    def _write(self, identities: Iterable[Identity]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.registry.with_suffix(".tmp")
        temporary.write_text(json.dumps([i.to_json() for i in identities], indent=2) + "\n")
        temporary.replace(self.registry)


# -- permissions -------------------------------------------------------------------------------


def permissions(identity: Identity, subjects: Subjects) -> dict[str, Any] | None:
    """The nats-server `permissions` of `identity` (None: no block, everything allowed in its
    account)."""
    if identity.role in ("admin", "system"):
        return None
    if identity.role == "service":
        return _service(identity, subjects)
    if identity.role == "reviewer":
        return _reviewer(identity, subjects)
    return _agent(identity, subjects)


def _service(identity: Identity, s: Subjects) -> dict[str, Any]:
    # the timers' stream (saga timers, core/timers.py: a cancel purges its schedule's subject)
    # and the KV bucket of the data subjects' keys (security/keys.py) are a service's too
    keys = f"KV_{keys_bucket(s.prefix)}"
    sealers = f"KV_{sealers_bucket(s.prefix)}"  # who sealed which event (the key service)
    streams = (
        s.stream_name,
        s.message_stream_name,
        s.liveness_stream_name,
        s.timer_stream_name,
        keys,
        sealers,
    )
    publish = [
        s.all_events,
        *s.all_messages,
        s.all_liveness,
        s.all_timers,
        f"$KV.{keys_bucket(s.prefix)}.>",
        f"$KV.{sealers_bucket(s.prefix)}.>",
        f"{API}.STREAM.PURGE.{s.timer_stream_name}",
        f"{s.prefix}.rpc.>",
        f"{API}.INFO",
        "$JS.ACK.>",
        "$JS.FC.>",
        *(f"{API}.{op}.{stream}" for op in ("STREAM.INFO", "DIRECT.GET") for stream in streams),
        *(f"{API}.DIRECT.GET.{stream}.>" for stream in streams),
        *(
            f"{API}.CONSUMER.{op}.{stream}.>"
            for op in ("CREATE", "DURABLE.CREATE", "INFO", "DELETE", "MSG.NEXT")
            for stream in streams
        ),
        *(
            f"{API}.CONSUMER.{op}.{stream}"
            for op in ("CREATE", "LIST", "NAMES")  # CREATE without a name: an ordered consumer
            for stream in streams
        ),
        f"{API}.STREAM.MSG.GET.{keys}",  # a KV get (the bucket has no direct get)
        f"{API}.STREAM.MSG.GET.{sealers}",
        f"{API}.STREAM.NAMES",
        f"{API}.STREAM.LIST",
    ]
    return {
        "publish": {"allow": publish},
        "subscribe": {
            "allow": [
                f"{identity.inbox_prefix}.>",
                f"{s.prefix}.>",
                f"$KV.{keys_bucket(s.prefix)}.>",  # a key store hears of others' forgets
                # the key service (security/key_service.py) is found like any ADR-32 service
                *(
                    f"$SRV.{verb}{tail}"
                    for verb in ("PING", "INFO", "STATS")
                    for tail in ("", f".{KEY_SERVICE}", f".{KEY_SERVICE}.*")
                ),
            ]
        },
        # the key service answers agents' requests in their inboxes
        "allow_responses": True,
    }


def _reviewer(identity: Identity, s: Subjects) -> dict[str, Any]:
    # `fuse review`: read the log (a batched direct get names no subject the server could
    # scope) and the keys' bucket (what they review may hold sealed fields), append to review
    # streams and feedback; nothing else
    events, keys = s.stream_name, f"KV_{keys_bucket(s.prefix)}"
    publish = [
        s.category("review"),
        s.category("feedback"),
        f"{API}.INFO",
        f"{API}.STREAM.INFO.{events}",
        f"{API}.DIRECT.GET.{events}",
        f"{API}.DIRECT.GET.{events}.>",
        f"{API}.STREAM.INFO.{keys}",
        f"{API}.STREAM.MSG.GET.{keys}",
    ]
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": [f"{identity.inbox_prefix}.>"]},
    }


def worker_queue(agent_type: str) -> str | None:
    """The queue whose worker an agent of type `agent_type` is: `task-<queue>` (the type of a
    queue's workers, agents/queues.py), else None."""
    queue = agent_type.removeprefix("task-")
    if queue == agent_type or not queue:
        return None
    return queue


def _agent(identity: Identity, s: Subjects) -> dict[str, Any]:
    kind, key = identity.agent_type, identity.agent_key
    own, shared = f"{kind}__{key}", kind
    consumers: tuple[str, ...] = (shared, own)
    stream = s.message_stream_name
    a2a = f"{s.prefix}.a2a"
    tasks = f"{a2a}._task"
    queue = worker_queue(kind)
    # a queued task's events are `<a2a>._task.<queue>.<submitter>.<task_id>` (agents/queues.py)
    worker: list[str] = []
    if queue is not None:
        # a queue's worker: its queue's ten consumers in place of an agent's two, and the
        # statuses of its queue's tasks (store; read the last by subject), of every submitter
        consumers = tuple(f"task-{queue}-p{priority}" for priority in range(10))
        worker = [f"{tasks}.{queue}.*.*", f"{API}.DIRECT.GET.{stream}.{tasks}.{queue}.*.*"]
    submits = [t.removeprefix("task-") for t in identity.send_to if worker_queue(t) is not None]
    own_events = s.events(f"agent.{kind}-{key}")  # its registration (agents/registry.py)
    service = service_name(kind)  # NATS micro (ADR-32): its service is named after its type
    discovery = ("", f".{service}", f".{service}.*")
    publish = [
        *(s.agent_type(t) for t in identity.send_to),
        *(f"{s.agent_type(t)}.*" for t in identity.send_to),
        # a queue's workers are the agent type `task-<queue>` (agents/queues.py): sending to
        # them is submitting to the queue, at any priority
        *(f"{s.prefix}.task.{q}.*" for q in submits),
        # ... and storing and reading the statuses of the tasks it submits (under its name)
        *(f"{tasks}.{q}.{identity.name}.*" for q in submits),
        *(f"{API}.DIRECT.GET.{stream}.{tasks}.{q}.{identity.name}.*" for q in submits),
        *worker,
        *(s.topic(t) for t in identity.publish_topics),
        f"{a2a}._reply.*",
        f"{a2a}._task.*",
        f"{a2a}._model.{kind}",
        *(f"{a2a}._handled.{c}.*" for c in consumers),
        *(f"{a2a}._dead.{c}" for c in consumers),
        s.liveness(kind, key),
        own_events,
        f"{API}.STREAM.INFO.{s.stream_name}",
        f"{API}.DIRECT.GET.{s.stream_name}.{own_events}",
        *(f"{s.rpc(t)}" for t in identity.send_to),
        # the key service seals and opens its sealed fields (it never holds a key itself)
        s.key_service("seal"),
        s.key_service("open"),
        s.task_cancels,
        f"{API}.INFO",
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.STREAM.INFO.{s.liveness_stream_name}",
        *(f"{API}.CONSUMER.{op}.{stream}.{c}" for op in ("INFO", "MSG.NEXT") for c in consumers),
        *(f"$JS.ACK.{stream}.{c}.>" for c in consumers),
        *(f"{API}.DIRECT.GET.{stream}.{a2a}._handled.{c}.*" for c in consumers),
    ]
    subscribe = [
        f"{identity.inbox_prefix}.>",
        f"{a2a}._reply.{identity.name}",
        s.rpc(kind),
        f"{s.rpc(kind)}.>",
        s.task_cancels,
        *(f"$SRV.{verb}{tail}" for verb in ("PING", "INFO", "STATS") for tail in discovery),
    ]
    # replies to requests it serves (fast path, service discovery) go to requesters' inboxes
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": subscribe},
        "allow_responses": True,
    }


def server_config(identities: Iterable[Identity], subjects: Subjects) -> str:
    """nats-server's configuration for `identities` (revoked ones left out): one nkey user
    each, with its permissions.

    The bus's users stay in the top-level `authorization` block, which puts them in the global
    account: that is where the streams of a server that ran without a system account are, so
    a store directory keeps its streams when the configuration gains one. The `system`
    identities are the users of the system account `SYS`; the account is declared even with
    none, so adding one later is a reload, not a restart.
    """
    users: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    for identity in identities:
        if identity.revoked:
            continue
        user: dict[str, Any] = {"nkey": identity.public_key}
        allowed = permissions(identity, subjects)
        if allowed is not None:
            user["permissions"] = allowed
        (system if identity.role == "system" else users).append(user)
    if not users:
        raise IdentityError(name="*", reason="no identity to let in: add one with `fuse auth add`")
    return (
        f"authorization {{\n{_users(users, '  ')}}}\n"
        f"accounts {{\n  {SYSTEM_ACCOUNT} {{\n{_users(system, '    ')}  }}\n}}\n"
        f"system_account: {SYSTEM_ACCOUNT}\n"
    )


def _users(users: list[dict[str, Any]], indent: str) -> str:
    # nats-server's configuration format accepts JSON values; each user is one line of JSON
    lines = "".join(f"{indent}  {json.dumps(user)},\n" for user in users)
    return f"{indent}users = [\n{lines}{indent}]\n"
