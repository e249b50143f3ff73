"""The audit sample: which unflagged classifications enter the RA queue, and with what
probability.

Reviewing only what the classifier flagged says how often it is right when it flags
(precision) but nothing about what it misses. So a share of the unflagged items
enters the queue too. The choice is a Bernoulli draw per item made from a hash, not
from a random generator: an item is in when

    int(md5(f"{seed}:audit:{classification_id}").hexdigest()[:8], 16) < probability * 2**32

which anyone can recompute from the study's seed (RA_QUEUE_SEED), and which gives
the same answer in every process and on every sync. The probability is RA_AUDIT_SHARE,
or a band's own share where RA_AUDIT_BANDS stratifies by score (e.g. more of the
near-misses just below the threshold, fewer of the clearly harmless). Each item keeps
the probability it was drawn with, so estimates weight it by 1 / probability
(ra_app.evaluation). Flagged items all enter, with probability 1.

Pure: no Flask, no database; ra_app.assignment builds its SQL from these pieces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

HASH_SPACE = 2**32  # the hash is the first 8 hex digits of an md5


class Entry(StrEnum):
    """How an item entered the RA queue."""

    FLAGGED = "flagged"  # the classifier flagged it; every flagged item enters
    AUDIT = "audit"  # an unflagged item drawn into the audit sample


@dataclass(frozen=True)
class AuditBand:
    """Unflagged items scored below ``below`` (and not in an earlier band) are drawn
    with probability ``share``."""

    below: float
    share: float


def parse_audit_bands(raw: str) -> tuple[AuditBand, ...]:
    """``"0.1:0.01,0.3:0.05"`` -> bands in increasing order; raises ValueError."""
    bands: list[AuditBand] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        below_text, sep, share_text = part.partition(":")
        if not sep:
            raise ValueError(f"{part!r} is not SCORE:SHARE")
        try:
            band = AuditBand(float(below_text), float(share_text))
        except ValueError:
            raise ValueError(f"{part!r}: both sides must be numbers") from None
        if not 0.0 < band.below <= 1.0:
            raise ValueError(f"{part!r}: the score bound must be in (0, 1]")
        if not 0.0 <= band.share <= 1.0:
            raise ValueError(f"{part!r}: the share must be in [0, 1]")
        if bands and band.below <= bands[-1].below:
            raise ValueError("score bounds must increase from left to right")
        bands.append(band)
    return tuple(bands)


def audit_probability(score: float, share: float, bands: Sequence[AuditBand] = ()) -> float:
    """The probability with which an unflagged item of ``score`` is drawn."""
    for band in bands:
        if score < band.below:
            return band.share
    return share


def audit_hash(seed: str, classification_id: int) -> int:
    """The item's draw in [0, 2**32): it is in the sample when below probability * 2**32."""
    digest = hashlib.md5(f"{seed}:audit:{classification_id}".encode(), usedforsecurity=False)
    return int(digest.hexdigest()[:8], 16)


def in_audit_sample(
    seed: str, classification_id: int, score: float, share: float, bands: Sequence[AuditBand] = ()
) -> bool:
    """Whether an unflagged item is drawn (the same rule as the sync's SQL)."""
    return audit_hash(seed, classification_id) < audit_probability(score, share, bands) * HASH_SPACE


def probability_sql(score_column: str, bands: Sequence[AuditBand]) -> tuple[str, dict[str, float]]:
    """A SQL expression for audit_probability over ``score_column``, with its parameters
    (``:audit_share`` is the caller's)."""
    if not bands:
        return ":audit_share", {}
    whens = []
    params: dict[str, float] = {}
    for i, band in enumerate(bands):
        whens.append(f"WHEN {score_column} < :band_below_{i} THEN :band_share_{i}")
        params[f"band_below_{i}"] = band.below
        params[f"band_share_{i}"] = band.share
    return f"(CASE {' '.join(whens)} ELSE :audit_share END)", params
