"""`fuse` as a newcomer uses it: --version, flags anywhere, payloads from stdin or a file, pipes
that close early, a quick --help, shell completion. Real processes, real stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from newfuse.cli.main import COMMANDS
from support import run_fuse

Run = subprocess.CompletedProcess[str]


def fuse(*args: str, check: bool = True, stdin: str | None = None) -> Run:
    env = dict(os.environ)
    env.pop("FUSE_STORE", None)
    return run_fuse(*args, env=env, stdin=stdin, check=check)


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'usage.db'}"


def replay_json(*args: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in fuse(*args).stdout.splitlines()]


def test_version_names_the_installed_package() -> None:
    from importlib.metadata import version

    assert fuse("--version").stdout == f"fuse (newfuse) {version('newfuse')}\n"


def test_global_flags_work_before_and_after_the_command(store: str) -> None:
    fuse("--store", store, "publish", "agent.r1", "note", "--data", "{}")
    after = replay_json("replay", "--store", store, "--json")
    before = replay_json("--store", store, "--json", "replay")
    mixed = replay_json("--json", "replay", "--store", store)
    assert [e["stream"] for e in after] == ["agent.r1"] and after == before == mixed
    # Given after the command, a flag wins over the same flag before it.
    assert (
        replay_json(
            "--store", "sqlite:///nonexistent/dir/x.db", "replay", "--store", store, "--json"
        )
        == after
    )


def test_publish_reads_data_from_stdin_and_from_a_file(store: str, tmp_path: Path) -> None:
    fuse("--store", store, "publish", "agent.r1", "note", "--data", "-", stdin='{"from": "stdin"}')
    payload = tmp_path / "payload.json"
    payload.write_text('{"from": "file", "text": "日本語"}', encoding="utf-8")
    fuse("--store", store, "publish", "agent.r1", "note", "--data", f"@{payload}")
    assert [e["data"] for e in replay_json("--store", store, "replay", "--json")] == [
        {"from": "stdin"},
        {"from": "file", "text": "日本語"},
    ]
    missing = fuse(
        "--store", store, "publish", "agent.r1", "note", "--data", "@nope.json", check=False
    )
    assert missing.returncode == 1
    assert "--data='@nope.json': cannot read 'nope.json' (No such file or directory)" in (
        missing.stderr
    )
    bad = fuse(
        "--store", store, "publish", "agent.r1", "note", "--data", "-", stdin="{x", check=False
    )
    assert bad.returncode == 1 and "--data='-': not valid JSON" in bad.stderr
    deep = fuse(
        "--store", store, "publish", "agent.r1", "note", "--data", "-",
        stdin="[" * 5000 + "]" * 5000, check=False,
    )  # fmt: skip
    assert deep.returncode == 1 and deep.stderr.startswith("fuse: --data='-': nests 5000 deep")
    assert "Traceback" not in deep.stderr


def test_an_argument_that_is_not_utf8_is_a_clear_error(store: str) -> None:
    result = subprocess.run(
        [
            sys.executable.encode(),
            b"-m",
            b"newfuse",
            b"--store",
            store.encode(),
            b"publish",
            b"agent.r\xff",
            b"note",
            b"--data",
            b"{}",
        ],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "fuse: argument 4 (b'agent.r\\xff') is not valid UTF-8; stream names, types and data "
        "are UTF-8 text: re-encode it (e.g. with iconv) and try again\n"
    )


@pytest.fixture
def filled(tmp_path: Path) -> str:
    """A SQLite store of 3,000 events: more than a pipe buffer of output."""
    url = f"sqlite://{tmp_path / 'filled.db'}"
    script = (
        "import asyncio, sys\n"
        "from newfuse.eventstore import open_event_store\n"
        "from newfuse.schemas import NewEvent\n"
        "async def main():\n"
        "    async with await open_event_store(sys.argv[1]) as store:\n"
        "        for i in range(30):\n"
        "            await store.append(f'agent.r{i}', [NewEvent(type='note', data={'n': k})\n"
        "                                               for k in range(100)])\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script, url], check=True, timeout=60)
    return url


@pytest.mark.parametrize("output", [[], ["--json"]], ids=["table", "json"])
def test_a_reader_that_stops_early_ends_fuse_quietly_by_sigpipe(
    filled: str, output: list[str]
) -> None:
    replay = subprocess.Popen(
        [sys.executable, "-m", "newfuse", "--store", filled, "replay", *output],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert replay.stdout is not None
    assert replay.stdout.readline()  # `| head -1`
    replay.stdout.close()
    _, stderr = replay.communicate(timeout=60)
    # As coreutils and the nats CLI end: by the signal (status 141 in a shell), saying nothing.
    assert replay.returncode == -signal.SIGPIPE
    assert stderr == b""


def test_a_limit_that_cuts_the_listing_says_so(filled: str) -> None:
    cut = fuse("--store", filled, "replay", "--limit", "5")
    assert len(cut.stdout.splitlines()) == 1 + 5
    assert "5 event(s) shown; --limit 5 cut the listing: more events match" in cut.stderr
    assert "--from-position 6" in cut.stderr
    whole = fuse("--store", filled, "replay", "--stream", "agent.r0", "--limit", "100")
    assert "cut" not in whole.stderr and "100 event(s)" in whole.stderr


def test_table_cells_are_measured_in_terminal_cells(store: str) -> None:
    fuse(
        "--store",
        store,
        "publish",
        "agent.wide",
        "note",
        "--data",
        "{}",
        "--correlation",
        "全角メモ",
    )
    fuse("--store", store, "publish", "agent.narrow", "note", "--data", '{"text": "ab"}')
    header, wide, narrow = fuse("--store", store, "replay").stdout.splitlines()
    from rich.cells import cell_len

    # The DATA column starts at the same terminal cell on every line.
    assert [cell_len(line.split("{")[0]) for line in (wide, narrow)] == [
        cell_len(header.split("DATA")[0])
    ] * 2


def test_help_imports_no_client_library_nor_rich() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "newfuse", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "COMMAND" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    heavy = ("nats", "redis", "msgspec", "rich", "shtab", "aiosqlite", "uvloop", "opentelemetry")
    ours = ("newfuse.eventstore", "newfuse.schemas", "newfuse.projections", "newfuse.nats")
    loaded = sorted(
        name
        for name in imported
        if name.split(".")[0] in heavy or name.startswith(ours) or name == "newfuse.cli.dev"
    )
    assert "newfuse.cli.main" in imported and loaded == []


def test_help_lists_every_command_and_each_command_has_its_help() -> None:
    listing = fuse("--help").stdout
    for name, command in COMMANDS.items():
        assert f"{name}  " in listing and command.help in listing
        assert fuse(name, "--help").stdout.startswith(f"usage: fuse {name}")


def test_bash_completion_completes_commands_and_flags(tmp_path: Path) -> None:
    script = tmp_path / "fuse.bash"
    script.write_text(fuse("completion", "bash").stdout)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        program = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            f"COMP_LINE='{line}'; COMP_POINT={len(line)}; _shtab_fuse; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return sorted(done.stdout.split())

    assert complete("fuse", "re") == ["replay", "review"]
    assert "--from-position" in complete("fuse", "replay", "--fr")
    assert complete("fuse", "completion", "") == ["bash", "zsh"]


def test_zsh_completion_is_a_compdef_for_every_command() -> None:
    script = fuse("completion", "zsh").stdout
    assert script.startswith("#compdef fuse")
    listed = [line.split(":", 1)[0].strip() for line in script.splitlines() if ":'" in line]
    assert set(COMMANDS) <= set(listed)


def _on_a_terminal(*args: str, env: dict[str, str]) -> bytes:
    """What `fuse` writes when stdout and stderr are a terminal (a pseudo-terminal here)."""
    import pty

    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "newfuse", *args],
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
            env=env,
            timeout=60,
        )
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        if terminal != -1:
            os.close(terminal)
        os.close(controller)
    assert done.returncode == 1
    return output


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path: Path) -> None:
    missing = ["--store", f"sqlite://{tmp_path / 'missing.db'}", "replay"]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env["TERM"] = "xterm-256color"
    red = b"\x1b[1;31mfuse:"
    assert red in _on_a_terminal(*missing, env=env)
    plain = _on_a_terminal(*missing, env={**env, "NO_COLOR": "1"})
    assert b"fuse:" in plain and b"31m" not in plain
    piped = fuse(*missing, check=False)
    assert piped.stderr.startswith("fuse: no event store") and "\x1b[" not in piped.stderr
