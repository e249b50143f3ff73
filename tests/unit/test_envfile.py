"""The env-file reader against what the gpu_worker role's template really writes
(`audio-pipeline models sync --env-file` reads the worker's settings with it)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from audio_pipeline.envfile import EnvFileError, parse_env_file

# Every env file of the fleet (roles/common/tasks/env.yml), the gpu workers' included.
TEMPLATE = Path(__file__).parents[2] / "roles/common/templates/env.j2"
AWKWARD = {
    "REDIS_PASSWORD": 'rd-abc$x"y',
    "S3_SECRET_KEY": "back\\slash and spaces # not a comment",
    "EMPTY": "",
    "QUOTES": "'single' \"double\"",
}


def render_pipeline_env(values: dict[str, str]) -> str:
    """env.j2 through plain Jinja, with Ansible's combine filter, as the gpu_worker role
    fills it (roles/gpu_worker/tasks/env.yml)."""
    # an env file, not HTML: escaping would corrupt the values under test
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)  # noqa: S701
    env.filters["combine"] = lambda a, *more: {k: v for d in (a, *more) for k, v in d.items()}
    return env.from_string(TEMPLATE.read_text()).render(
        ansible_managed="managed",
        common_env_comment=["read by the workers"],
        common_env_pipeline=values,
        common_env={"NLTK_DATA": "/data/models/nltk"},
    )


def test_round_trip_through_the_worker_template() -> None:
    assert parse_env_file(render_pipeline_env(AWKWARD)) == {
        **AWKWARD,
        "NLTK_DATA": "/data/models/nltk",
    }


def test_a_bad_line_is_named() -> None:
    with pytest.raises(EnvFileError, match=r"f\.env:2: "):
        parse_env_file('A="1"\nB="open\n', "f.env")
