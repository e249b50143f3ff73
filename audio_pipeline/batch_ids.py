"""The one rule for a batch id, shared by every stage that accepts one.

A batch id names an archive (``archives/{batch_id}.tar``), a scratch directory
and an S3 prefix, so it must never carry a path separator, a leading dot or a
control character. schema.sql's CHECK on ``batches.batch_id`` enforces the same
pattern in PostgreSQL (tests/unit/test_batch_ids.py keeps the two equal).
"""

from __future__ import annotations

import re

# fullmatch only: with re.match, "$" also matches before a trailing newline.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BATCH_ID_RULE = "1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def is_valid_batch_id(value: object) -> bool:
    return isinstance(value, str) and BATCH_ID_PATTERN.fullmatch(value) is not None
