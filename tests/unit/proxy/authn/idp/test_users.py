"""Users file, password checks (constant work for unknown users) and the hashing helper."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import bcrypt
import pytest

from proxy.authn.idp import users as users_module
from proxy.authn.idp.users import (
    FileUserStore,
    PasswordVerifier,
    User,
    VerifierBusy,
    bcrypt_cost,
    hash_password,
    valid_username,
)

ALICE_HASH = hash_password("correct horse", rounds=4)


def users_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    return path


class RecordingCheck:
    """The real bcrypt.checkpw, remembering which hashes it was asked about."""

    def __init__(self) -> None:
        self.hashes: list[bytes] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.hashes.append(hashed)
        return bcrypt.checkpw(password, hashed)


async def test_file_store_loads_users_with_roles_and_disabled_flag(tmp_path: Path) -> None:
    path = users_yaml(
        tmp_path,
        f"users:\n"
        f"  - {{name: alice, password_hash: '{ALICE_HASH}', roles: [analyst, admin]}}\n"
        f"  - {{name: bob, password_hash: '{ALICE_HASH}', disabled: true}}\n",
    )
    store = FileUserStore.load(path)
    alice = await store.get("alice")
    bob = await store.get("bob")
    assert alice is not None
    assert alice.roles == ("analyst", "admin")
    assert not alice.disabled
    assert bob is not None
    assert bob.disabled
    assert await store.get("carol") is None
    assert store.cost == 4
    assert ALICE_HASH not in repr(alice)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users:\n  - {name: a, password_hash: 'plain'}\n", "not a bcrypt hash"),
        (f"users:\n  - {{name: a, password_hash: '{ALICE_HASH}', rolez: []}}\n", "rolez"),
        (f"users:\n  - {{name: '', password_hash: '{ALICE_HASH}'}}\n", "not printable"),
        ('users:\n  - {name: "a\\0b", password_hash: \'' + ALICE_HASH + "'}\n", "not printable"),
        (f"users:\n  - {{name: a, password_hash: '{ALICE_HASH}', roles: ['x y']}}\n", "role"),
        ("users: [{name: a}]\n", "password_hash"),
        ("users: {\n", "users.yaml"),
    ],
)
def test_bad_users_files_are_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FileUserStore.load(users_yaml(tmp_path, text))


def test_a_name_listed_twice_is_refused(tmp_path: Path) -> None:
    text = f"users:\n  - {{name: a, password_hash: '{ALICE_HASH}'}}\n" * 1
    text += f"  - {{name: a, password_hash: '{ALICE_HASH}'}}\n"
    with pytest.raises(ValueError, match="twice"):
        FileUserStore.load(users_yaml(tmp_path, text))


def test_a_missing_users_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.yaml"):
        FileUserStore.load(tmp_path / "nope.yaml")


async def test_password_check_outcomes() -> None:
    check = RecordingCheck()
    verifier = PasswordVerifier(cost=4, checkpw=check)
    alice = User(name="alice", password_hash=ALICE_HASH)
    disabled = User(name="bob", password_hash=ALICE_HASH, disabled=True)
    try:
        assert await verifier.check(alice, "correct horse") == "ok"
        assert await verifier.check(alice, "wrong horse") == "bad_password"
        # A disabled user's password is still checked, and its answer does not leak.
        assert await verifier.check(disabled, "correct horse") == "user_disabled"
        assert await verifier.check(disabled, "wrong horse") == "bad_password"
    finally:
        verifier.close()
    assert check.hashes == [ALICE_HASH.encode()] * 4


async def test_an_unknown_user_costs_a_check_against_the_dummy_hash() -> None:
    check = RecordingCheck()
    verifier = PasswordVerifier(cost=4, checkpw=check)
    try:
        assert await verifier.check(None, "correct horse") == "unknown_user"
    finally:
        verifier.close()
    assert check.hashes == [verifier.dummy_hash]
    assert bcrypt_cost(verifier.dummy_hash.decode()) == 4


async def test_a_password_longer_than_72_bytes_never_matches_its_prefix() -> None:
    prefix = "p" * 72
    user = User(name="alice", password_hash=hash_password(prefix, rounds=4))
    verifier = PasswordVerifier(cost=4)
    try:
        assert await verifier.check(user, prefix) == "ok"
        assert await verifier.check(user, prefix + "anything") == "bad_password"
    finally:
        verifier.close()


def test_hash_password_refuses_what_bcrypt_would_truncate() -> None:
    with pytest.raises(ValueError, match="72"):
        hash_password("é" * 37)
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
    assert bcrypt.checkpw(b"secret", hash_password("secret", rounds=4).encode())


def test_hash_command_reads_the_password_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    assert users_module.main(["hash", "--rounds", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    assert bcrypt.checkpw(b"s3cret pass", printed.encode())
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 100 + "\n"))
    assert users_module.main(["hash", "--rounds", "4"]) == 2
    assert "72" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("alice", True),
        ("a.b-c@d", True),
        ("ä", True),
        ("", False),
        ("a\x00", False),
        (" alice", False),
        ("a\nb", False),
        ("x" * 257, False),
        ("x" * 256, True),
    ],
)
def test_username_shape(name: str, valid: bool) -> None:
    assert valid_username(name) is valid


async def test_a_flood_of_checks_is_refused_rather_than_queued() -> None:
    release = threading.Event()

    def held_check(password: bytes, hashed: bytes) -> bool:
        release.wait(10)  # held until the test has made its second attempt
        return bcrypt.checkpw(password, hashed)

    verifier = PasswordVerifier(cost=4, threads=1, max_pending=1, checkpw=held_check)
    try:
        first = asyncio.create_task(verifier.check(None, "guess"))
        await asyncio.sleep(0)
        with pytest.raises(VerifierBusy):
            await verifier.check(None, "guess")
        release.set()
        assert await first == "unknown_user"
        # Once the queue drains, checks are admitted again.
        assert await verifier.check(None, "guess") == "unknown_user"
    finally:
        release.set()
        verifier.close()
