"""Environment files as the roles render them (KEY="value", systemd's EnvironmentFile).

The units load these files through systemd; operator commands on a host (the
`flask` and `audio-pipeline` wrappers) load the same file with this reader, so a
command typed by a person sees exactly the settings the service runs with.
"""

from __future__ import annotations

import shlex
from pathlib import Path


class EnvFileError(ValueError):
    """A line of an environment file is not KEY=value."""


def parse_env_file(text: str, source: str = "<env>") -> dict[str, str]:
    """KEY="value" lines; '#' comments and blank lines are skipped. Quotes and
    backslash escapes are read the way systemd reads them, and nothing is expanded
    (a '$' in a password stays a '$')."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        try:
            words = shlex.split(stripped, comments=False, posix=True)
        except ValueError as exc:
            raise EnvFileError(f"{source}:{number}: {exc}") from None
        if len(words) != 1 or "=" not in words[0]:
            raise EnvFileError(f"{source}:{number}: not a KEY=value line")
        key, _, value = words[0].partition("=")
        values[key] = value
    return values


def read_env_file(path: Path) -> dict[str, str]:
    return parse_env_file(path.read_text(), str(path))
