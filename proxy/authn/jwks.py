"""Issuer keys: JWKS parsing (pure) and `JwksCache`, the only part of JWT checking that does IO.

`JwksCache` promises:
- keys come only from configuration: a JWKS URL, the `jwks_uri` of an OIDC discovery
  document whose `issuer` matches, a local key file, or a shared secret. Only https URLs
  unless `allow_insecure_http`; redirects are not followed; documents are size-capped and
  key sets count-capped. Symmetric (`oct`) keys and keys published with private members
  are never taken from a JWKS;
- a token naming an unknown kid triggers at most one fetch per issuer per
  `jwks_min_refresh_interval`; concurrent misses share the one in-flight fetch, so random
  kids from an attacker cannot cause a fetch storm;
- cached keys keep working while the identity provider is down; a token whose key is not
  cached while the last fetch failed gets a 503 AuthError (cannot decide: fail closed);
- key sets are refreshed in the background every `jwks_refresh_interval`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from proxy.authn.jwt import (
    MAX_KID_CHARS,
    IssuerConfig,
    IssuerKeys,
    KeyNotFound,
    TrustedIssuers,
    VerificationKey,
    check_key_url,
    strict_json_object,
    validate,
)
from proxy.authn.principal import AuthError, Principal

log = logging.getLogger(__name__)

# JWK members that only a private or symmetric key has. A JWKS that publishes them has
# leaked a signing key, so such an entry is refused rather than trusted.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_JWK_LOADERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}


_EC_COORDINATE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66}


def _full_width_ec_coordinates(entry: dict[str, Any]) -> dict[str, Any]:
    # Some issuers (authlib.jose among them, for about 1 key in 128) drop leading zero
    # bytes from x/y, which RFC 7518 6.2.1.2 forbids and pyjwt refuses. The integer is the
    # same and the point is still checked to lie on the curve, so restoring the width is
    # safe and keeps such issuers working whatever key they happen to generate.
    size = _EC_COORDINATE_BYTES.get(str(entry.get("crv")))
    if size is None:
        return entry
    fixed = dict(entry)
    for name in ("x", "y"):
        value = entry.get(name)
        if isinstance(value, str) and value.isascii():
            try:
                raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue  # left for pyjwt to refuse
            if len(raw) < size:
                fixed[name] = base64.urlsafe_b64encode(raw.rjust(size, b"\0")).rstrip(b"=").decode()
    return fixed


def jwk_to_key(entry: object) -> VerificationKey:
    """One JWK (a parsed JSON object) as a verification key, or ValueError saying why not."""
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {use!r}, not 'sig'")
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not include verify")
    kid = entry.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS):
        raise ValueError("kid is not a short string")
    alg = entry.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("alg is not a string")
    if _PRIVATE_MEMBERS & entry.keys():
        raise ValueError("carries private or symmetric key material")
    loader = _JWK_LOADERS.get(str(entry.get("kty")))
    if loader is None:
        raise ValueError(f"kty {str(entry.get('kty'))[:20]!r} is not supported")
    if entry.get("kty") == "EC":
        entry = _full_width_ec_coordinates(entry)
    try:
        public_key = loader(entry)
    except (pyjwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"unusable key: {exc}") from None
    return VerificationKey.from_public_key(public_key, kid=kid, alg=alg)


def parse_jwks(
    document: bytes, *, allowed_algorithms: Collection[str], max_keys: int
) -> tuple[IssuerKeys, tuple[str, ...]]:
    """The usable signing keys of a JWKS document, and why the other entries were skipped.

    Raises ValueError when the document is not a JWKS, has more than `max_keys` entries,
    or holds no usable key; the caller then keeps the key set it had.
    """
    jwks = strict_json_object(document)
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise ValueError("JWKS has no 'keys' list")
    if len(entries) > max_keys:
        raise ValueError(f"JWKS has {len(entries)} keys, more than the limit of {max_keys}")
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        try:
            key = jwk_to_key(entry)
        except ValueError as exc:
            skipped.append(f"key {index}: {exc}")
            continue
        if key.algorithms.isdisjoint(allowed_algorithms):
            skipped.append(f"key {index}: algorithms {sorted(key.algorithms)} not allowed")
            continue
        keys.append(key)
    if not keys:
        raise ValueError("JWKS holds no usable signing key (" + "; ".join(skipped) + ")")
    return IssuerKeys(keys), tuple(skipped)


def load_key_file(config: IssuerConfig) -> IssuerKeys:
    """Read `config.key_file`: a JWKS JSON file, a PEM public key or a PEM certificate."""
    if config.key_file is None:
        raise ValueError("key_file is not set")
    try:
        data = Path(config.key_file).read_bytes()
        allowed = config.effective_algorithms
        if data.lstrip().startswith(b"{"):
            return parse_jwks(data, allowed_algorithms=allowed, max_keys=config.jwks_max_keys)[0]
        if b"-----BEGIN CERTIFICATE-----" in data:
            public_key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = serialization.load_pem_public_key(data)
        key = VerificationKey.from_public_key(public_key)
        if key.algorithms.isdisjoint(allowed):
            raise ValueError(f"the key allows {sorted(key.algorithms)}, none of them configured")
        return IssuerKeys([key])
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"key_file {config.key_file!r} of issuer {config.issuer!r}: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class KeySetStatus:
    """What an operator (or /readyz) needs to know about one issuer's keys."""

    issuer: str
    source: str
    key_count: int
    # None when the last fetch succeeded (or the keys are static).
    last_error: str | None


