"""`fuse audit keygen|checkpoint|verify` as a user runs them, on a SQLite file edited by hand."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

from support import run_fuse


def test_keygen_checkpoint_verify_and_a_tampered_file(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FUSE_STORE": f"sqlite://{tmp_path / 'log.db'}",
        "FUSE_STATE_DIR": str(tmp_path / "state"),
    }
    public = run_fuse("audit", "keygen", env=env).stdout.strip()
    key = tmp_path / "state" / "audit" / "newfuse-audit.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert public.startswith("newfuse-audit+") and public not in key.read_text()
    again = run_fuse("audit", "keygen", env=env, check=False)
    assert again.returncode != 0 and "exists already" in again.stderr
    for n in range(5):
        run_fuse("publish", "agent.x", "demo.thing", "--data", json.dumps({"n": n}), env=env)
    note = run_fuse("audit", "checkpoint", env=env).stdout
    assert note.startswith("newfuse/sqlite\n5\n") and "\n\n\u2014 newfuse-audit " in note
    (tmp_path / "kept.note").write_text(note)
    verified = run_fuse("audit", "verify", "--json", env=env)
    report = json.loads(verified.stdout)
    assert (report["status"], report["verified_to"], report["key"]) == (
        "verified",
        5,
        "newfuse-audit",
    )
    table = run_fuse("audit", "verify", env=env).stdout
    assert "verified up to position 5, checkpoint signed by newfuse-audit" in table

    connection = sqlite3.connect(tmp_path / "log.db")
    connection.execute("UPDATE events SET body = replace(body, '\"n\":2', '\"n\":7') ")
    connection.commit()
    connection.close()
    tampered = run_fuse("audit", "verify", env=env, check=False)
    assert tampered.returncode == 1
    assert "changed at position 3: its bytes differ" in tampered.stderr
    report = json.loads(run_fuse("audit", "verify", "--json", env=env, check=False).stdout)
    assert (report["status"], report["position"]) == ("changed", 3)

    stranger = run_fuse(
        "audit", "verify", "--trust", str(tmp_path / "nope.pub"), env=env, check=False
    )
    assert stranger.returncode != 0 and "nope.pub" in stranger.stderr
