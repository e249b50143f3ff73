"""Loads the shared test kit as pytest plugins: fixtures live in tests/support, where
tests and other kits import what they need by name, never from a conftest."""

pytest_plugins = ["tests.support.stack"]
