"""A running SP (the SAML sub-application on a real socket) and a real pysaml2 IdP.

The SP is configured with public URLs on `https://sp.test` (as behind a TLS-terminating
load balancer): responses name those, while the test posts to the loopback socket, which
also shows that nothing is derived from the request's Host.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from proxy.authn.principal import Principal
from proxy.authn.saml.app import saml_app
from proxy.authn.saml.config import RoleMapping, SamlSpConfig
from proxy.authn.saml.provider import ServiceProvider
from proxy.authn.saml.state import InProcessSamlStore, RedisSamlStore, SamlStateStore
from tests.integration.authn.saml.idp import (
    AuthnRequestSeen,
    IdentityProvider,
    KeyPair,
    make_keypair,
    post_body,
)

SP_BASE = "https://sp.test/saml"
IDP_ENTITY = "https://idp.test/idp"
ROLE_ATTRIBUTE = "urn:oid:1.3.6.1.4.1.5923.1.1.1.7"


@dataclass(frozen=True)
class Keys:
    idp: KeyPair
    other: KeyPair
    sp: KeyPair
    directory: Path


@pytest.fixture(scope="session")
def saml_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("saml-keys")
    return Keys(
        idp=make_keypair(directory, "idp"),
        other=make_keypair(directory, "other"),
        sp=make_keypair(directory, "sp"),
        directory=directory,
    )


@pytest.fixture
def idp(saml_keys: Keys, tmp_path: Path) -> IdentityProvider:
    return IdentityProvider(tmp_path, IDP_ENTITY, saml_keys.idp)


def sp_config(idp: IdentityProvider, keys: Keys, **changes: Any) -> SamlSpConfig:
    config = SamlSpConfig(
        entity_id=f"{SP_BASE}/metadata",
        acs_url=f"{SP_BASE}/acs",
        metadata_url=f"{SP_BASE}/metadata",
        idp_entity_id=IDP_ENTITY,
        idp_metadata_file=str(idp.metadata_file),
        sp_key_file=keys.sp.key_file,
        sp_cert_file=keys.sp.cert_file,
        role_mappings=(
            RoleMapping(
                attribute=ROLE_ATTRIBUTE,
                values={"staff": ("reader",), "faculty": ("reader", "writer")},
            ),
            RoleMapping(attribute="groups", copy_values=True),
        ),
    )
    return msgspec.structs.replace(config, **changes)


@dataclass
class Site:
    """The SP under test, the IdP in front of it, and the logins the SP handed over."""

    client: TestClient[web.Request, web.Application]
    idp: IdentityProvider
    logins: list[tuple[Principal, str]] = field(default_factory=list)

    async def login(self, return_to: str = "/data/report") -> AuthnRequestSeen:
        """Start SP-initiated login and let the IdP parse the AuthnRequest."""
        response = await self.client.get(
            "/saml/login", params={"return_to": return_to}, allow_redirects=False
        )
        assert response.status == 302, await response.text()
        return self.idp.receive(response.headers["Location"])

    async def post(self, xml: str | bytes) -> aiohttp.ClientResponse:
        return await self.client.post("/saml/acs", data=post_body(xml))

    async def post_raw(self, data: Any, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.client.post("/saml/acs", data=data, **kwargs)


SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def make_site(idp: IdentityProvider, saml_keys: Keys) -> AsyncIterator[SiteFactory]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(store: SamlStateStore | None = None, **changes: Any) -> Site:
        # The test client speaks plain HTTP, so the binding cookie cannot be Secure here;
        # test_browser_binding checks the production attributes.
        changes.setdefault("cookie_secure", False)
        provider = ServiceProvider.load(sp_config(idp, saml_keys, **changes))
        logins: list[tuple[Principal, str]] = []

        async def on_login(principal: Principal, return_to: str) -> web.StreamResponse:
            logins.append((principal, return_to))
            return web.json_response(
                {"id": principal.id, "roles": list(principal.roles), "return_to": return_to}
            )

        root = web.Application()
        root.add_subapp(
            provider.mount_prefix,
            saml_app(provider, store or InProcessSamlStore(), on_login),
        )
        client = TestClient(TestServer(root, host="127.0.0.1", port=0))
        await client.start_server()
        clients.append(client)
        metadata = await client.get("/saml/metadata")
        assert metadata.status == 200
        idp.trust_sp(await metadata.read())
        return Site(client=client, idp=idp, logins=logins)

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def site(make_site: SiteFactory) -> Site:
    return await make_site()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisSamlStore]:
    """A Redis store under a key prefix of its own, removed after the test."""
    redis = Redis.from_url(redis_url)
    prefix = f"test:saml:{secrets.token_hex(8)}:"
    yield RedisSamlStore(redis, key_prefix=prefix)
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
