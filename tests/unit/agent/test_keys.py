"""Key providers: the local keyring file, its permissions and rotation; Vault's edges; the
provider the `keys` configuration names."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from agent.config import (
    SECRET_MAX_BYTES,
    IngestProcessConfig,
    KeysConfig,
    VaultConfig,
    load_file,
)
from agent.keys import (
    KeyProviderError,
    KeyringError,
    KeyUnwrapError,
    LocalKeyring,
    VaultTransitKeyProvider,
    WrappedKey,
    open_key_provider,
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


def test_a_fifo_at_the_keyring_path_is_refused_without_waiting_for_a_writer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyring.json"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | None] = []

    def open_keyring() -> None:
        try:
            LocalKeyring(path, create=False)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    opener = threading.Thread(target=open_keyring, daemon=True)
    opener.start()
    opener.join(30)  # a deadlock guard, not a timing requirement
    if opener.is_alive():
        # Blocked in open(): give it a writer so the thread ends, then fail.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        opener.join(30)
        pytest.fail("opening a FIFO keyring waited for a writer")
    [error] = outcome
    assert isinstance(error, KeyringError)
    assert "not a regular file" in str(error)


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
        ("[" * 100_000, "nested too deeply"),
        (
            keyring_json("a", ["a"]).replace("AAAA", "\u00e9\u00e9\u00e9\u00e9", 1),
            "must be 32 bytes",
        ),
        (keyring_json("a", ["a"]).replace('"format": 1', '"format": true'), "unknown format True"),
        (keyring_json("a", ["a"]).replace('"format": 1', '"format": 1.0'), "unknown format 1.0"),
        (
            keyring_json("a", ["a"]).replace('"id"', '"created": {"x": 1}, "id"'),
            "keys\\[0\\].created must be a string",
        ),
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


async def test_keyring_edited_into_a_bad_state_is_a_provider_error_until_fixed(
    tmp_path: Path,
) -> None:
    # The ingester looks the file up again for a key id it does not know; a hand edit
    # gone wrong must be a KeyProviderError (retried, nothing dead-lettered), not a crash.
    path = tmp_path / "keyring.json"
    ingester_side = LocalKeyring(path)
    old_key = await ingester_side.wrap(DATA_KEY)
    good = path.read_text()
    document = json.loads(good)
    document["keys"][0]["material"] = "\u00e9" * 44
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    with pytest.raises(KeyProviderError, match="material must be 32 bytes"):
        await ingester_side.unwrap(WrappedKey("k-rotated-meanwhile", bytes(40)))
    assert await ingester_side.unwrap(old_key) == DATA_KEY  # what it had loaded still works
    path.write_text(good)
    agent_side = LocalKeyring(path, create=False)
    agent_side.rotate()
    assert await ingester_side.unwrap(await agent_side.wrap(DATA_KEY)) == DATA_KEY


async def test_keyring_that_disappeared_is_a_provider_error_not_a_data_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyring.json"
    keyring = LocalKeyring(path)
    path.unlink()
    with pytest.raises(KeyProviderError, match="disappeared"):
        await keyring.unwrap(WrappedKey("k-from-elsewhere", bytes(40)))


# ---- secret references and Vault -------------------------------------------------------
# Without a server: what happens before a request reaches Vault, and a Vault address where
# nothing listens. The Transit calls themselves run against a real server (OpenBao) in
# tests/integration/agent/test_vault_transit.py.


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


def test_a_vault_token_file_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    with pytest.raises(KeyProviderError, match=r"not a regular file \(a FIFO\)") as error:
        resolve_secret_reference(f"file:{fifo}")
    assert error.value.retriable is False
    with pytest.raises(KeyProviderError, match="not a regular file"):
        resolve_secret_reference("file:/dev/zero")
    big = tmp_path / "big"
    big.write_text("s." + "x" * SECRET_MAX_BYTES)
    with pytest.raises(KeyProviderError, match="larger than"):
        resolve_secret_reference(f"file:{big}")


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


# ---- the provider the configuration names ----------------------------------------------


def vault_keys(**fields: object) -> KeysConfig:
    vault = {"address": "http://127.0.0.1:8200", "token": "env:VAULT_TOKEN_FOR_TEST", **fields}
    return KeysConfig(provider="vault", vault=VaultConfig(**vault))  # type: ignore[arg-type]


def test_local_keys_open_the_keyring_file(tmp_path: Path) -> None:
    keys = KeysConfig(keyring=str(tmp_path / "keys" / "keyring.json"))
    with pytest.raises(KeyringError, match="no such file"):
        open_key_provider(keys, create=False)
    created = open_key_provider(keys)
    assert isinstance(created, LocalKeyring)
    assert created.path == tmp_path / "keys" / "keyring.json"
    reopened = open_key_provider(keys, create=False)
    assert reopened.active_key_id == created.active_key_id


def test_vault_keys_make_a_transit_provider_without_asking_vault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN_FOR_TEST", "s.test-token")
    # Nothing listens on the address: building the provider must not need Vault up (a
    # Vault that is down delays batches, it does not stop the agent).
    provider = open_key_provider(
        vault_keys(address=f"http://127.0.0.1:{closed_port()}", mount="ops/transit", key_name="k")
    )
    assert isinstance(provider, VaultTransitKeyProvider)
    assert provider.active_key_id == "vault:ops/transit/k"
    assert provider.transit_key_path == "ops/transit/keys/k"


def test_vault_keys_that_cannot_start_name_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_TOKEN_FOR_TEST", raising=False)
    with pytest.raises(KeyProviderError, match=r"^keys\.vault\.token: .*VAULT_TOKEN_FOR_TEST"):
        open_key_provider(vault_keys())
    with pytest.raises(KeyProviderError, match=r"^--vault-token: cannot read secret file"):
        open_key_provider(
            vault_keys(),
            token_reference=f"file:{tmp_path / 'absent'}",
            override_name="--vault-token",
        )
    monkeypatch.setenv("VAULT_TOKEN_FOR_TEST", "s.test-token")
    with pytest.raises(KeyProviderError, match=r"^keys\.vault\.ca_file: cannot read") as ca:
        open_key_provider(
            vault_keys(address="https://vault.test:8200", ca_file=str(tmp_path / "ca.pem"))
        )
    assert not ca.value.retriable


def test_plain_http_to_vault_off_loopback_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VAULT_TOKEN_FOR_TEST", "s.test-token")
    with caplog.at_level(logging.WARNING, logger="agent.keys"):
        for address in ("http://127.0.0.1:8200", "http://localhost:8200", "https://v.test"):
            open_key_provider(vault_keys(address=address))
        assert not caplog.records
        open_key_provider(vault_keys(address="http://vault.internal:8200"))
    assert [r.getMessage() for r in caplog.records] == [
        "keys.vault.address is http:// to vault.internal: the Vault token and every data key "
        "cross the network in clear; use https://"
    ]


def test_the_standalone_ingester_reads_the_vault_section_like_the_cli(tmp_path: Path) -> None:
    # `python -m agent.ingest` and `lineage-sidecar ingest` load the same section.
    path = tmp_path / "ingest.yaml"
    path.write_text(
        json.dumps(
            {
                "keys": {
                    "provider": "vault",
                    "vault": {"address": "https://v.test", "token": "env:T"},
                }
            }
        )
    )
    config = load_file(path, IngestProcessConfig)
    assert config.keys.provider == "vault"
    assert config.keys.vault is not None
    assert config.keys.vault.address == "https://v.test"
    path.write_text(json.dumps({"keys": {"provider": "vault"}}))
    with pytest.raises(ValueError, match=r"keys\.vault: required"):
        load_file(path, IngestProcessConfig)