class _RemoteIssuer:
    """Mutable fetch state of one issuer whose keys come over HTTP."""

    __slots__ = (
        "config",
        "inflight",
        "jwks_uri",
        "keys",
        "last_attempt",
        "last_error",
        "last_success",
    )

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.keys: IssuerKeys | None = None
        # Resolved from discovery and kept until a fetch fails, then discovered again.
        self.jwks_uri: str | None = config.jwks_url
        self.last_attempt = -math.inf
        self.last_success = -math.inf
        self.last_error: str | None = None
        self.inflight: asyncio.Task[None] | None = None


class JwksCache:
    """Keys of all configured issuers; a `KeyStore` for `validate()`. Call `start()` once
    inside the event loop and `close()` at shutdown."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._session = session
        self._owns_session = session is None
        self._static: dict[str, IssuerKeys] = {}
        self._remote: dict[str, _RemoteIssuer] = {}
        self._refresher: asyncio.Task[None] | None = None
        # Counts completed fetch attempts (discovery + JWKS count as one), for metrics.
        self.fetch_attempts = 0
        for config in issuers:
            if config.issuer in self._static or config.issuer in self._remote:
                raise ValueError(f"issuer {config.issuer!r} is configured twice")
            if config.shared_secret is not None:
                secret_key = VerificationKey.from_shared_secret(config.shared_secret.encode())
                self._static[config.issuer] = IssuerKeys([secret_key])
            elif config.key_file is not None:
                self._static[config.issuer] = load_key_file(config)
            else:
                self._remote[config.issuer] = _RemoteIssuer(config)

    def keys_for(self, issuer: str) -> IssuerKeys | None:
        remote = self._remote.get(issuer)
        return remote.keys if remote is not None else self._static.get(issuer)

    async def start(self) -> None:
        """Fetch every remote key set once (failures are logged, not fatal) and start the
        background refresh."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await asyncio.gather(*(self._fetch_shared(state) for state in self._remote.values()))
        if self._remote:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")
            self._refresher.add_done_callback(_log_crash)

    async def close(self) -> None:
        tasks = [self._refresher] if self._refresher is not None else []
        tasks += [state.inflight for state in self._remote.values() if state.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._refresher = None
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def status(self) -> list[KeySetStatus]:
        statuses = [
            KeySetStatus(issuer, "static", len(keys), None) for issuer, keys in self._static.items()
        ]
        statuses += [
            KeySetStatus(
                issuer,
                state.config.jwks_url or state.config.discovery_url or "",
                len(state.keys) if state.keys is not None else 0,
                state.last_error,
            )
            for issuer, state in self._remote.items()
        ]
        return statuses

    async def validate(self, token: str, issuers: TrustedIssuers) -> Principal:
        """`validate()`, plus one rate-limited key refresh when the token names an unknown kid."""
        try:
            return validate(token, issuers, self)
        except KeyNotFound as miss:
            state = self._remote.get(miss.issuer)
            if state is None:
                raise
            await self.refresh_on_miss(miss.issuer)
            try:
                return validate(token, issuers, self)
            except KeyNotFound as second_miss:
                if state.last_error is not None or state.keys is None:
                    raise AuthError(
                        "issuer_unreachable",
                        503,
                        detail=f"issuer={miss.issuer!r}: {state.last_error or 'no keys yet'}",
                    ) from second_miss
                raise

    async def refresh_on_miss(self, issuer: str) -> None:
        """Fetch the issuer's keys unless a fetch ran within `jwks_min_refresh_interval`;
        join the fetch already in flight if there is one."""
        state = self._remote.get(issuer)
        if state is None:
            return
        recent = self._clock() - state.last_attempt < state.config.jwks_min_refresh_interval
        if state.inflight is None and recent:
            return
        await self._fetch_shared(state)

    async def _fetch_shared(self, state: _RemoteIssuer) -> None:
        task = state.inflight
        if task is None:
            state.last_attempt = self._clock()
            task = asyncio.create_task(self._fetch(state), name=f"jwks-fetch {state.config.issuer}")
            state.inflight = task
            task.add_done_callback(lambda _: setattr(state, "inflight", None))
        # Shielded: a cancelled request must not cancel the fetch other requests wait on.
        await asyncio.shield(task)

    async def _fetch(self, state: _RemoteIssuer) -> None:
        config = state.config
        try:
            async with asyncio.timeout(config.jwks_fetch_timeout):
                if state.jwks_uri is None:
                    state.jwks_uri = await self._discover(config)
                document = await self._get(state.jwks_uri, config)
            keys, skipped = parse_jwks(
                document,
                allowed_algorithms=config.effective_algorithms,
                max_keys=config.jwks_max_keys,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            state.last_error = f"{type(exc).__name__}: {exc}"[:500]
            if config.discovery_url is not None:
                state.jwks_uri = None
            log.warning("jwks fetch for issuer %r failed: %s", config.issuer, state.last_error)
            return
        finally:
            self.fetch_attempts += 1
        if skipped:
            log.info("jwks of issuer %r: skipped %s", config.issuer, "; ".join(skipped))
        state.keys = keys
        state.last_error = None
        state.last_success = self._clock()

    async def _discover(self, config: IssuerConfig) -> str:
        assert config.discovery_url is not None
        document = strict_json_object(await self._get(config.discovery_url, config))
        if document.get("issuer") != config.issuer:
            raise ValueError("discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError("discovery document has no jwks_uri")
        check_key_url(jwks_uri, config.allow_insecure_http, what="jwks_uri")
        return jwks_uri

    async def _get(self, url: str, config: IssuerConfig) -> bytes:
        if self._session is None:
            raise ValueError("JwksCache.start() was not called")
        headers = {"Accept": "application/json, application/jwk-set+json"}
        async with self._session.get(url, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"{url} answered HTTP {response.status}")
            limit = config.jwks_max_bytes
            if response.content_length is not None and response.content_length > limit:
                raise ValueError(f"{url} document exceeds {limit} bytes")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise ValueError(f"{url} document exceeds {limit} bytes")
            return bytes(body)

    async def _refresh_loop(self) -> None:
        states = list(self._remote.values())
        tick = min(state.config.jwks_min_refresh_interval for state in states)
        while True:
            await asyncio.sleep(tick)
            now = self._clock()
            due = [state for state in states if now >= _next_refresh(state)]
            await asyncio.gather(*(self._fetch_shared(state) for state in due))


def _next_refresh(state: _RemoteIssuer) -> float:
    # A healthy key set waits the full interval; a failing one retries at the rate limit.
    if state.keys is not None and state.last_error is None:
        return state.last_success + state.config.jwks_refresh_interval
    return state.last_attempt + state.config.jwks_min_refresh_interval


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("jwks background refresh stopped", exc_info=task.exception())
