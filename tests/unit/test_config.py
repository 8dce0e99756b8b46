"""Settings: defaults < FUSE_* environment < explicit overrides; bad values name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from newfuse.config import DevState, Settings, dev_state_path, resolve_nats_ca
from newfuse.errors import ConfigError

FULL_ENV = {
    "FUSE_NATS_URL": "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
    "FUSE_REDIS_URL": "redis://10.0.0.3:6379/2",
    "FUSE_STORE": "sqlite:///var/lib/fuse/events.db",
    "FUSE_PREFIX": "prod_eu-1",
    "FUSE_STATE_DIR": "/run/fuse",
    "FUSE_CONNECT_TIMEOUT": "2.5",
}


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = Settings.from_env({})
    assert settings.nats_url is None
    assert settings.redis_url is None
    assert settings.store is None
    assert settings.prefix == "fuse"
    assert settings.connect_timeout == 5.0
    assert settings.state_dir.endswith("newfuse")


def test_environment_overrides_defaults() -> None:
    settings = Settings.from_env(FULL_ENV)
    assert settings == Settings(
        nats_url="nats://10.0.0.1:4222,nats://10.0.0.2:4222",
        redis_url="redis://10.0.0.3:6379/2",
        store="sqlite:///var/lib/fuse/events.db",
        prefix="prod_eu-1",
        state_dir="/run/fuse",
        connect_timeout=2.5,
    )


def test_explicit_overrides_beat_the_environment_and_none_means_not_given() -> None:
    settings = Settings.from_env(
        FULL_ENV, nats_url="tls://nats.example:4222", prefix="staging", redis_url=None
    )
    assert settings.nats_url == "tls://nats.example:4222"
    assert settings.prefix == "staging"
    assert settings.redis_url == "redis://10.0.0.3:6379/2"  # None did not clear it
    assert settings.connect_timeout == 2.5


def test_empty_environment_values_count_as_unset() -> None:
    settings = Settings.from_env(
        {"FUSE_PREFIX": "", "FUSE_NATS_URL": "", "FUSE_CONNECT_TIMEOUT": ""}
    )
    assert (settings.prefix, settings.nats_url, settings.connect_timeout) == ("fuse", None, 5.0)


def test_the_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSE_PREFIX", "fromenv")
    monkeypatch.setenv("FUSE_CONNECT_TIMEOUT", "7")
    settings = Settings.from_env()
    assert (settings.prefix, settings.connect_timeout) == ("fromenv", 7.0)


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.prefix = "other"  # type: ignore[misc]


@pytest.mark.parametrize("prefix", ["a.b", "a b", "a*", "a>", "fü\tse", "x/y"])
def test_a_bad_prefix_names_the_variable_and_value(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^FUSE_PREFIX=.*: use letters, digits") as caught:
        Settings.from_env({"FUSE_PREFIX": prefix})
    assert (caught.value.variable, caught.value.value) == ("FUSE_PREFIX", prefix)
    assert isinstance(caught.value, ValueError)


def test_an_empty_prefix_given_explicitly_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^FUSE_PREFIX='': use letters"):
        Settings.from_env({}, prefix="")


@pytest.mark.parametrize(
    ("raw", "value", "reason"),
    [
        ("soon", "soon", "must be a number of seconds"),
        ("5s", "5s", "must be a number of seconds"),
        ("0", 0.0, "must be a positive number of seconds"),
        ("-1.5", -1.5, "must be a positive number of seconds"),
    ],
)
def test_a_bad_connect_timeout_names_the_variable_and_value(
    raw: str, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^FUSE_CONNECT_TIMEOUT=.*: {reason}$") as caught:
        Settings.from_env({"FUSE_CONNECT_TIMEOUT": raw})
    assert (caught.value.variable, caught.value.value) == ("FUSE_CONNECT_TIMEOUT", value)


@pytest.mark.parametrize(
    ("variable", "url", "schemes"),
    [
        ("FUSE_NATS_URL", "http://localhost:4222", "nats://, tls://, ws://, wss://"),
        ("FUSE_NATS_URL", "localhost:4222", "nats://"),
        ("FUSE_REDIS_URL", "nats://localhost:6379", "redis://, rediss://, unix://"),
        ("FUSE_STORE", "postgres://db/events", "nats://, tls://, sqlite://"),
    ],
)
def test_a_url_with_a_wrong_scheme_names_the_variable_value_and_schemes(
    variable: str, url: str, schemes: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}={url!r}: expected a URL starting with"):
        Settings.from_env({variable: url})
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: url})
    assert schemes in str(caught.value)
    assert (caught.value.variable, caught.value.value) == (variable, url)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("FUSE_NATS_URL", "tls://nats.example:4222"),
        ("FUSE_NATS_URL", "ws://127.0.0.1:8080"),
        ("FUSE_REDIS_URL", "rediss://cache.example:6380/0"),
        ("FUSE_REDIS_URL", "unix:///run/valkey.sock"),
        ("FUSE_STORE", "sqlite://:memory:"),
        ("FUSE_STORE", "nats://127.0.0.1:4222"),
    ],
)
def test_every_supported_scheme_is_accepted(variable: str, url: str) -> None:
    settings = Settings.from_env({variable: url})
    assert url in (settings.nats_url, settings.redis_url, settings.store)


def test_a_bad_override_is_reported_under_its_variable_name() -> None:
    with pytest.raises(ConfigError, match=r"^FUSE_REDIS_URL='http://x'"):
        Settings.from_env({}, redis_url="http://x")


def test_replicas_and_election_timeout_come_from_the_environment() -> None:
    assert (Settings().replicas, Settings().election_timeout) == (None, 15.0)
    settings = Settings.from_env({"FUSE_REPLICAS": "3", "FUSE_ELECTION_TIMEOUT": "20"})
    assert (settings.replicas, settings.election_timeout) == (3, 20.0)
    assert Settings.from_env({"FUSE_REPLICAS": "3"}, replicas=1).replicas == 1


@pytest.mark.parametrize(
    ("raw", "value", "reason"),
    [
        ("three", "three", "must be a whole number, 1 to 5"),
        ("-1", "-1", "must be a whole number, 1 to 5"),
        ("0", 0, "JetStream keeps 1 to 5 copies"),
        ("7", 7, "JetStream keeps 1 to 5 copies"),
    ],
)
def test_a_bad_replica_count_names_the_variable_and_value(
    raw: str, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^FUSE_REPLICAS=.*: {reason}") as caught:
        Settings.from_env({"FUSE_REPLICAS": raw})
    assert (caught.value.variable, caught.value.value) == ("FUSE_REPLICAS", value)


@pytest.mark.parametrize("raw", ["soon", "0", "-3"])
def test_a_bad_election_timeout_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^FUSE_ELECTION_TIMEOUT=.*seconds"):
        Settings.from_env({"FUSE_ELECTION_TIMEOUT": raw})


def test_the_nats_ca_comes_from_the_environment_and_a_missing_file_is_named(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Settings.from_env({"FUSE_NATS_CA": str(ca)}).nats_ca == str(ca)
    with pytest.raises(ConfigError, match=r"^FUSE_NATS_CA=.*no such file") as caught:
        Settings.from_env({}, nats_ca=str(tmp_path / "gone.pem"))  # as `--ca` passes it
    assert caught.value.variable == "FUSE_NATS_CA"
    with pytest.raises(ConfigError, match=r"^FUSE_NATS_CA=.*no such file"):
        Settings.from_env({"FUSE_NATS_CA": str(tmp_path)})  # a directory is no CA file


def test_the_nats_ca_of_a_running_dev_is_used_only_on_its_servers(tmp_path: Path) -> None:
    """As with credentials: the dev's CA goes with the dev's URL, never to a URL given."""
    settings = Settings(state_dir=str(tmp_path))
    state = DevState(
        pid=os.getpid(),
        nats_url="tls://127.0.0.1:4222",
        redis_url="redis://127.0.0.1:6379/0",
        audit_db=str(tmp_path / "a.db"),
        prefix="fuse",
        data_dir=str(tmp_path),
        ca=str(tmp_path / "ca.pem"),
    )
    dev_state_path(settings).write_bytes(msgspec.json.encode(state))
    assert resolve_nats_ca(settings) == str(tmp_path / "ca.pem")
    elsewhere = msgspec.structs.replace(settings, nats_url="tls://nats.example:4222")
    assert resolve_nats_ca(elsewhere) is None
