"""`lineage-sidecar keys`: rotation keeps every older key, so sealed batches still open."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from agent.crypto import open_batch, seal_batch
from agent.keys import LocalKeyring

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "keys", *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_rotate_then_old_batches_still_open(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    before = LocalKeyring(keyring)
    sealed = asyncio.run(
        seal_batch(b"lineage", topic="t", batch_id="b1", schema_version=1, provider=before)
    )
    rotated = cli("rotate", str(keyring))
    assert rotated.returncode == 0, rotated.stderr
    assert keyring.stat().st_mode & 0o777 == 0o600
    listed = cli("list", str(keyring)).stdout.splitlines()
    assert len(listed) == 2
    assert listed[-1].endswith("(active)")
    after = LocalKeyring(keyring, create=False)
    assert after.active_key_id != before.active_key_id
    opened = asyncio.run(open_batch(sealed, topic="t", provider=after))
    assert opened.plaintext == b"lineage"


def test_listing_a_missing_keyring_is_one_line(tmp_path: Path) -> None:
    result = cli("list", str(tmp_path / "absent.json"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
