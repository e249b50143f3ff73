"""The package as the fleet installs it: a wheel, not this checkout.

Hosts pip-install a release directory (a non-editable install), so anything the
code reads at run time must be package data. ``init-db`` reads schema.sql; the
top-level schema.sql is only a symlink to the packaged copy.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import devstack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The developer tools; a host gets the release directory but must never install them.
DEV_MODULES = ("devstack", "demo", "sample", "dev_models")
FLEET_SCRIPTS = {"audio-pipeline", "transfer-worker", "unpack-worker", "gpu-worker"}


def shipped_files() -> list[str]:
    """What `git archive` of this working tree would ship to a host: every file git
    tracks or would track (devtools/, tests/ and bench/ included), none it ignores."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    # A file deleted but not yet committed is listed and absent; a symlink is copied as one.
    return [n for n in listed if n and ((REPO / n).is_symlink() or (REPO / n).is_file())]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the release tree, so the checkout gets no build/."""
    src = tmp_path_factory.mktemp("src")
    for name in shipped_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name, follow_symlinks=False)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            str(VENV_BIN / "pip"),
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    [built] = out.glob("*.whl")
    return built


def test_schema_is_one_file_shipped_in_the_wheel(wheel: Path):
    top = REPO / "schema.sql"
    assert top.is_symlink()
    assert top.resolve() == (REPO / "audio_pipeline" / "schema.sql").resolve()
    role_copy = REPO / "roles" / "orchestrator" / "files" / "schema.sql"
    assert role_copy.resolve() == top.resolve()
    with zipfile.ZipFile(wheel) as zf:
        packaged = zf.read("audio_pipeline/schema.sql").decode()
    assert packaged == top.read_text()
    assert "CREATE TABLE IF NOT EXISTS policies" in packaged


def test_the_wheel_carries_no_developer_tools(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"audio_pipeline", "ra_app"}
    for module in DEV_MODULES:
        assert f"devtools/{module}.py" not in names
        assert f"audio_pipeline/{module}.py" not in names
    console = scripts.split("[console_scripts]")[1].split("[")[0]
    assert {line.split("=")[0].strip() for line in console.splitlines() if "=" in line} == (
        FLEET_SCRIPTS
    )


def imported_modules(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_the_shipped_packages_import_no_developer_code():
    """A host has the wheel only: an import of devtools (or tests, bench) would fail there."""
    found = [
        f"{path.relative_to(REPO)}: {name}"
        for package in ("audio_pipeline", "ra_app")
        for path in sorted((REPO / package).rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] in {"devtools", "tests", "bench"}
    ]
    assert not found


def test_init_db_from_a_non_editable_install(
    wheel: Path, stack, stack_env, empty_database, tmp_path
):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            str(VENV_BIN / "pip"),
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The dependencies come from the test virtualenv (installing them again would only
    # cost time); the package itself must come from the wheel, never this checkout.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "test-deps.pth").write_text(deps + "\n")

    env = {"PATH": "/usr/bin:/bin", **stack_env, "POSTGRES_DB": empty_database}
    where = subprocess.run(
        [str(python), "-c", "import audio_pipeline.db as d; print(d.SCHEMA_PATH)"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    for _ in range(2):  # idempotent, like every deploy
        result = subprocess.run(
            [str(venv / "bin" / "audio-pipeline"), "init-db"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"schema applied to {empty_database}" in result.stdout
    with devstack.admin_connect(stack, empty_database) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables").fetchall()}
    assert {"batches", "audio_files", "transcripts", "policies", "classifications"} <= tables
