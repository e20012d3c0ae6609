"""`lineage-sidecar keys`: rotation keeps every older key (a local keyring's, a Vault Transit
key's versions), so sealed batches still open."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import AgentProcessConfig
from agent.crypto import decode_header, open_batch, seal_batch
from agent.keys import LocalKeyring, open_key_provider
from lineage_sidecar.config import load_process
from tests.vault import MOUNT, DevServer, agent_token, create_key, operator_token

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


def test_local_keyring_through_the_configuration(tmp_path: Path) -> None:
    keyring = tmp_path / "keys" / "keyring.json"
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"keys": {"provider": "local", "keyring": str(keyring)}}))
    missing = cli("list", "--config", str(config))
    assert missing.returncode == 1
    assert "no such file" in missing.stderr
    assert cli("rotate", "--config", str(config)).returncode == 0
    listed = cli("list", "--config", str(config)).stdout.splitlines()
    keys = LocalKeyring(keyring, create=False)
    assert len(listed) == 2  # rotate created the keyring, then added a key
    assert listed == [f"{keys.key_ids[0]}", f"{keys.active_key_id} (active)"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list",), "give either a keyring file or --config FILE"),
        (("list", "k.json", "--config", "c.yaml"), "give either a keyring file or --config FILE"),
        (("list", "k.json", "--vault-token", "env:T"), "--vault-token needs --config"),
        (("rotate", "--config", "c.yaml", "--vault-token", "s.hunter2"), "not the token"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = subprocess.run(
        [CLI, "keys", *args], capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "hunter2" not in result.stderr


# ---- Vault Transit (a real OpenBao dev server) -----------------------------------------


def vault_config(path: Path, server: DevServer, key: str, token_file: Path) -> Path:
    keys = {
        "provider": "vault",
        "vault": {
            "address": server.url,
            "token": f"file:{token_file}",
            "mount": MOUNT,
            "key_name": key,
            "timeout": 5,
        },
    }
    path.write_text(yaml.safe_dump({"keys": keys}))
    return path


def test_vault_rotate_and_list_with_an_operator_token(
    vault_server: DevServer, tmp_path: Path
) -> None:
    key = create_key(vault_server)
    agent_token_file = tmp_path / "agent-token"
    agent_token_file.write_text(agent_token(vault_server, key))
    operator = tmp_path / "operator-token"
    operator.write_text(operator_token(vault_server, key))
    config = vault_config(tmp_path / "sidecar.yaml", vault_server, key, agent_token_file)
    loaded = load_process(config, AgentProcessConfig, ("keys",), environ={})
    provider = open_key_provider(loaded.keys)
    sealed = asyncio.run(
        seal_batch(b"lineage", topic="t", batch_id="b1", schema_version=1, provider=provider)
    )
    assert decode_header(sealed).wrapped_key.startswith(b"vault:v1:")

    # The agent's token may encrypt and decrypt only: one line saying what is needed.
    for action in ("list", "rotate"):
        refused = cli(action, "--config", str(config))
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "permission denied" in refused.stderr
        assert f"update on {MOUNT}/keys/{key}/rotate" in refused.stderr
        assert "--vault-token" in refused.stderr

    rotated = cli("rotate", "--config", str(config), "--vault-token", f"file:{operator}")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith(f"new active version v2 of vault:{MOUNT}/{key} ")
    listed = cli("list", "--config", str(config), "--vault-token", f"file:{operator}")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [f"vault:{MOUNT}/{key}", f"v{n}"] for n in (1, 2)
    ]
    assert lines[-1].endswith(" (active)")
    assert not lines[0].endswith(" (active)")

    # The same configuration, untouched: new batches use v2, the old one still opens.
    resealed = asyncio.run(
        seal_batch(b"after", topic="t", batch_id="b2", schema_version=1, provider=provider)
    )
    assert decode_header(resealed).wrapped_key.startswith(b"vault:v2:")
    assert asyncio.run(open_batch(sealed, topic="t", provider=provider)).plaintext == b"lineage"


def test_vault_key_that_does_not_exist_is_one_line(vault_server: DevServer, tmp_path: Path) -> None:
    absent = "lineage-absent"
    operator = tmp_path / "operator-token"
    operator.write_text(operator_token(vault_server, absent))
    config = vault_config(tmp_path / "sidecar.yaml", vault_server, absent, operator)
    for action in ("list", "rotate"):
        result = cli(action, "--config", str(config))
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1
        assert f"vault transit key vault:{MOUNT}/{absent} not found" in result.stderr


def test_bad_vault_configuration_is_one_line_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"keys": {"provider": "vault"}}))
    result = cli("list", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lineage-sidecar: configuration error: {config}: keys.vault: required when "
        "keys.provider is vault"
    ]
