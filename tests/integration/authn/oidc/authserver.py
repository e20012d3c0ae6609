"""A real OAuth2/OIDC authorization server for tests, made of authlib's server components.

authlib's `AuthorizationServer` with `AuthorizationCodeGrant`, the PKCE `CodeChallenge`
extension (required), `OpenIDCode` for signed ID tokens and the RFC 7662
`IntrospectionEndpoint`, wrapped in a small aiohttp app on 127.0.0.1:0 that serves
discovery, JWKS, `/authorize` (auto-approving one fixed test user), `/token` and
`/introspect`. The protocol decisions (code binding, PKCE verification, single-use codes,
client authentication) are authlib's, not the test's.

A test can make the server misbehave the way a hostile or misconfigured provider would:
`id_token_nonce` replaces the nonce put in ID tokens and `id_token_audience` the audience.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    OAuth2Request,
    TokenMixin,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oidc.core import OpenIDCode, UserInfo
from joserfc.jwk import RSAKey

CLIENT_ID = "sidecar-web"
CLIENT_SECRET = "web-secret-" + "x" * 24
RESOURCE_CLIENT_ID = "sidecar-rs"
RESOURCE_CLIENT_SECRET = "rs-secret-" + "y" * 24


@dataclass
class ResourceOwner:
    id: str
    email: str
    roles: list[str]

    def get_user_id(self) -> str:
        return self.id


ALICE = ResourceOwner(id="alice", email="alice@corp.example", roles=["analyst"])


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    auth_method: str = "client_secret_basic"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in {"openid", "email", "profile", "read"})

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class AuthorizationCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: ResourceOwner
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    client_id: str
    scope: str
    user: ResourceOwner
    issued_at: int
    expires_in: int
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked


class PlainRequest(OAuth2Request):  # type: ignore[misc]
    """An OAuth2Request from values already read off the aiohttp request."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: dict[str, str],
        args: dict[str, str],
        form: dict[str, str],
    ) -> None:
        super().__init__(method, uri, headers=headers)
        self._args = args
        self._form = form
        self.payload = BasicOAuth2Payload({**args, **form})

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class OidcProvider:
    """The server state plus the aiohttp app around authlib's components."""

    def __init__(self) -> None:
        self.signing_key = RSAKey.generate_key(
            2048, parameters={"kid": "as-1", "use": "sig", "alg": "RS256"}, private=True
        )
        self.base_url = ""
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.tokens: dict[str, Token] = {}
        self.user = ALICE
        self.id_token_nonce: str | None = None
        self.id_token_audience: str | None = None
        self.introspections = 0
        self.token_requests = 0
        self.down = False
        self.runner: web.AppRunner | None = None
        self.server = self._build_server()

    @property
    def issuer(self) -> str:
        return self.base_url

    def register_web_client(self, redirect_uri: str) -> None:
        self.clients[CLIENT_ID] = Client(CLIENT_ID, CLIENT_SECRET, [redirect_uri])
        self.clients[RESOURCE_CLIENT_ID] = Client(RESOURCE_CLIENT_ID, RESOURCE_CLIENT_SECRET, [])

    def issue_access_token(self, scope: str = "read", expires_in: int = 600) -> str:
        """An opaque access token as the token endpoint would issue it."""
        value = secrets.token_urlsafe(32)
        self.tokens[value] = Token(value, CLIENT_ID, scope, self.user, int(time.time()), expires_in)
        return value

    def _build_server(self) -> AuthorizationServer:
        owner = self

        class Server(AuthorizationServer):  # type: ignore[misc]
            def query_client(self, client_id: str) -> Client | None:
                return owner.clients.get(client_id)

            def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
                owner.tokens[token["access_token"]] = Token(
                    token["access_token"],
                    request.client.client_id,
                    token.get("scope", ""),
                    request.user,
                    int(time.time()),
                    int(token["expires_in"]),
                )

            def create_oauth2_request(self, request: Any) -> OAuth2Request:
                return request if isinstance(request, OAuth2Request) else None

            def create_json_request(self, request: Any) -> Any:
                raise NotImplementedError

            def handle_response(
                self, status: int, body: Any, headers: list[tuple[str, str]]
            ) -> web.Response:
                response = (
                    web.json_response(body, status=status)
                    if isinstance(body, dict)
                    else web.Response(status=status, text=str(body))
                )
                for name, value in headers:
                    if name.lower() != "content-type":
                        response.headers[name] = value
                return response

            def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
                pass

        class CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
            TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [
                "client_secret_basic",
                "client_secret_post",
            ]

            def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
                data = request.payload.data
                owner.codes[code] = AuthorizationCode(
                    code=code,
                    client_id=request.client.client_id,
                    redirect_uri=data.get("redirect_uri", ""),
                    scope=data.get("scope", ""),
                    user=request.user,
                    nonce=data.get("nonce"),
                    code_challenge=data.get("code_challenge"),
                    code_challenge_method=data.get("code_challenge_method"),
                )

            def query_authorization_code(
                self, code: str, client: Client
            ) -> AuthorizationCode | None:
                found = owner.codes.get(code)
                return found if found is not None and found.client_id == client.client_id else None

            def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
                owner.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code: AuthorizationCode) -> ResourceOwner:
                return authorization_code.user

        class OpenID(OpenIDCode):  # type: ignore[misc]
            def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
                return False

            def resolve_client_private_key(self, client: Client) -> RSAKey:
                return owner.signing_key

            def get_client_algorithm(self, client: Client) -> str:
                return "RS256"

            def get_encode_header(self, client: Client) -> dict[str, str]:
                return {"alg": "RS256", "kid": "as-1"}

            def get_client_claims(self, client: Client) -> dict[str, Any]:
                audience = owner.id_token_audience or client.get_client_id()
                return {"iss": owner.issuer, "aud": [audience], "exp": int(time.time()) + 300}

            def get_authorization_code_claims(self, code: AuthorizationCode) -> dict[str, Any]:
                claims: dict[str, Any] = super().get_authorization_code_claims(code)
                if owner.id_token_nonce is not None:
                    claims["nonce"] = owner.id_token_nonce
                return claims

            def generate_user_info(self, user: ResourceOwner, scope: str) -> UserInfo:
                return UserInfo(
                    sub=user.id, email=user.email, email_verified=True, roles=user.roles
                )

        class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
            CLIENT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post"]

            def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
                return owner.tokens.get(token_string)

            def check_permission(self, token: Token, client: Client, request: Any) -> bool:
                return client.client_id == RESOURCE_CLIENT_ID

            def introspect_token(self, token: Token) -> dict[str, Any]:
                return {
                    "active": True,
                    "client_id": token.client_id,
                    "token_type": "Bearer",
                    "scope": token.scope,
                    "sub": token.user.id,
                    "aud": [RESOURCE_CLIENT_ID],
                    "iss": owner.issuer,
                    "exp": token.issued_at + token.expires_in,
                    "iat": token.issued_at,
                    "roles": token.user.roles,
                }

        server = Server(scopes_supported=["openid", "email", "profile", "read"])
        server.register_token_generator(
            "default", BearerTokenGenerator(lambda **_: secrets.token_urlsafe(32))
        )
        server.register_grant(CodeGrant, [CodeChallenge(required=True), OpenID(require_nonce=True)])
        server.register_endpoint(Introspection)
        return server

    # -- HTTP ------------------------------------------------------------------------------

    async def _plain(self, request: web.Request) -> PlainRequest:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        url = self.base_url + request.path_qs
        return PlainRequest(request.method, url, dict(request.headers), dict(request.query), form)

    async def discovery(self, _: web.Request) -> web.Response:
        base = self.base_url
        return web.json_response(
            {
                "issuer": base,
                "authorization_endpoint": base + "/authorize",
                "token_endpoint": base + "/token",
                "introspection_endpoint": base + "/introspect",
                "jwks_uri": base + "/jwks",
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def jwks(self, _: web.Request) -> web.Response:
        return web.json_response({"keys": [self.signing_key.as_dict(private=False)]})

    async def authorize(self, request: web.Request) -> web.Response:
        plain = await self._plain(request)
        grant = self.server.get_consent_grant(plain, end_user=self.user)
        response: web.Response = self.server.create_authorization_response(
            plain, grant_user=self.user, grant=grant
        )
        return response

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        response: web.Response = self.server.create_token_response(await self._plain(request))
        return response

    async def introspect(self, request: web.Request) -> web.Response:
        self.introspections += 1
        if self.down:
            return web.Response(status=502, text="bad gateway")
        response: web.Response = self.server.create_endpoint_response(
            "introspection", await self._plain(request)
        )
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        app.router.add_post("/introspect", self.introspect)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        sock = bound_socket()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(self.runner, sock).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def bound_socket() -> socket.socket:
    """A listening loopback socket on a free port, so a URL can be known before serving."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock
