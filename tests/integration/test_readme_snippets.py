"""Every ```python block of README.md runs as written, as its own process, against a `fuse dev`."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from newfuse.eventstore import open_event_store
from support import dev_environment, start_fuse_dev

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.M | re.S)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    """A `fuse dev` of this module's own; the environment a reader has (no FUSE_* set)."""
    root = tmp_path_factory.mktemp("readme")
    env = dev_environment(root / "state")
    with start_fuse_dev(
        env, "dev", "--data-dir", str(root / "data"), stderr=subprocess.DEVNULL
    ) as dev:
        yield env, dev.urls["FUSE_NATS_URL"]


def test_the_readme_has_a_python_snippet() -> None:
    assert SNIPPETS, f"no ```python block found in {README}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
async def test_a_readme_snippet_runs_as_written(
    dev: tuple[dict[str, str], str], snippet: str, tmp_path: Path
) -> None:
    env, _ = dev
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, f"{snippet}\n--- stderr ---\n{result.stderr}"
    assert result.stderr == ""


async def test_the_tour_snippet_wrote_to_the_running_fuse_dev(
    dev: tuple[dict[str, str], str],
) -> None:
    env, nats_url = dev
    tour = next(s for s in SNIPPETS if "open_event_store()" in s)
    subprocess.run(
        [sys.executable, "-c", tour], env=env, check=True, timeout=60, capture_output=True
    )
    async with await open_event_store(nats_url) as store:
        events = [event async for event in store.read("agent.r1")]
    assert events and events[-1].type == "agent.state_update"


def test_fuse_demo_runs_on_the_running_fuse_dev_and_reads_its_projections(
    dev: tuple[dict[str, str], str],
) -> None:
    env, nats_url = dev
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", "demo"],
        env=env,
        timeout=90,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "using the running fuse dev (pid " in result.stdout
    assert nats_url in result.stdout
    # the dev's own projection runners folded the tour's registrations into its Redis
    states = re.findall(r"^  (researcher-r[12]|writer-w1) +(\w+)", result.stdout, flags=re.M)
    assert sorted(name for name, _ in states) == ["researcher-r1", "researcher-r2", "writer-w1"]
    assert "its history stays on the server" in result.stdout
