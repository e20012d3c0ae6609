"""Key providers: where the key-encryption keys (KEKs) live and how data keys are wrapped.

`agent.crypto` makes a fresh data key per batch and asks a `KeyProvider` to wrap it; the
wrapped key travels in the batch header, and only a holder of the KEK can unwrap it. Two
providers:

- `LocalKeyring`: KEKs in a JSON file, mode 0600, several keys with one active. `rotate()`
  adds a new active key and keeps the old ones, so batches sealed before still open; a
  process using the keyring sees a rotation made by another (`wrap` and, for an unknown
  key id, `unwrap` look at the file again when it changed). A file that group or others
  may read or write is refused. Wrapping is AES key wrap (RFC 3394, `cryptography`'s
  `aes_key_wrap`) rather than AES-GCM: it was made for wrapping keys, needs no nonce (so
  the number of wraps under one KEK has no birthday bound, unlike GCM's 2**32 random
  nonces), and its integrity check rejects a wrapped key that was altered or presented to
  the wrong KEK.
- `VaultTransitKeyProvider`: HashiCorp Vault Transit encrypts and decrypts the data key
  (`POST /transit/encrypt/<key>`, `/decrypt/<key>` through hvac); the KEK never leaves
  Vault, and Vault's own key versions (`vault:v3:...`) handle rotation.

`open_key_provider` builds the one the `keys` configuration section names; the agent, the
ingester and `lineage-sidecar keys` all get theirs from it.

Errors say whose fault they are: `KeyUnwrapError` means the wrapped key itself is bad
(unknown key id, altered), so retrying cannot help; `KeyProviderError` means the provider
could not be asked (Vault down, token refused, keyring unreadable), so the data is fine
and must not be dead-lettered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from agent.config import (
    SECRET_MAX_BYTES,
    FileNotPrivate,
    FileRefused,
    FileTooLarge,
    read_regular_file,
)

if TYPE_CHECKING:
    from agent.config import KeysConfig

log = logging.getLogger(__name__)

DATA_KEY_BYTES = 32
KEK_BYTES = 32
KEYRING_FORMAT_VERSION = 1
_MAX_KEY_ID_CHARS = 128


class WrappedKey(NamedTuple):
    """A data key encrypted under the KEK named by key_id."""

    key_id: str
    ciphertext: bytes


class KeyProvider(Protocol):
    """Wraps and unwraps per-batch data keys with a key-encryption key."""

    @property
    def active_key_id(self) -> str: ...

    async def wrap(self, data_key: bytes) -> WrappedKey: ...

    async def unwrap(self, wrapped: WrappedKey) -> bytes: ...


class KeyUnwrapError(Exception):
    """The wrapped key cannot be unwrapped: the data is at fault, not the provider."""

    def __init__(self, reason: Literal["unknown_key", "tampered"], message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyProviderError(Exception):
    """The key provider could not do its job; the data may be fine. Retry or fix config."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class KeyringError(KeyProviderError):
    """The keyring file is missing, unsafe or malformed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


def _check_data_key(data_key: bytes) -> None:
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes, got {len(data_key)}")


# ---- local keyring ---------------------------------------------------------------------


def new_key_id() -> str:
    """Sortable by creation time, unique without coordination."""
    return time.strftime("k%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def _parse_keyring(raw: bytes, path: Path) -> tuple[dict[str, bytes], dict[str, str], str]:
    """Keyring file -> (key id -> KEK, key id -> created, active id). Pure; KeyringError."""
    try:
        document = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        raise KeyringError(f"keyring {path}: not JSON: {exc}") from None
    except RecursionError:
        raise KeyringError(f"keyring {path}: not a keyring (JSON nested too deeply)") from None
    if not isinstance(document, dict):
        raise KeyringError(f"keyring {path}: expected a JSON object")
    # `type(...) is int`: JSON true and 1.0 compare equal to 1 but are not a format number.
    if type(document.get("format")) is not int or document["format"] != KEYRING_FORMAT_VERSION:
        raise KeyringError(
            f"keyring {path}: unknown format {document.get('format')!r} "
            f"(this version reads {KEYRING_FORMAT_VERSION})"
        )
    entries, active = document.get("keys"), document.get("active")
    if not isinstance(entries, list) or not entries:
        raise KeyringError(f"keyring {path}: 'keys' must be a non-empty list")
    keys: dict[str, bytes] = {}
    created: dict[str, str] = {}
    for index, entry in enumerate(entries):
        key_id = entry.get("id") if isinstance(entry, dict) else None
        material = entry.get("material") if isinstance(entry, dict) else None
        if not isinstance(key_id, str) or not key_id or len(key_id) > _MAX_KEY_ID_CHARS:
            raise KeyringError(f"keyring {path}: keys[{index}].id must be a short string")
        if not key_id.isascii() or not key_id.isprintable():
            raise KeyringError(f"keyring {path}: keys[{index}].id must be printable ASCII")
        if key_id in keys:
            raise KeyringError(f"keyring {path}: key id {key_id!r} appears twice")
        try:
            kek = base64.b64decode(material, validate=True) if isinstance(material, str) else b""
        except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
            kek = b""
        if len(kek) != KEK_BYTES:
            raise KeyringError(
                f"keyring {path}: keys[{index}].material must be {KEK_BYTES} bytes in base64"
            )
        when = entry.get("created", "")
        if not isinstance(when, str):
            raise KeyringError(f"keyring {path}: keys[{index}].created must be a string")
        keys[key_id] = kek
        created[key_id] = when
    if not isinstance(active, str) or active not in keys:
        raise KeyringError(f"keyring {path}: 'active' must name one of the keys")
    return keys, created, active


def _render_keyring(keys: dict[str, bytes], created: dict[str, str], active: str) -> bytes:
    document: dict[str, Any] = {
        "format": KEYRING_FORMAT_VERSION,
        "active": active,
        "keys": [
            {
                "id": key_id,
                "created": created.get(key_id, ""),
                "material": base64.b64encode(kek).decode("ascii"),
            }
            for key_id, kek in keys.items()
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode()


# A keyring of thousands of keys is a few hundred KB.
KEYRING_MAX_BYTES = 1 << 20


def _read_private_file(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others can access."""
    try:
        return read_regular_file(path, KEYRING_MAX_BYTES, private=True)
    except FileNotFoundError:
        raise
    except FileNotPrivate as exc:
        raise KeyringError(f"keyring {path}: {exc}; run: chmod 600 {path}") from None
    except FileTooLarge:
        raise KeyringError(f"keyring {path}: larger than 1 MiB") from None
    except FileRefused as exc:
        raise KeyringError(f"keyring {path}: {exc}") from None
    except OSError as exc:
        raise KeyringError(f"keyring {path}: cannot open: {exc.strerror}") from None


