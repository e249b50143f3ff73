"""Loads the shared test kit: fixtures live in tests/support, which tests and other
kits import by name, never from a conftest.

It also prints, in the terminal summary, the figures a test recorded with
``record_property("terminal_summary", text)`` (the chaos test's counts), so they show
in ``make test`` output whether the test passed or failed.
"""

import pytest

# Before anything imports the kit, so its helpers' asserts explain a failure the way
# a test's own do.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = ["tests.support.stack"]

SUMMARY_PROPERTY = "terminal_summary"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reports in terminalreporter.stats.values():
        for report in reports:
            # Each phase's report carries the properties; the call's has them all once.
            if getattr(report, "when", None) != "call":
                continue
            for name, text in getattr(report, "user_properties", ()):
                if name == SUMMARY_PROPERTY:
                    terminalreporter.write_sep("-", report.nodeid)
                    terminalreporter.write_line(str(text))
