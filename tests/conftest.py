"""Fixtures for the whole test tree: the real services come from tests/services.py, a real
Vault Transit server from tests/vault.py."""

pytest_plugins = ["tests.services", "tests.vault"]
