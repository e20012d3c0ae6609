"""Key providers: the local keyring file, its permissions and rotation; Vault's edges."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from agent.keys import (
    KeyProviderError,
    KeyringError,
    KeyUnwrapError,
    LocalKeyring,
    VaultTransitKeyProvider,
    WrappedKey,
    resolve_secret_reference,
)

DATA_KEY = bytes(range(32))


def keyring_json(active: str, key_ids: list[str]) -> str:
    material = base64.b64encode(bytes(32)).decode()
    keys = [{"id": key_id, "material": material} for key_id in key_ids]
    return json.dumps({"format": 1, "active": active, "keys": keys})


def temp_files(directory: Path) -> list[Path]:
    return list(directory.glob(".*.tmp"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_absent_keyring_is_created_private_with_one_active_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    keyring = LocalKeyring(path)
    assert mode_of(path) == 0o600
    document = json.loads(path.read_text())
    assert document["active"] == keyring.active_key_id
    assert [key["id"] for key in document["keys"]] == [keyring.active_key_id]
    assert len(base64.b64decode(document["keys"][0]["material"])) == 32


def test_created_keyring_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        LocalKeyring(tmp_path / "keyring.json")
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "keyring.json") == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o602])
def test_keyring_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyring(path)
    path.chmod(mode)
    with pytest.raises(KeyringError, match="chmod 600"):
        LocalKeyring(path)


def test_missing_keyring_without_create_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="no such file"):
        LocalKeyring(tmp_path / "absent.json", create=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"format": 2, "active": "a", "keys": []}', "unknown format 2"),
        ('{"format": 1, "active": "a", "keys": []}', "non-empty list"),
        (
            '{"format": 1, "active": "a", "keys": [{"id": "a", "material": "c2hvcnQ="}]}',
            "must be 32 bytes",
        ),
        (keyring_json("b", ["a"]), "'active' must name one of the keys"),
        (keyring_json("a", ["a", "a"]), "appears twice"),
        (keyring_json("a", ["a\n"]), "printable ASCII"),
        ('{"format": 1, "active": "a", "keys": [17]}', "keys\\[0\\].id"),
    ],
)
def test_malformed_keyring_is_refused_with_the_reason(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyringError, match=message):
        LocalKeyring(path, create=False)


async def test_wrap_unwrap_round_trip_hides_the_data_key(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keyring.json")
    wrapped = await keyring.wrap(DATA_KEY)
    assert wrapped.key_id == keyring.active_key_id
    assert DATA_KEY not in wrapped.ciphertext
    assert await keyring.unwrap(wrapped) == DATA_KEY


async def test_wrap_refuses_a_data_key_of_the_wrong_size(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keyring.json")
    with pytest.raises(ValueError, match="32 bytes"):
        await keyring.wrap(b"short")


async def test_unknown_key_id_and_altered_wrapped_key_are_told_apart(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keyring.json")
    wrapped = await keyring.wrap(DATA_KEY)
    with pytest.raises(KeyUnwrapError) as unknown:
        await keyring.unwrap(WrappedKey("k-nobody", wrapped.ciphertext))
    assert unknown.value.reason == "unknown_key"
    altered = bytearray(wrapped.ciphertext)
    altered[3] ^= 1
    with pytest.raises(KeyUnwrapError) as tampered:
        await keyring.unwrap(WrappedKey(wrapped.key_id, bytes(altered)))
    assert tampered.value.reason == "tampered"


async def test_rotation_keeps_old_keys_and_writes_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring = LocalKeyring(path)
    old_id = keyring.active_key_id
    old_wrapped = await keyring.wrap(DATA_KEY)

    new_id = keyring.rotate()
    assert new_id != old_id
    assert keyring.active_key_id == new_id
    assert (await keyring.wrap(DATA_KEY)).key_id == new_id
    assert await keyring.unwrap(old_wrapped) == DATA_KEY
    assert mode_of(path) == 0o600

    reopened = LocalKeyring(path, create=False)
    assert reopened.key_ids == (old_id, new_id)
    assert reopened.active_key_id == new_id
    assert await reopened.unwrap(old_wrapped) == DATA_KEY
    assert not temp_files(tmp_path)  # no temp file left behind


async def test_a_rotation_by_another_process_is_seen_on_unwrap(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ingester_side = LocalKeyring(path)
    agent_side = LocalKeyring(path, create=False)
    agent_side.rotate()
    wrapped = await agent_side.wrap(DATA_KEY)
    assert await ingester_side.unwrap(wrapped) == DATA_KEY


async def test_keyring_that_disappeared_is_a_provider_error_not_a_data_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyring.json"
    keyring = LocalKeyring(path)
    path.unlink()
    with pytest.raises(KeyProviderError, match="disappeared"):
        await keyring.unwrap(WrappedKey("k-from-elsewhere", bytes(40)))


# ---- secret references and Vault -------------------------------------------------------
# There is no Vault server here: these tests cover only what happens before a request
# reaches Vault, and a Vault address where nothing listens. The Transit calls themselves
# are untested against a real server.


def test_secret_references_come_from_files_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.file-token\n")
    assert resolve_secret_reference(f"file:{token_file}") == "s.file-token"
    monkeypatch.setenv("VAULT_TOKEN_FOR_TEST", "s.env-token")
    assert resolve_secret_reference("env:VAULT_TOKEN_FOR_TEST") == "s.env-token"
    with pytest.raises(ValueError, match="file:PATH or env:NAME"):
        resolve_secret_reference("s.inline-token")
    with pytest.raises(KeyProviderError, match="not set"):
        resolve_secret_reference("env:VAULT_TOKEN_NOT_SET_ANYWHERE")
    with pytest.raises(KeyProviderError, match="cannot read secret file"):
        resolve_secret_reference(f"file:{tmp_path / 'absent'}")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def vault_without_server(monkeypatch: pytest.MonkeyPatch) -> VaultTransitKeyProvider:
    monkeypatch.setenv("VAULT_TOKEN_FOR_TEST", "s.test-token")
    return VaultTransitKeyProvider(
        url=f"http://127.0.0.1:{closed_port()}",
        key_name="lineage",
        token_reference="env:VAULT_TOKEN_FOR_TEST",
        timeout_s=2,
    )


async def test_vault_refuses_a_foreign_key_id_or_non_vault_ciphertext_locally(
    vault_without_server: VaultTransitKeyProvider,
) -> None:
    assert vault_without_server.active_key_id == "vault:transit/lineage"
    with pytest.raises(KeyUnwrapError) as foreign:
        await vault_without_server.unwrap(WrappedKey("k20260101T000000Z-00000000", b"x" * 40))
    assert foreign.value.reason == "unknown_key"
    with pytest.raises(KeyUnwrapError) as garbage:
        await vault_without_server.unwrap(WrappedKey("vault:transit/lineage", b"\xff\x00garbage"))
    assert garbage.value.reason == "tampered"


async def test_unreachable_vault_is_a_retriable_provider_error(
    vault_without_server: VaultTransitKeyProvider,
) -> None:
    with pytest.raises(KeyProviderError) as on_wrap:
        await vault_without_server.wrap(DATA_KEY)
    assert on_wrap.value.retriable
    with pytest.raises(KeyProviderError) as on_unwrap:
        await vault_without_server.unwrap(WrappedKey("vault:transit/lineage", b"vault:v1:abc"))
    assert on_unwrap.value.retriable


def test_vault_provider_refuses_a_bad_token_reference_at_start() -> None:
    with pytest.raises(ValueError, match="file:PATH or env:NAME"):
        VaultTransitKeyProvider(
            url="http://127.0.0.1:1", key_name="lineage", token_reference="hunter2"
        )
