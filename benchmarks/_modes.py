"""What the authentication, policy and capture modes of the proxy benchmark put in place.

A mode is the pass-through sidecar with some of its gate switched on: the capture tap, JWT
authentication (one token reused, so the verified-token cache answers; or a new token on
every request, so every request pays the signature check), the Casbin policy with its
audit log. This module generates what those modes need, as plain functions of their
inputs: an ES256 issuer and its JWKS, bench tokens, the model, a 10,000-rule policy whose
grant for the bench user's role sits near the end, the route file, the proxy config
sections, and the wrk Lua script that hands every request the next unused token.
`ModeAssets` writes them once per run into one directory; that is the only IO here.

Promises: every generated file is accepted by the proxy's own loaders, and the bench
token (any of the rotated ones too) is allowed `read` on the bench route's resource; the
rotation script never hands out a token twice within one run unless the token file runs
out, and says so in its output either way.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://bench-idp.example"
AUDIENCE = "bench"
KEY_ID = "bench-es256-1"
ALGORITHM = "ES256"
BENCH_SUBJECT = "bench-user"
ROLE_COUNT = 1_000
RULE_COUNT = 10_000
# The second-to-last role: its grant is one of the last rules of the file, so a policy
# engine that scans rules in order would pay for nearly all of them.
BENCH_ROLE = f"role-{ROLE_COUNT - 2:04d}"
# No ':' in policy objects: keyMatch2 reads ":name" as a path parameter, which would turn
# every rule into a regular expression (and "bench:root" into "bench" + any segment).
RESOURCE = "bench/root"
ACTION = "read"
TOKEN_LIFETIME_S = 6 * 3600
# The rotated tokens must outnumber what the proxy's LRU token cache holds (plus what is
# in flight), so that even a token handed out again is a cache miss.
TOKEN_CACHE_ENTRIES = 10_000
MIN_ROTATED_TOKENS = 2 * TOKEN_CACHE_ENTRIES
MAX_ROTATED_TOKENS = 1_000_000
# Tokens sized for this rate (with headroom) never run out; a sidecar on one shared core
# serves well below it.
ROTATION_MAX_RPS = 10_000
ROTATION_HEADROOM = 1.5

MODEL = """\
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act, eft

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub) && keyMatch2(r.obj, p.obj) && r.act == p.act
"""

ROUTES = f"""\
version: 1
routes:
  - name: root
    methods: [GET]
    path: /
    resource: "{RESOURCE}"
    action: {ACTION}
"""

# "carried": the requests carry the bench token but the sidecar does not check it (no auth
# section): the JWT modes' baseline with the very same requests.
AuthMode = Literal["none", "carried", "cached", "rotating"]


@dataclass(frozen=True)
class Mode:
    """Which parts of the gate a benchmark target switches on."""

    auth: AuthMode = "none"
    policy: bool = False
    capture: bool = False

    def __post_init__(self) -> None:
        if self.policy and not self.checks_tokens:
            raise ValueError("the policy needs authentication (auth: cached or rotating)")

    @property
    def checks_tokens(self) -> bool:
        return self.auth in ("cached", "rotating")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class BenchIssuer:
    """The bench's identity provider: one P-256 key, ES256 tokens, its JWKS."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, kid: str = KEY_ID) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"ES256 needs a P-256 key, not {key.curve.name}")
        self.key = key
        self.kid = kid
        self._header = _b64url(_compact_json({"alg": ALGORITHM, "kid": kid, "typ": "JWT"}))
        self._ecdsa = ec.ECDSA(hashes.SHA256())

    @classmethod
    def generate(cls) -> BenchIssuer:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> BenchIssuer:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the bench issuer key is not an EC private key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def jwks(self) -> dict[str, Any]:
        """The public key as the JWKS document the proxy's `key_file` reads."""
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "x": _b64url(numbers.x.to_bytes(32, "big")),
                    "y": _b64url(numbers.y.to_bytes(32, "big")),
                    "kid": self.kid,
                    "alg": ALGORITHM,
                    "use": "sig",
                }
            ]
        }

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS of `claims`. Signed here rather than by pyjwt: a third faster,
        which counts when a run needs hundreds of thousands of tokens."""
        signing_input = f"{self._header}.{_b64url(_compact_json(claims))}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode("ascii"), self._ecdsa))
        # JWS carries the raw 32-byte r and s, not the DER sequence OpenSSL returns.
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def token(self, *, now: int, jti: str, subject: str = BENCH_SUBJECT) -> str:
        """A token for `subject` holding the bench role, valid from `now` for hours."""
        return self.sign(bench_claims(now=now, jti=jti, subject=subject))

    def mint(self, count: int, *, now: int, first_id: int = 0) -> list[str]:
        """`count` tokens that differ only in their `jti`, so each is distinct."""
        return [self.token(now=now, jti=f"t{first_id + i}") for i in range(count)]


def bench_claims(*, now: int, jti: str, subject: str = BENCH_SUBJECT) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "roles": [BENCH_ROLE],
        "iat": now,
        "nbf": now,
        "exp": now + TOKEN_LIFETIME_S,
        "jti": jti,
    }


def bearer(token: str) -> str:
    """The header line, in wrk's "Name: value" form, that carries `token`."""
    return f"Authorization: Bearer {token}"


