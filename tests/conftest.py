"""Fixtures for the whole test tree: the real services come from tests/services.py."""

pytest_plugins = ["tests.services"]