def _write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace path with data, mode 0600 from the first byte."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(temp, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class LocalKeyring:
    """KEKs from a local keyring file; implements `KeyProvider`."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        """Load the keyring, or create it with one fresh key when absent and create is set."""
        self.path = Path(path)
        self._keys: dict[str, bytes] = {}
        self._created: dict[str, str] = {}
        self._active = ""
        self._loaded_stamp: tuple[int, int] | None = None
        with self._locked():
            try:
                self._load()
            except FileNotFoundError:
                if not create:
                    raise KeyringError(f"keyring {self.path}: no such file") from None
                self.path.parent.mkdir(parents=True, exist_ok=True)
                key_id = new_key_id()
                self._store({key_id: secrets.token_bytes(KEK_BYTES)}, key_id)

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    async def wrap(self, data_key: bytes) -> WrappedKey:
        _check_data_key(data_key)
        # `lineage-sidecar keys rotate` runs in another process: a running agent seals
        # under the key the file names active now, not the one it started with (a stat
        # per batch part; a keyring edited into a bad state is a KeyringError, retried).
        self._reload_if_changed()
        return WrappedKey(self._active, aes_key_wrap(self._keys[self._active], data_key))

    async def unwrap(self, wrapped: WrappedKey) -> bytes:
        kek = self._keys.get(wrapped.key_id)
        if kek is None:
            # Another process (the agent) may have rotated since we loaded: look again.
            self._reload_if_changed()
            kek = self._keys.get(wrapped.key_id)
        if kek is None:
            raise KeyUnwrapError(
                "unknown_key", f"key id {wrapped.key_id!r} is not in keyring {self.path}"
            )
        try:
            data_key = aes_key_unwrap(kek, wrapped.ciphertext)
        except (InvalidUnwrap, ValueError):
            raise KeyUnwrapError(
                "tampered", f"wrapped data key does not unwrap under {wrapped.key_id!r}"
            ) from None
        if len(data_key) != DATA_KEY_BYTES:
            raise KeyUnwrapError("tampered", "unwrapped data key has the wrong length")
        return data_key

    def rotate(self) -> str:
        """Add a new active KEK, keep the old ones, write the file atomically; new id."""
        with self._locked():
            self._load()  # start from the file: another process may have rotated
            key_id = new_key_id()
            while key_id in self._keys:
                key_id = new_key_id()
            self._store({**self._keys, key_id: secrets.token_bytes(KEK_BYTES)}, key_id)
        return key_id

    # -- file IO --

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize creation and rotation between processes sharing the keyring."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_mtime_ns)

    def _load(self) -> None:
        stamp = self._stamp()
        raw = _read_private_file(self.path)
        keys, created, active = _parse_keyring(raw, self.path)
        self._keys, self._active, self._created = keys, active, created
        self._loaded_stamp = stamp

    def _reload_if_changed(self) -> None:
        if self._stamp() == self._loaded_stamp:
            return
        try:
            self._load()
        except FileNotFoundError:
            raise KeyringError(f"keyring {self.path}: disappeared") from None

    def _store(self, keys: dict[str, bytes], active: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        created = {**self._created, **{k: now for k in keys if k not in self._created}}
        _write_private_file(self.path, _render_keyring(keys, created, active))
        self._keys, self._active, self._created = keys, active, created
        self._loaded_stamp = self._stamp()


# ---- Vault Transit ---------------------------------------------------------------------


def resolve_secret_reference(reference: str) -> str:
    """`file:/path` (re-read on every call, so a renewed token is picked up) or `env:NAME`."""
    if reference.startswith("file:"):
        path = reference[len("file:") :]
        try:
            return read_regular_file(path, SECRET_MAX_BYTES).decode("utf-8").strip()
        except OSError as exc:
            raise KeyProviderError(
                f"cannot read secret file {path!r}: {exc.strerror}", retriable=True
            ) from None
        except (FileRefused, UnicodeDecodeError) as exc:
            # Not a token a renewal will fix by itself: an operator must look.
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise KeyProviderError(f"secret file {path!r}: {reason}", retriable=False) from None
    if reference.startswith("env:"):
        name = reference[len("env:") :]
        value = os.environ.get(name)
        if not value:
            raise KeyProviderError(f"environment variable {name!r} is not set", retriable=False)
        return value
    raise ValueError("a secret reference must be file:PATH or env:NAME")


class TransitKeyVersions(NamedTuple):
    """A Transit key's versions: the latest encrypts, those from min_decryption decrypt."""

    latest: int
    min_decryption: int
    created: dict[int, str]  # version -> creation time (UTC, ISO 8601)