def policy_csv(
    *,
    role_count: int = ROLE_COUNT,
    rule_count: int = RULE_COUNT,
    bench_role: str = BENCH_ROLE,
    resource: str = RESOURCE,
    action: str = ACTION,
) -> str:
    """`rule_count` p lines over `role_count` roles, plus one g line per role.

    Each role gets the same mix a real policy has: literal grants, a wildcard grant, a
    write grant and a deny rule, none touching `resource`. The bench role's last rule
    instead grants `action` on `resource`; with the bench role near the end of the role
    list, that rule is near the end of the file.
    """
    if role_count < 1 or rule_count < 2 * role_count:
        raise ValueError("need at least one role and two rules per role")
    if bench_role not in {_role(i) for i in range(role_count)}:
        raise ValueError(f"{bench_role!r} is not one of the {role_count} generated roles")
    rules_per_role, extra = divmod(rule_count, role_count)
    lines = [f"# {rule_count} rules over {role_count} roles; generated by benchmarks/_modes.py"]
    for index in range(role_count):
        role = _role(index)
        count = rules_per_role + (1 if index < extra else 0)
        for k in range(count):
            if role == bench_role and k == count - 1:
                lines.append(f"p, {role}, {resource}, {action}, allow")
            else:
                lines.append(_filler_rule(role, index, k))
    lines += [f"g, user-{i:04d}, {_role(i)}" for i in range(role_count)]
    return "\n".join(lines) + "\n"


def _role(index: int) -> str:
    return f"role-{index:04d}"


def _filler_rule(role: str, index: int, k: int) -> str:
    kind = k % 5
    if kind == 1:
        return f"p, {role}, bench/area-{index}-{k}/*, read, allow"
    if kind == 2:
        return f"p, {role}, bench/ds-{index}-{k}, write, allow"
    if kind == 3:
        return f"p, {role}, bench/secret-{index}-{k}, read, deny"
    return f"p, {role}, bench/ds-{index}-{k}, read, allow"


def auth_section(jwks_file: Path, *, token_cache_entries: int) -> dict[str, Any]:
    return {
        "jwt_issuers": [
            {
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "key_file": str(jwks_file),
                "roles_claim": "roles",
                "algorithms": [ALGORITHM],
            }
        ],
        "token_cache_entries": token_cache_entries,
    }


def policy_section(*, model: Path, policy: Path, routes: Path, audit_log: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "policies": [str(policy)],
        "routes": str(routes),
        "audit_log": str(audit_log),
    }


def capture_section(spool_dir: Path) -> dict[str, Any]:
    return {"spool_dir": str(spool_dir), "service": "http://bench.upstream"}


def mode_config(mode: Mode, assets: ModeAssets, home: Path) -> dict[str, Any]:
    """The config sections `mode` adds to the pass-through config; its own files in `home`."""
    config: dict[str, Any] = {}
    if mode.checks_tokens:
        config["auth"] = auth_section(assets.jwks_file, token_cache_entries=TOKEN_CACHE_ENTRIES)
    if mode.policy:
        config["policy"] = policy_section(
            model=assets.model_file,
            policy=assets.policy_file,
            routes=assets.routes_file,
            audit_log=home / "audit.jsonl",
        )
    if mode.capture:
        config["capture"] = capture_section(home / "spool")
    return config


def rotated_tokens_needed(load_s: float, connections: int) -> int:
    """Enough tokens for `load_s` seconds of wrk at `ROTATION_MAX_RPS`, with headroom."""
    wanted = math.ceil(load_s * ROTATION_MAX_RPS * ROTATION_HEADROOM) + connections
    return max(MIN_ROTATED_TOKENS + connections, min(wanted, MAX_ROTATED_TOKENS))


# Bytes a Lua string literal may hold as they are; every other byte is written as \\ddd.
_LUA_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+,:= ")


def lua_string(text: str) -> str:
    """`text` (a file path, say) as a Lua string literal that cannot end early."""
    raw = text.encode("utf-8", "surrogateescape")
    return '"' + "".join(chr(b) if b in _LUA_PLAIN else f"\\{b:03d}" for b in raw) + '"'


