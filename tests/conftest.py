"""Fixtures for the whole test tree: the real services come from tests/services.py, a real
Vault Transit server from tests/vault.py."""

import os
from pathlib import Path

pytest_plugins = ["tests.services", "tests.vault"]

# The `lineage-sidecar` command the integration tests start is the virtualenv's, whose
# editable install points at one checkout. Put this tree first for every subprocess, so a
# test run from another worktree tests that worktree's code, not the installed one's.
_TREE = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    part for part in (_TREE, os.environ.get("PYTHONPATH")) if part
)