def _vault_reason(exc: Exception) -> str:
    """Vault's error text on one line: its multi-error form spans several lines."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\d+ errors? occurred: \* ", "", text)
    return text.replace(" , on ", ", on ")


def _created_at(value: Any) -> str:
    """A Transit key version's creation time: unix seconds, or a map with creation_time."""
    if isinstance(value, int):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if isinstance(value, dict):
        return str(value.get("creation_time", ""))
    return ""


class VaultTransitKeyProvider:
    """Data keys wrapped by a Vault Transit key; implements `KeyProvider`.

    Tested against a real Transit server (OpenBao 2.7 in dev mode, same API as Vault) by
    tests/integration/agent/test_vault_transit.py; calls hvac 2.x
    `secrets.transit.encrypt_data` / `decrypt_data`. hvac is synchronous, so every call
    runs in a worker thread.
    """

    def __init__(
        self,
        *,
        url: str,
        key_name: str,
        token_reference: str,
        mount_point: str = "transit",
        namespace: str | None = None,
        verify: bool | str = True,
        timeout_s: float = 5.0,
    ) -> None:
        import hvac  # only deployments that use Vault pay for importing it

        if not key_name or "/" in key_name:
            raise ValueError("vault key_name must be a plain Transit key name")
        resolve_secret_reference(token_reference)  # fail at start on a bad reference
        self._key_name = key_name
        self._mount_point = mount_point
        self._token_reference = token_reference
        self._client: Any = hvac.Client(
            url=url, namespace=namespace, verify=verify, timeout=timeout_s
        )
        self._key_id = f"vault:{mount_point}/{key_name}"

    @property
    def active_key_id(self) -> str:
        # Vault keeps the key version inside its ciphertext ("vault:v3:..."), so one id
        # names the Transit key across its rotations.
        return self._key_id

    @property
    def transit_key_path(self) -> str:
        """Where Vault keeps the key, as its policies name it: `<mount>/keys/<key>`."""
        return f"{self._mount_point}/keys/{self._key_name}"

    async def wrap(self, data_key: bytes) -> WrappedKey:
        _check_data_key(data_key)
        ciphertext = await asyncio.to_thread(self._encrypt, data_key)
        return WrappedKey(self._key_id, ciphertext.encode("ascii"))

    async def unwrap(self, wrapped: WrappedKey) -> bytes:
        if wrapped.key_id != self._key_id:
            raise KeyUnwrapError(
                "unknown_key", f"key id {wrapped.key_id!r} is not this provider's {self._key_id!r}"
            )
        try:
            ciphertext = wrapped.ciphertext.decode("ascii")
        except UnicodeDecodeError:
            ciphertext = ""
        if not ciphertext.startswith("vault:v"):
            raise KeyUnwrapError("tampered", "wrapped data key is not a Vault ciphertext")
        return await asyncio.to_thread(self._decrypt, ciphertext)

    def _call(
        self, operation: str, *, data_optional: bool = False, **arguments: Any
    ) -> dict[str, Any]:
        import hvac.exceptions

        self._client.token = resolve_secret_reference(self._token_reference)
        method = getattr(self._client.secrets.transit, operation)
        try:
            response = method(name=self._key_name, mount_point=self._mount_point, **arguments)
        except hvac.exceptions.InvalidRequest:
            raise  # the caller decides: for decrypt it means a bad ciphertext
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
            raise KeyProviderError(
                f"vault refused transit {operation} on {self._key_id}: {_vault_reason(exc)}",
                retriable=False,
            ) from None
        except hvac.exceptions.InvalidPath as exc:
            # 404: no Transit engine mounted there, or (reading a key) no such key.
            # Configuration either way, so retrying cannot help.
            reason = _vault_reason(exc)
            if "no handler for route" in reason:
                message = f"vault has no transit engine at {self._mount_point!r}: {reason}"
            else:
                message = f"vault transit key {self._key_id} not found: {reason}"
            raise KeyProviderError(message, retriable=False) from None
        except hvac.exceptions.VaultError as exc:
            raise KeyProviderError(
                f"vault transit {operation} on {self._key_id} failed: {_vault_reason(exc)}",
                retriable=True,
            ) from None
        except OSError as exc:  # requests' connection errors and timeouts are OSErrors
            raise KeyProviderError(
                f"vault unreachable for transit {operation}: {exc}", retriable=True
            ) from None
        data = response.get("data") if isinstance(response, dict) else None
        if isinstance(data, dict):
            return data
        if data_optional:  # e.g. a 204 from an older Vault's rotate
            return {}
        raise KeyProviderError(f"vault transit {operation}: unexpected reply", retriable=True)

    # -- key administration, for `lineage-sidecar keys` (an operator's token) --

    def read_versions(self) -> TransitKeyVersions:
        """The key's versions; needs `read` on `<mount>/keys/<key>`."""
        data = self._call("read_key")
        raw = data.get("keys")
        latest, min_decryption = data.get("latest_version"), data.get("min_decryption_version")
        if not isinstance(raw, dict) or not isinstance(latest, int):
            raise KeyProviderError("vault transit read_key: unexpected reply", retriable=True)
        created = {int(version): _created_at(value) for version, value in raw.items()}
        first = min_decryption if isinstance(min_decryption, int) else 1
        return TransitKeyVersions(latest, first, dict(sorted(created.items())))

    def rotate(self) -> int:
        """Add a new key version, which encrypts from now on; needs `update` on
        `<mount>/keys/<key>/rotate`. Returns the new version."""
        import hvac.exceptions

        try:
            data = self._call("rotate_key", data_optional=True)
        except hvac.exceptions.InvalidRequest as exc:
            reason = _vault_reason(exc)
            if "not found" in reason:
                message = f"vault transit key {self._key_id} not found: {reason}"
            else:
                message = f"vault transit rotate_key on {self._key_id} rejected: {reason}"
            raise KeyProviderError(message, retriable=False) from None
        latest = data.get("latest_version")
        return latest if isinstance(latest, int) else self.read_versions().latest

    def _encrypt(self, data_key: bytes) -> str:
        import hvac.exceptions

        try:
            data = self._call("encrypt_data", plaintext=base64.b64encode(data_key).decode())
        except hvac.exceptions.InvalidRequest as exc:
            raise KeyProviderError(
                f"vault transit encrypt on {self._key_id} rejected: {_vault_reason(exc)}",
                retriable=False,
            ) from None
        ciphertext = data.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext.startswith("vault:v"):
            raise KeyProviderError("vault transit encrypt: no ciphertext in reply", retriable=True)
        return ciphertext

    def _decrypt(self, ciphertext: str) -> bytes:
        import hvac.exceptions

        try:
            data = self._call("decrypt_data", ciphertext=ciphertext)
        except hvac.exceptions.InvalidRequest as exc:
            # Vault answers 400 both for a bad ciphertext and for a missing key; only
            # the message tells them apart. A missing key is configuration, not data.
            reason = _vault_reason(exc)
            if "not found" in reason:
                raise KeyProviderError(
                    f"vault transit key {self._key_id} not found: {reason}", retriable=False
                ) from None
            # The ciphertext names a key version the key no longer opens (below its
            # min_decryption_version) or never had: like a keyring without the key id.
            if "too old" in reason or "too new" in reason:
                raise KeyUnwrapError(
                    "unknown_key", f"vault transit key {self._key_id} cannot open it: {reason}"
                ) from None
            raise KeyUnwrapError(
                "tampered", f"vault transit cannot decrypt this data key under {self._key_id}"
            ) from None
        try:
            data_key = base64.b64decode(data.get("plaintext", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            data_key = b""
        if len(data_key) != DATA_KEY_BYTES:
            raise KeyUnwrapError("tampered", "vault returned a data key of the wrong length")
        return data_key


# ---- from configuration ----------------------------------------------------------------


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_key_provider(
    config: KeysConfig,
    *,
    create: bool = True,
    token_reference: str | None = None,
    override_name: str = "the token reference",
) -> LocalKeyring | VaultTransitKeyProvider:
    """The provider the (checked) `keys` section names.

    create: make a missing keyring (the agent may; `keys list` must not). token_reference:
    another Vault token than `keys.vault.token` (an operator's, for `keys rotate`), named
    `override_name` in errors. Raises KeyProviderError naming the field when the provider
    cannot start; Vault is not asked anything yet, so a Vault that is down delays batches
    instead of stopping the process.
    """
    if config.provider == "local":
        return LocalKeyring(config.keyring, create=create)
    vault = config.vault
    if vault is None:
        raise KeyProviderError("keys.vault: required when keys.provider is vault", retriable=False)
    address = urlsplit(vault.address)
    if address.scheme == "http" and not _loopback(address.hostname or ""):
        log.warning(
            "keys.vault.address is http:// to %s: the Vault token and every data key cross "
            "the network in clear; use https://",
            address.hostname,
        )
    if vault.ca_file is not None and not os.access(vault.ca_file, os.R_OK):
        raise KeyProviderError(f"keys.vault.ca_file: cannot read {vault.ca_file}", retriable=False)
    field = override_name if token_reference is not None else "keys.vault.token"
    try:
        return VaultTransitKeyProvider(
            url=vault.address,
            key_name=vault.key_name,
            token_reference=token_reference or vault.token,
            mount_point=vault.mount,
            namespace=vault.namespace,
            verify=vault.ca_file if vault.ca_file is not None else vault.tls_verify,
            timeout_s=vault.timeout,
        )
    except KeyProviderError as exc:
        raise KeyProviderError(f"{field}: {exc}", retriable=exc.retriable) from None
    except ValueError as exc:
        raise KeyProviderError(f"{field}: {exc}", retriable=False) from None
