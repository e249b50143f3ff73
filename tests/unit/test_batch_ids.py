"""The batch-id rule: one function, used by every stage, equal to schema.sql's CHECK."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from audio_pipeline.batch_ids import BATCH_ID_PATTERN, is_valid_batch_id
from audio_pipeline.queue import PermanentJobError
from audio_pipeline.workers.unpack_worker import UnpackRequest

SCHEMA = Path(__file__).resolve().parents[2] / "audio_pipeline" / "schema.sql"

VALID = ["b1", "Batch_2026-12-02.v1", "0", "a" * 128, "x.tar"]
INVALID = [
    "",
    "b1\n",  # re.match(r"^...$") accepted this: "$" matches before a final newline
    "b1\r",
    "\nb1",
    "b1\nb2",
    ".hidden",
    "-dash",
    "_under",
    "a/b",
    "../etc",
    "a b",
    "a" * 129,
    "bätch",
    "b1\x00",
    None,
    7,
]


@pytest.mark.parametrize("name", VALID)
def test_valid(name):
    assert is_valid_batch_id(name)


@pytest.mark.parametrize("name", INVALID)
def test_invalid(name):
    assert not is_valid_batch_id(name)


def test_trailing_newline_is_what_match_with_dollar_let_through():
    assert re.match(r"^" + BATCH_ID_PATTERN.pattern + r"$", "b1\n")  # the old check
    assert not is_valid_batch_id("b1\n")


def test_unpack_payload_with_a_trailing_newline_is_refused():
    with pytest.raises(PermanentJobError, match=r"invalid batch_id 'b1\\n'"):
        UnpackRequest.from_payload({"batch_id": "b1\n", "s3_key": "archives/b1.tar"})


def test_schema_check_is_the_same_pattern():
    """PostgreSQL's "$" (not newline-sensitive) matches only at the very end, so
    the anchored pattern there means what fullmatch means here."""
    checks = re.findall(r"CHECK \(batch_id ~ '([^']*)'\)", SCHEMA.read_text())
    assert checks == [f"^{BATCH_ID_PATTERN.pattern}$"]


def test_no_other_module_keeps_its_own_copy():
    root = Path(__file__).resolve().parents[2]
    copies = [
        str(p.relative_to(root))
        for p in [*root.glob("audio_pipeline/**/*.py"), *root.glob("ra_app/**/*.py")]
        if BATCH_ID_PATTERN.pattern in p.read_text() and p.name != "batch_ids.py"
    ]
    assert copies == []