def rotation_script(token_file: Path, cursor_file: Path) -> str:
    """A wrk script that sends every request with the next token of `token_file`.

    Each wrk thread reads the tokens once, in `init`. The cursor file holds the index of
    the first unused token: every wrk run (warm-up, each round) starts there, and `done`
    moves it past what the run sent, so no run repeats another's tokens. `done` prints
    a "Rotated tokens:" line saying how many distinct tokens were sent. Meant for wrk's
    `--threads 1`, which the harness always uses; with more threads, each thread would
    start at the same cursor.
    """
    return f"""\
-- Generated by benchmarks/_modes.py: one new bearer token per request.
local token_file = {lua_string(str(token_file))}
local cursor_file = {lua_string(str(cursor_file))}
local threads = {{}}

local function read_cursor()
  local handle = io.open(cursor_file, "r")
  if handle == nil then return 0 end
  local value = tonumber(handle:read("*l") or "0") or 0
  handle:close()
  return value
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  tokens = {{}}
  for line in io.lines(token_file) do
    if line ~= "" then tokens[#tokens + 1] = line end
  end
  if #tokens == 0 then error("no tokens in " .. token_file) end
  token_count = #tokens
  first = read_cursor()
  sent = 0
  headers = {{}}
  for name, value in pairs(wrk.headers) do
    if string.lower(name) ~= "authorization" then headers[name] = value end
  end
end

function request()
  local token = tokens[(first + sent) % #tokens + 1]
  sent = sent + 1
  headers["Authorization"] = "Bearer " .. token
  return wrk.format(nil, nil, headers)
end

function done(summary, latency, requests)
  local first = read_cursor()
  local total, available = 0, 0
  for _, thread in ipairs(threads) do
    total = total + (thread:get("sent") or 0)
    available = thread:get("token_count") or available
  end
  local handle = assert(io.open(cursor_file, "w"))
  handle:write(tostring(first + total), "\\n")
  handle:close()
  local distinct = math.min(total, available)
  local verdict = "each one distinct"
  if first + total > available then
    verdict = "TOKEN FILE EXHAUSTED: tokens repeated"
  end
  io.write(string.format(
    "Rotated tokens: %d requests sent, %d distinct tokens (#%d to #%d of %d): %s\\n",
    total, distinct, first, first + total - 1, available, verdict))
end
"""


@dataclass(frozen=True)
class ModeAssets:
    """The files every mode target of one run shares, under `directory`."""

    directory: Path
    issuer: BenchIssuer
    jwks_file: Path
    model_file: Path
    policy_file: Path
    routes_file: Path

    @classmethod
    def at(cls, directory: Path) -> ModeAssets:
        """Load the issuer key from `directory` or create it, and write the other files."""
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / "issuer-key.pem"
        if key_file.exists():
            issuer = BenchIssuer.from_pem(key_file.read_bytes())
        else:
            issuer = BenchIssuer.generate()
            key_file.touch(mode=0o600)
            key_file.write_bytes(issuer.private_pem())
        assets = cls(
            directory=directory,
            issuer=issuer,
            jwks_file=directory / "jwks.json",
            model_file=directory / "model.conf",
            policy_file=directory / "policy.csv",
            routes_file=directory / "routes.yaml",
        )
        # Written once: a proxy already started watches the policy files, and rewriting
        # them would make it reload.
        for path, text in (
            (assets.jwks_file, json.dumps(issuer.jwks(), indent=2) + "\n"),
            (assets.model_file, MODEL),
            (assets.policy_file, policy_csv()),
            (assets.routes_file, ROUTES),
        ):
            if not path.exists():
                path.write_text(text)
        return assets

    def bench_token(self) -> str:
        """One fresh token, for modes that send the same token on every request."""
        return self.issuer.token(now=int(time.time()), jti="reused")

    def token_file(self, count: int) -> tuple[Path, str]:
        """A file of `count` distinct tokens, one a line (made once, then reused), and its
        last token, which the pre-measurement check sends."""
        path = self.directory / f"tokens-{count}.txt"
        if not path.exists():
            tokens = self.issuer.mint(count, now=int(time.time()))
            partial = path.with_suffix(".partial")
            partial.write_text("\n".join(tokens) + "\n")
            partial.rename(path)
        with path.open("rb") as handle:
            # The last line, without reading the whole file.
            handle.seek(max(0, path.stat().st_size - 4096))
            last = handle.read().decode("ascii").strip().splitlines()[-1]
        return path, last


def read_tokens(path: Path) -> Sequence[str]:
    return [line for line in path.read_text().splitlines() if line]
