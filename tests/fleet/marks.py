"""The marks of every test that needs the converged fleet."""

import pytest

# The fleet fixture converges the machines from bare Debian (cold: several minutes,
# pip installs included), beyond the suite's default 600 s timeout; run alone, a
# module's first test also waits for it.
NEEDS_FLEET = [
    pytest.mark.fleet,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(1800),
]
