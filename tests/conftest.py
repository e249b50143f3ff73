"""Loads the shared test kit: fixtures live in tests/support, which tests and other
kits import by name, never from a conftest."""

import pytest

# Before anything imports the kit, so its helpers' asserts explain a failure the way
# a test's own do.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = ["tests.support.stack"]
