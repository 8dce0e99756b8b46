"""Run mypy --strict on reveal_schemas.py and compare with its `# R:` and `# E:` comments.

As msgspec checks its own stubs: the public API must keep the types users rely on, and misuse
(a wrong literal, a wire name as keyword, assigning to a frozen field) must stay a type error.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REVEALS = Path(__file__).with_name("reveal_schemas.py")

_EXPECTED = re.compile(r"#\s*(R|E):\s*(.+?)\s*$")
_REVEALED = re.compile(r':(\d+): note: Revealed type is "(.*)"$')
_ERROR = re.compile(r":(\d+): error: .*\[([a-z-]+)\]$")


def _expected() -> tuple[dict[int, str], dict[int, set[str]]]:
    reveals: dict[int, str] = {}
    errors: dict[int, set[str]] = {}
    for number, line in enumerate(REVEALS.read_text(encoding="utf-8").splitlines(), start=1):
        match = _EXPECTED.search(line)
        if match is None:
            continue
        kind, text = match.groups()
        if kind == "R":
            reveals[number] = text
        else:
            errors.setdefault(number, set()).add(text)
    return reveals, errors


def test_public_schema_api_types_are_as_documented() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--strict",
            "--show-error-codes",
            "--no-error-summary",
            "--no-pretty",
            str(REVEALS.relative_to(ROOT)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.stderr == "", result.stderr
    revealed: dict[int, str] = {}
    errors: dict[int, set[str]] = {}
    for line in result.stdout.splitlines():
        if match := _REVEALED.search(line):
            revealed[int(match.group(1))] = match.group(2)
        elif match := _ERROR.search(line):
            errors.setdefault(int(match.group(1)), set()).add(match.group(2))
    expected_reveals, expected_errors = _expected()
    assert expected_reveals, "no `# R:` lines found"
    assert revealed == expected_reveals, result.stdout
    assert errors == expected_errors, result.stdout
