"""``audio-pipeline policy apply``: policy files made current on the real PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from audio_pipeline.policy_files import PolicyFileError, load_policy_files
from tests.support.operator_cli import run_cli as cli

pytestmark = pytest.mark.integration

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def apply(env: dict[str, str], *paths: Path) -> dict:
    result = cli(env, "policy", "apply", "--json", *map(str, paths))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_policy(path: Path, text: str, lexicon: list[str], name: str = "threats") -> Path:
    path.write_text(
        f"name: {name}\ndescription: for the test\nlexicon: {json.dumps(lexicon)}\n"
        "text: |\n" + "".join(f"  {line}\n" for line in text.splitlines())
    )
    return path


def rows(db_conn) -> list[tuple]:
    return [
        (r["name"], r["version"], r["active"], r["text"], r["lexicon"])
        for r in db_conn.execute(
            "SELECT name, version, active, text, lexicon FROM policies ORDER BY name, version"
        ).fetchall()
    ]


def test_repository_policies_apply_once_then_unchanged(pipeline_env, db_conn):
    first = apply(pipeline_env, REPO_POLICIES)
    assert first["changed"] is True
    assert {p["result"] for p in first["policies"]} == {"added"}
    second = apply(pipeline_env, REPO_POLICIES)
    assert second["changed"] is False
    assert {p["result"] for p in second["policies"]} == {"unchanged"}
    [(name, version, active, text, lexicon)] = rows(db_conn)
    assert (name, version, active) == ("harassment-threats", 1, True)
    assert text.startswith("# Policy")
    assert "## Definition of Labels" in text
    assert "kill you" in lexicon


def test_changed_wording_is_a_new_version_and_the_old_one_stays_inactive(
    pipeline_env, db_conn, tmp_path
):
    path = write_policy(tmp_path / "threats.yml", "Flag threats.", ["kill you"])
    assert apply(pipeline_env, path)["policies"][0]["result"] == "added"
    # A policy's id is what classifications point at; it must survive the rewording.
    old_id = db_conn.execute("SELECT id FROM policies WHERE version = 1").fetchone()["id"]
    db_conn.commit()

    write_policy(path, "Flag threats of violence.", ["kill you"])
    summary = apply(pipeline_env, path)
    assert summary["changed"] is True
    [outcome] = summary["policies"]
    assert (outcome["result"], outcome["version"], outcome["deactivated"]) == (
        "new version",
        2,
        [1],
    )
    write_policy(path, "Flag threats of violence.", ["kill you", "hurt you"])
    assert apply(pipeline_env, path)["policies"][0]["version"] == 3  # the lexicon counts too
    assert apply(pipeline_env, path)["changed"] is False

    assert rows(db_conn) == [
        ("threats", 1, False, "Flag threats.", ["kill you"]),
        ("threats", 2, False, "Flag threats of violence.", ["kill you"]),
        ("threats", 3, True, "Flag threats of violence.", ["kill you", "hurt you"]),
    ]
    assert db_conn.execute("SELECT id FROM policies WHERE version = 1").fetchone()["id"] == old_id
    text = cli(pipeline_env, "policy", "apply", str(path))
    assert text.returncode == 0, text.stderr
    assert "policy threats v3: unchanged" in text.stdout


def test_apply_restores_what_the_files_say(pipeline_env, db_conn, tmp_path):
    path = write_policy(tmp_path / "threats.yml", "Flag threats.", ["kill you"])
    apply(pipeline_env, path)
    off = cli(pipeline_env, "policy", "deactivate", "threats", "1")
    assert off.returncode == 0, off.stderr
    again = apply(pipeline_env, path)
    assert (again["changed"], again["policies"][0]["result"]) == (True, "activated")
    assert rows(db_conn)[0][2] is True

    path.write_text(path.read_text() + "active: false\n")
    retired = apply(pipeline_env, path)
    assert retired["policies"][0]["result"] == "deactivated"
    assert apply(pipeline_env, path)["changed"] is False
    assert [r[2] for r in rows(db_conn)] == [False]


def test_policy_added_by_hand_is_left_alone(pipeline_env, db_conn, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("An experiment.")
    added = cli(pipeline_env, "policy", "add", "experiment", "--version", "1", "--file", str(other))
    assert added.returncode == 0, added.stderr
    apply(pipeline_env, write_policy(tmp_path / "threats.yml", "Flag threats.", []))
    assert [(r[0], r[2]) for r in rows(db_conn)] == [("experiment", True), ("threats", True)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name: x\ntext: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
        ("name: x\n", "missing key(s): text"),
        ("name: x\ntext: ok\nlexicon: kill you\n", "'lexicon' must be a list of strings"),
        ("name: x\ntext: ok\nlexicons: [a]\n", "unknown key(s) lexicons"),
        ("name: x\ntext: ok\nversion: 2\n", "remove 'version'"),
        ("name: x\ntext: '  '\n", "'text' must be a non-empty string"),
    ],
)
def test_bad_file_is_named_and_nothing_is_written(
    pipeline_env, db_conn, tmp_path, content, message
):
    good = write_policy(tmp_path / "a-good.yml", "Flag threats.", ["kill you"])
    bad = tmp_path / "b-bad.yml"
    bad.write_text(content)
    result = cli(pipeline_env, "policy", "apply", str(good), str(bad))
    assert result.returncode == 1
    assert f"{bad}: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert rows(db_conn) == []  # the good file was not applied either


def test_name_the_schema_rejects_is_reported_with_its_file(pipeline_env, db_conn, tmp_path):
    good = write_policy(tmp_path / "a.yml", "Flag threats.", ["kill you"])
    bad = write_policy(tmp_path / "b.yml", "Text.", [], name="../escape")
    result = cli(pipeline_env, "policy", "apply", str(tmp_path))
    assert result.returncode == 1
    assert f"{bad}: rejected by the database" in result.stderr
    assert rows(db_conn) == []  # one transaction: a.yml is not half-applied
    assert good.exists()


def test_two_files_with_one_name_and_missing_paths(tmp_path):
    write_policy(tmp_path / "a.yml", "One.", [])
    write_policy(tmp_path / "b.yml", "Two.", [])
    with pytest.raises(
        PolicyFileError, match=r"b\.yml: policy 'threats' is also defined in .*a\.yml"
    ):
        load_policy_files([tmp_path])
    with pytest.raises(PolicyFileError, match=r"nope\.yml: cannot read the file"):
        load_policy_files([tmp_path / "nope.yml"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyFileError, match="no policy files"):
        load_policy_files([empty])


def test_repository_policy_files_load(tmp_path):
    """Every shipped policy parses, and a copy of the folder loads the same."""
    shipped = load_policy_files([REPO_POLICIES])
    assert shipped
    copy = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, copy)
    assert [p.name for p in load_policy_files([copy])] == [p.name for p in shipped]
