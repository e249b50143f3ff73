"""ansible-playbook run for real, as a subprocess of this test run.

``ansible_render`` reads what a playbook would write without running it; this runs
one. The environment is bare so that nothing of the user's Ansible config or the
shell's settings reaches the run, and the recap can be read as plain text.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def ansible_playbook(
    workdir: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """This virtualenv's ansible-playbook with ``args``, in ``workdir`` (also its HOME);
    modules run under this Python; ``env`` is added to the environment."""
    return subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            "NO_COLOR": "1",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
            **(env or {}),
        },
    )
