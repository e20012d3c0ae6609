"""VaultTransitKeyProvider against a real Transit server: OpenBao in dev mode.

OpenBao is the open fork of HashiCorp Vault; its Transit engine has the same paths,
ciphertext format and error messages. tests/vault.py starts the dev servers (on ephemeral
loopback ports, with a random root token and in-memory storage) from the binary that
`scripts/vault build` installs; without that binary these tests fail and say how to get it.
The tests share the session's server, each with its own Transit key; those that seal or
stop a server start their own.

The provider is used as the agent and ingester use it: through `seal_batch`/`open_batch`,
with a token that has only the agent's policy (update on the key's encrypt and decrypt
paths), read from a `file:` reference. What a user would notice is checked: batches open on
the other side and across a key rotation; an altered wrapped key is dead-lettered as
`tampered`; Vault sealed or down is a retriable `KeyProviderError` (the batch waits, it is
not dead-lettered); a refused token, a missing key or mount is a non-retriable one.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.crypto import DecryptError, decode_header, open_batch, seal_batch
from agent.keys import KeyProviderError, KeyUnwrapError, VaultTransitKeyProvider, WrappedKey
from tests.vault import (
    MOUNT,
    DevServer,
    agent_token,
    create_key,
    operator_token,
    start_dev_server,
    token_with,
)

TOPIC = "lineage.events"
DATA_KEY = bytes(range(32))


@pytest.fixture
def server(vault_server: DevServer) -> DevServer:
    return vault_server


@pytest.fixture
def own_server(vault_binary: Path, tmp_path: Path) -> Iterator[DevServer]:
    """A server for one test, which may seal or stop it."""
    running = start_dev_server(vault_binary, tmp_path / "vault")
    try:
        yield running
    finally:
        running.stop()


def provider(
    server: DevServer, key: str, token: str, token_file: Path, *, mount: str = MOUNT
) -> VaultTransitKeyProvider:
    token_file.write_text(token + "\n")
    return VaultTransitKeyProvider(
        url=server.url,
        key_name=key,
        token_reference=f"file:{token_file}",
        mount_point=mount,
        timeout_s=5,
    )


@pytest.fixture
def key(server: DevServer) -> str:
    return create_key(server)


@pytest.fixture
def agent(server: DevServer, key: str, tmp_path: Path) -> VaultTransitKeyProvider:
    """The agent's provider: the agent's least-privilege token, from a file."""
    return provider(server, key, agent_token(server, key), tmp_path / "agent-token")


@pytest.fixture
def ingester(server: DevServer, key: str, tmp_path: Path) -> VaultTransitKeyProvider:
    """The ingester's provider: another process's client and token, same Transit key."""
    return provider(server, key, agent_token(server, key), tmp_path / "ingester-token")


async def seal(plaintext: bytes, agent: VaultTransitKeyProvider, batch_id: str = "b-1") -> bytes:
    return await seal_batch(
        plaintext, topic=TOPIC, batch_id=batch_id, schema_version=1, provider=agent
    )


def altered(ciphertext: str) -> str:
    """The ciphertext with one base64 character of its body changed."""
    index = len("vault:v1:") + 10
    swapped = "B" if ciphertext[index] == "A" else "A"
    return ciphertext[:index] + swapped + ciphertext[index + 1 :]


# ---- what the pipeline relies on ------------------------------------------------------


async def test_data_key_round_trips_and_only_transit_holds_the_key(
    server: DevServer, key: str, agent: VaultTransitKeyProvider, ingester: VaultTransitKeyProvider
) -> None:
    wrapped = await agent.wrap(DATA_KEY)
    assert wrapped.key_id == agent.active_key_id == f"vault:{MOUNT}/{key}"
    assert wrapped.ciphertext.startswith(b"vault:v1:")
    assert DATA_KEY not in wrapped.ciphertext
    assert base64.b64encode(DATA_KEY) not in wrapped.ciphertext
    assert await agent.unwrap(wrapped) == DATA_KEY
    assert await ingester.unwrap(wrapped) == DATA_KEY
    # It is Transit's own ciphertext: Vault itself opens it to the same data key.
    reply = server.admin.secrets.transit.decrypt_data(
        name=key, ciphertext=wrapped.ciphertext.decode(), mount_point=MOUNT
    )
    assert base64.b64decode(reply["data"]["plaintext"]) == DATA_KEY
    assert (await agent.wrap(DATA_KEY)).ciphertext != wrapped.ciphertext


async def test_batch_sealed_by_the_agent_opens_at_the_ingester(
    server: DevServer,
    agent: VaultTransitKeyProvider,
    ingester: VaultTransitKeyProvider,
    tmp_path: Path,
) -> None:
    canary = f"canary-{secrets.token_hex(8)}".encode()
    blob = await seal(b'{"events": ["' + canary + b'"]}', agent, batch_id="b-42")
    header = decode_header(blob)
    assert header.key_id == agent.active_key_id
    assert header.wrapped_key.startswith(b"vault:v1:")
    assert canary not in blob

    opened = await open_batch(blob, topic=TOPIC, provider=ingester)
    assert opened.batch_id == "b-42"
    assert canary in opened.plaintext

    # An ingester configured with another Transit key does not know this batch's key.
    other_key = create_key(server)
    stranger = provider(server, other_key, server.root_token, tmp_path / "other-token")
    with pytest.raises(DecryptError) as unknown:
        await open_batch(blob, topic=TOPIC, provider=stranger)
    assert unknown.value.reason == "unknown_key"


async def test_rotation_keeps_old_batches_open_and_seals_new_ones_with_the_new_version(
    server: DevServer, key: str, agent: VaultTransitKeyProvider, ingester: VaultTransitKeyProvider
) -> None:
    before = await seal(b"sealed before the rotation", agent, batch_id="before")
    server.admin.secrets.transit.rotate_key(name=key, mount_point=MOUNT)
    after = await seal(b"sealed after the rotation", agent, batch_id="after")

    # One key id across rotations; the version lives in Vault's ciphertext.
    assert decode_header(before).key_id == decode_header(after).key_id == agent.active_key_id
    assert decode_header(before).wrapped_key.startswith(b"vault:v1:")
    assert decode_header(after).wrapped_key.startswith(b"vault:v2:")
    assert (await open_batch(before, topic=TOPIC, provider=ingester)).plaintext == (
        b"sealed before the rotation"
    )
    assert (await open_batch(after, topic=TOPIC, provider=ingester)).plaintext == (
        b"sealed after the rotation"
    )


async def test_a_retired_key_version_is_an_unknown_key_not_tampering(
    server: DevServer, key: str, agent: VaultTransitKeyProvider, ingester: VaultTransitKeyProvider
) -> None:
    old = await seal(b"sealed under v1", agent)
    server.admin.secrets.transit.rotate_key(name=key, mount_point=MOUNT)
    server.admin.secrets.transit.update_key_configuration(
        name=key, min_decryption_version=2, mount_point=MOUNT
    )
    with pytest.raises(DecryptError) as retired:
        await open_batch(old, topic=TOPIC, provider=ingester)
    assert retired.value.reason == "unknown_key"

    # A version the key never had reads the same way.
    wrapped = await agent.wrap(DATA_KEY)
    future = wrapped.ciphertext.replace(b"vault:v2:", b"vault:v9:")
    with pytest.raises(KeyUnwrapError) as unknown:
        await ingester.unwrap(WrappedKey(wrapped.key_id, future))
    assert unknown.value.reason == "unknown_key"


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(altered, id="one-character-changed"),
        pytest.param(lambda text: text[:-8], id="truncated"),
        pytest.param(lambda text: "vault:v1:!!not-base64!!", id="not-base64"),
        pytest.param(lambda text: "vault:v1:AAAA", id="too-short"),
        pytest.param(lambda text: text.replace("vault:", "bault:"), id="not-a-vault-ciphertext"),
    ],
)
async def test_altered_wrapped_key_is_tampered(
    agent: VaultTransitKeyProvider,
    ingester: VaultTransitKeyProvider,
    alter: Callable[[str], str],
) -> None:
    wrapped = await agent.wrap(DATA_KEY)
    bad = WrappedKey(wrapped.key_id, alter(wrapped.ciphertext.decode()).encode())
    with pytest.raises(KeyUnwrapError) as tampered:
        await ingester.unwrap(bad)
    assert tampered.value.reason == "tampered"


async def test_batch_with_an_altered_wrapped_key_is_dead_lettered_as_tampered(
    agent: VaultTransitKeyProvider, ingester: VaultTransitKeyProvider
) -> None:
    blob = await seal(b"payload", agent)
    wrapped = decode_header(blob).wrapped_key
    start = blob.index(wrapped)
    edited = blob[:start] + altered(wrapped.decode()).encode() + blob[start + len(wrapped) :]
    with pytest.raises(DecryptError) as tampered:
        await open_batch(edited, topic=TOPIC, provider=ingester)
    assert tampered.value.reason == "tampered"


# ---- Vault sealed or down: retry, never dead-letter -----------------------------------


async def test_sealed_vault_is_retriable_and_the_batch_opens_after_unseal(
    own_server: DevServer, tmp_path: Path
) -> None:
    key = create_key(own_server)
    agent = provider(own_server, key, agent_token(own_server, key), tmp_path / "token")
    blob = await seal(b"waits for the unseal", agent)

    own_server.admin.sys.seal()
    with pytest.raises(KeyProviderError) as on_wrap:
        await agent.wrap(DATA_KEY)
    assert on_wrap.value.retriable
    with pytest.raises(KeyProviderError) as on_open:  # not a DecryptError: no dead letter
        await open_batch(blob, topic=TOPIC, provider=agent)
    assert on_open.value.retriable

    own_server.admin.sys.submit_unseal_key(own_server.unseal_key())
    assert (await open_batch(blob, topic=TOPIC, provider=agent)).plaintext == (
        b"waits for the unseal"
    )


async def test_stopped_vault_is_a_retriable_provider_error(
    own_server: DevServer, tmp_path: Path
) -> None:
    key = create_key(own_server)
    agent = provider(own_server, key, agent_token(own_server, key), tmp_path / "token")
    blob = await seal(b"sealed while vault was up", agent)

    own_server.stop()
    with pytest.raises(KeyProviderError, match="unreachable") as on_wrap:
        await agent.wrap(DATA_KEY)
    assert on_wrap.value.retriable
    with pytest.raises(KeyProviderError, match="unreachable") as on_open:
        await open_batch(blob, topic=TOPIC, provider=agent)
    assert on_open.value.retriable


# ---- configuration faults: not retriable ----------------------------------------------


async def test_token_without_permission_is_a_non_retriable_provider_error(
    server: DevServer, key: str, agent: VaultTransitKeyProvider, tmp_path: Path
) -> None:
    blob = await seal(b"payload", agent)
    token_file = tmp_path / "encrypt-only-token"
    encrypt_only = provider(server, key, agent_token(server, key, ("encrypt",)), token_file)
    assert (await encrypt_only.wrap(DATA_KEY)).ciphertext.startswith(b"vault:v1:")
    with pytest.raises(KeyProviderError, match="refused") as no_decrypt:
        await open_batch(blob, topic=TOPIC, provider=encrypt_only)  # held, not dead-lettered
    assert not no_decrypt.value.retriable

    default_only = server.admin.auth.token.create(policies=["default"], ttl="1h")
    for token in (default_only["auth"]["client_token"], "not-a-token"):
        token_file.write_text(token)
        with pytest.raises(KeyProviderError, match="refused") as refused:
            await encrypt_only.wrap(DATA_KEY)
        assert not refused.value.retriable

    # The token file is read on every call: a renewed token works without a restart.
    token_file.write_text(agent_token(server, key))
    assert (await open_batch(blob, topic=TOPIC, provider=encrypt_only)).plaintext == b"payload"


async def test_missing_key_or_mount_is_a_non_retriable_provider_error(
    server: DevServer, agent: VaultTransitKeyProvider, tmp_path: Path
) -> None:
    wrapped = await agent.wrap(DATA_KEY)
    # The agent's policy has no `create`, so a wrap cannot make the missing key either.
    absent = f"absent-{secrets.token_hex(4)}"
    missing = provider(server, absent, agent_token(server, absent), tmp_path / "token")
    with pytest.raises(KeyProviderError) as on_wrap:
        await missing.wrap(DATA_KEY)
    assert not on_wrap.value.retriable
    with pytest.raises(KeyProviderError, match="not found") as on_unwrap:
        await missing.unwrap(WrappedKey(missing.active_key_id, wrapped.ciphertext))
    assert not on_unwrap.value.retriable

    no_mount = provider(server, absent, server.root_token, tmp_path / "root", mount="nowhere")
    with pytest.raises(KeyProviderError, match="no transit engine") as on_mount:
        await no_mount.wrap(DATA_KEY)
    assert not on_mount.value.retriable
    assert "\n" not in str(on_mount.value)


async def test_a_token_with_create_would_make_a_mistyped_key_silently(
    server: DevServer, tmp_path: Path
) -> None:
    # Why the documented policy grants only `update`: with `create` as well, encrypting
    # under a key name that does not exist makes that key, so a typo in keys.vault.key_name
    # would seal batches under a new key that no ingester is configured for.
    typo = f"lineage-typo-{secrets.token_hex(4)}"
    rules = [
        (f"{MOUNT}/{path}/{typo}", cap) for path in ("encrypt",) for cap in ("create", "update")
    ]
    careless = provider(server, typo, token_with(server, rules), tmp_path / "careless")
    assert (await careless.wrap(DATA_KEY)).ciphertext.startswith(b"vault:v1:")
    assert (
        server.admin.secrets.transit.read_key(name=typo, mount_point=MOUNT)["data"]["name"] == typo
    )


# ---- key administration: `lineage-sidecar keys list|rotate` ---------------------------


def test_versions_and_rotation_need_an_operator_token(
    server: DevServer, key: str, agent: VaultTransitKeyProvider, tmp_path: Path
) -> None:
    operator = provider(server, key, operator_token(server, key), tmp_path / "operator")
    first = operator.read_versions()
    assert (first.latest, first.min_decryption, list(first.created)) == (1, 1, [1])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first.created[1])

    assert operator.rotate() == 2
    assert operator.rotate() == 3
    server.admin.secrets.transit.update_key_configuration(
        name=key, min_decryption_version=2, mount_point=MOUNT
    )
    after = operator.read_versions()
    assert (after.latest, after.min_decryption, list(after.created)) == (3, 2, [2, 3])

    # The agent's token encrypts and decrypts, nothing else.
    for administer in (agent.read_versions, agent.rotate):
        with pytest.raises(KeyProviderError, match="refused") as refused:
            administer()
        assert not refused.value.retriable
        assert "\n" not in str(refused.value)
    assert operator.read_versions().latest == 3


def test_administering_a_missing_key_says_not_found(server: DevServer, tmp_path: Path) -> None:
    absent = f"absent-{secrets.token_hex(4)}"
    operator = provider(server, absent, operator_token(server, absent), tmp_path / "operator")
    for administer in (operator.read_versions, operator.rotate):
        with pytest.raises(KeyProviderError, match="not found") as missing:
            administer()
        assert not missing.value.retriable
