"""Users of the sidecar's own identity provider, and password checking.

Promises:
- users come from a `UserStore`; `FileUserStore` reads them from a YAML file, validated at
  load (unique names, well-formed bcrypt hashes). A PostgreSQL store can implement the same
  one-method Protocol later;
- bcrypt runs on a small dedicated thread pool, never on the event loop: it is slow on
  purpose, and the pool size also bounds how much CPU a flood of logins can take;
- an unknown user costs the same bcrypt work as a known one (a check against a dummy hash
  of the same cost), and a disabled user's password is still checked, so neither timing nor
  the answer tells an attacker which names exist;
- bcrypt only reads the first 72 bytes of a password. Rather than silently ignoring the
  rest, a password longer than 72 bytes never matches (its first 72 bytes are still hashed,
  for equal timing), and `hash_password` refuses to hash one. The HTTP layer refuses
  passwords over `MAX_PASSWORD_BYTES` outright.

Operators hash a password with `python -m proxy.authn.idp.users hash` (password on stdin).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import secrets
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal, Protocol

import bcrypt
import msgspec
import msgspec.yaml

BCRYPT_MAX_PASSWORD_BYTES = 72
# Requests with a longer password are refused before any hashing (400).
MAX_PASSWORD_BYTES = 1024
MAX_USERNAME_CHARS = 256
DEFAULT_COST = 12
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(?P<cost>\d\d)\$[./A-Za-z0-9]{53}")
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

CredentialCheck = Literal["ok", "unknown_user", "bad_password", "user_disabled"]


def valid_username(name: str) -> bool:
    """Printable, 1-256 characters, no surrounding whitespace (so no NUL, no newlines)."""
    return 0 < len(name) <= MAX_USERNAME_CHARS and name.isprintable() and name == name.strip()


class User(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One account. `password_hash` is a bcrypt hash ($2b$...)."""

    name: Annotated[str, msgspec.Meta(description="Login name (the token's `sub`).")]
    password_hash: Annotated[str, msgspec.Meta(description="bcrypt hash of the password.")]
    roles: Annotated[
        tuple[str, ...], msgspec.Meta(description="Roles put in the token's `roles` claim.")
    ] = ()
    disabled: Annotated[
        bool, msgspec.Meta(description="A disabled user can neither log in nor refresh.")
    ] = False

    def __post_init__(self) -> None:
        if not valid_username(self.name):
            raise ValueError(f"user name {self.name[:50]!r} is not printable or too long")
        if bcrypt_cost(self.password_hash) is None:
            raise ValueError(f"user {self.name!r}: password_hash is not a bcrypt hash")
        for role in self.roles:
            if not _ROLE.fullmatch(role):
                raise ValueError(f"user {self.name!r}: role {role[:50]!r} is not a plain name")

    def __repr__(self) -> str:
        # Keeps the hash out of logs.
        return f"User(name={self.name!r}, roles={self.roles!r}, disabled={self.disabled!r})"


class UsersFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    users: list[User]


def bcrypt_cost(password_hash: str) -> int | None:
    """The cost factor of a well-formed bcrypt hash, or None."""
    match = _BCRYPT_HASH.fullmatch(password_hash)
    if match is None:
        return None
    cost = int(match["cost"])
    return cost if 4 <= cost <= 31 else None


class UserStore(Protocol):
    """Where accounts live. `get` returns None for an unknown name."""

    async def get(self, name: str) -> User | None: ...


class FileUserStore:
    """Users held in memory, loaded from a YAML file (`users: [{name, password_hash, ...}]`)."""

    def __init__(self, users: Iterable[User]) -> None:
        self._users: dict[str, User] = {}
        for user in users:
            if user.name in self._users:
                raise ValueError(f"user {user.name!r} is listed twice")
            self._users[user.name] = user
        costs = [bcrypt_cost(user.password_hash) or DEFAULT_COST for user in self._users.values()]
        # The dummy hash uses the highest cost in the file, so an unknown name is never
        # cheaper to check than a real one.
        self.cost = max(costs, default=DEFAULT_COST)

    @classmethod
    def load(cls, path: str | Path) -> FileUserStore:
        """Read and validate the file; ValueError names the file and the problem."""
        try:
            document = msgspec.yaml.decode(Path(path).read_bytes(), type=UsersFile)
            return cls(document.users)
        except (OSError, msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise ValueError(f"users_file {str(path)!r}: {exc}") from None

    async def get(self, name: str) -> User | None:
        return self._users.get(name)

    def __len__(self) -> int:
        return len(self._users)


class VerifierBusy(Exception):
    """Too many password checks are waiting; the client may retry shortly (503)."""


class PasswordVerifier:
    """Checks a password against a user (or against a dummy hash when there is none)."""

    def __init__(
        self,
        *,
        cost: int = DEFAULT_COST,
        threads: int = 2,
        max_pending: int = 64,
        checkpw: Callable[[bytes, bytes], bool] = bcrypt.checkpw,
    ) -> None:
        self._checkpw = checkpw
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bcrypt")
        # Checks running or queued; beyond max_pending a flood is refused, not queued.
        self._pending = 0
        self._max_pending = max_pending
        # A hash of a random password nobody knows: checking against it costs what a real
        # check costs and never succeeds.
        self.dummy_hash = bcrypt.hashpw(secrets.token_bytes(32), bcrypt.gensalt(rounds=cost))

    async def check(self, user: User | None, password: str) -> CredentialCheck:
        candidate = password.encode("utf-8", "surrogatepass")
        target = user.password_hash.encode("ascii") if user is not None else self.dummy_hash
        if self._pending >= self._max_pending:
            raise VerifierBusy(f"{self._pending} password checks already waiting")
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            matched = await loop.run_in_executor(
                self._pool, self._checkpw, candidate[:BCRYPT_MAX_PASSWORD_BYTES], target
            )
        finally:
            self._pending -= 1
        if user is None:
            return "unknown_user"
        if not matched or len(candidate) > BCRYPT_MAX_PASSWORD_BYTES:
            return "bad_password"
        return "user_disabled" if user.disabled else "ok"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def hash_password(password: str, *, rounds: int = DEFAULT_COST) -> str:
    """A bcrypt hash for the users file. Refuses what bcrypt would silently truncate."""
    encoded = password.encode("utf-8")
    if not encoded:
        raise ValueError("the password is empty")
    if len(encoded) > BCRYPT_MAX_PASSWORD_BYTES:
        raise ValueError(
            f"the password is {len(encoded)} bytes; bcrypt uses only the first "
            f"{BCRYPT_MAX_PASSWORD_BYTES}, so choose a shorter one"
        )
    if not 4 <= rounds <= 31:
        raise ValueError("rounds must be between 4 and 31")
    return bcrypt.hashpw(encoded, bcrypt.gensalt(rounds=rounds)).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.authn.idp.users",
        description="Tools for the identity provider's users file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    hash_command = commands.add_parser(
        "hash", help="print the bcrypt hash of a password read from standard input"
    )
    hash_command.add_argument("--rounds", type=int, default=DEFAULT_COST, help="bcrypt cost")
    arguments = parser.parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    try:
        print(hash_password(password, rounds=arguments.rounds))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
