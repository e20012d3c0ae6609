"""The lineage API behind the proxy: the agent's application, asked the proxy's policy.

`lineage-sidecar api` runs a proxy whose only backend is `agent.api.lineage_api`, served
on a private unix socket (see `proxy.internal`). The proxy authenticates the caller and
checks the route's permission as for any data service; the API then filters what it
returns dataset by dataset through `PolicyAuthorizer`, which asks the very same policy
snapshot (so a dataset a caller may not read never appears in its lineage by name).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from aiohttp import web

from agent.api import Caller, lineage_api
from agent.store.migrate import migrate
from agent.store.queries import LineageQueries
from agent.store.writer import StoreWriter
from lineage_sidecar.config import ApiConfig
from proxy.authz.store import PolicyStore, decide_principal


class PolicyAuthorizer:
    """`agent.api.Authorizer` over the proxy's hot-reloaded policy."""

    def __init__(self, policy: PolicyStore) -> None:
        self._policy = policy

    def allowed(self, caller: Caller, resource: str, action: str) -> bool:
        engine = self._policy.current.engine
        return decide_principal(engine, caller.id, caller.roles, resource, action).allowed

    def allowed_many(self, caller: Caller, resources: Sequence[str], action: str) -> list[bool]:
        # One snapshot for the whole answer, even if a reload lands meanwhile.
        engine = self._policy.current.engine
        return [
            decide_principal(engine, caller.id, caller.roles, resource, action).allowed
            for resource in resources
        ]


async def api_application(
    config: ApiConfig, policy: PolicyStore
) -> tuple[web.Application, asyncpg.Pool]:
    """The API application and the connection pool it uses (close it at shutdown). The
    store's migrations are applied first (idempotent, under an advisory lock)."""
    dsn = config.store_dsn.value
    await migrate(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
    app = lineage_api(
        LineageQueries(pool),
        StoreWriter(pool),
        PolicyAuthorizer(policy),
        max_graph_nodes=config.max_graph_nodes,
    )
    return app, pool
