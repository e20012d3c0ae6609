"""Fixtures of the identity provider's integration tests (helpers live in harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.authn.idp.harness import Harness, running_idp


@pytest.fixture(params=["redis", "memory"])
async def idp(
    redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    """The provider with each state backend: shared Redis, or in-process for one worker."""
    async with running_idp(redis_url, tmp_path, backend=request.param) as harness:
        yield harness
