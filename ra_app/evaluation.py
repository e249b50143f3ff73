"""How good is the classifier, measured with the RAs' labels: pure computation.

Input: every reviewed item (ReviewedItem) with the verdict values its coders gave
and, where there is one, the adjudicated verdict. ra_app.evaluation_source loads them.
Output, per policy version x model (GroupEvaluation):

- truth per item: the adjudicated verdict, else the majority of the coders' verdicts.
  Answers that are neither positive nor negative (``unsure``, or no answer) are left
  out and counted; an item whose positive and negative answers tie, or that has none,
  has no truth and is counted (``undecided_ties``, ``undecided_unsure``).
- precision among flagged items: the share of flagged items that truly violate, with
  a Wilson 95 % interval.
- recall and prevalence, from the audit sample with inverse-probability weights
  (Horvitz-Thompson): each item stands for 1 / probability items like it, the
  probability with which it entered the queue (1 for flagged items, the audit share
  for audit items). Recall = TP / (TP + FN), where FN is the weighted count of true
  violations among unflagged (audit) items; prevalence = weighted share of true
  violations among all items. Both are undefined without decided audit items.
- F1 = 2 P R / (P + R).
- a threshold sweep: precision, recall and F1 as if the threshold were t, for t on a
  fixed grid, with the t that maximises F1 and the lowest t reaching a target
  precision.
- calibration: the (weighted) observed rate of violations per score band.

The weights assume every flagged item of the group has been reviewed (each weighs
1); while the review is in progress, recall is underestimated by the share of flagged
items still unreviewed, which entered_flagged against reviewed_flagged shows.
Undefined figures are None (null in JSON).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from ra_app.audit_sample import Entry
from ra_app.codebook import Verdict

Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95 % interval
SWEEP_STEP = 0.05  # threshold grid of the sweep
CALIBRATION_BANDS = 10  # equal-width score bands
DEFAULT_TARGET_PRECISION = 0.9
# Scores are stored as REAL (single precision): 0.7 comes back as 0.699999988.
# Rounding to this many decimals puts them back on the grid they were meant to hit.
SCORE_DECIMALS = 6


class Truth(StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    TIE = "tie"  # as many positive as negative answers
    UNSURE = "unsure"  # no positive or negative answer at all


@dataclass(frozen=True)
class ReviewedItem:
    classification_id: int
    policy: str
    policy_version: int
    model: str
    score: float
    threshold: float
    entry: str  # Entry: flagged or audit
    probability: float  # with which it entered the queue
    answers: tuple[Any, ...]  # each coder's value of the verdict field
    adjudicated: Any = None  # the adjudicated value of the verdict field, if any


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    precision: float | None
    recall: float | None
    f1: float | None


@dataclass(frozen=True)
class CalibrationBand:
    low: float
    high: float
    items: int  # decided items in the band
    observed: float | None  # weighted share of them that violate
    mean_score: float | None


@dataclass(frozen=True)
class GroupEvaluation:
    policy: str
    policy_version: int
    model: str
    entered_flagged: int  # items in the RA queue (reviewed or not)
    entered_audit: int
    reviewed_flagged: int  # items with at least one label
    reviewed_audit: int
    decided_flagged: int  # of those, items with a truth
    decided_audit: int
    positives_flagged: int  # decided items that violate (unweighted)
    positives_audit: int
    undecided_ties: int
    undecided_unsure: int
    excluded_answers: int  # answers neither positive nor negative (unsure, empty)
    adjudicated: int  # items whose truth is an adjudication
    precision: float | None
    precision_ci: tuple[float, float] | None
    recall: float | None
    prevalence: float | None
    f1: float | None
    target_precision: float
    best_f1_threshold: float | None
    threshold_for_precision: float | None
    sweep: tuple[SweepPoint, ...]
    calibration: tuple[CalibrationBand, ...]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["precision_ci"] = list(self.precision_ci) if self.precision_ci else None
        return data


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def truth_of(answers: Iterable[Any], verdict: Verdict, adjudicated: Any = None) -> Truth:
    """An item's truth: the adjudicated verdict where it says one, else the majority."""
    if adjudicated is not None:
        decided = verdict.of(adjudicated)
        if decided is not None:
            return Truth.POSITIVE if decided else Truth.NEGATIVE
    said = [verdict.of(a) for a in answers]
    yes, no = said.count(True), said.count(False)
    if yes > no:
        return Truth.POSITIVE
    if no > yes:
        return Truth.NEGATIVE
    return Truth.UNSURE if yes == 0 else Truth.TIE


def f1_of(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None or precision + recall == 0:
        return None
    return 2 * precision * recall / (precision + recall)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass(frozen=True)
class _Decided:
    score: float
    weight: float
    positive: bool
    audit: bool


def sweep_thresholds() -> tuple[float, ...]:
    steps = round(1 / SWEEP_STEP)
    return tuple(round(i * SWEEP_STEP, 10) for i in range(steps + 1))


def _sweep(decided: Sequence[_Decided], lowest_threshold: float) -> tuple[SweepPoint, ...]:
    has_audit = any(d.audit for d in decided)
    points = []
    for t in sweep_thresholds():
        tp = sum(d.weight for d in decided if d.positive and d.score >= t)
        fp = sum(d.weight for d in decided if not d.positive and d.score >= t)
        fn = sum(d.weight for d in decided if d.positive and d.score < t)
        # Without an audit sample nothing is known below the classifier's threshold.
        precision = _ratio(tp, tp + fp) if has_audit or t >= lowest_threshold else None
        recall = _ratio(tp, tp + fn) if has_audit else None
        points.append(SweepPoint(t, precision, recall, f1_of(precision, recall)))
    return tuple(points)


def _calibration(decided: Sequence[_Decided]) -> tuple[CalibrationBand, ...]:
    bands = []
    width = 1 / CALIBRATION_BANDS
    for b in range(CALIBRATION_BANDS):
        low, high = round(b * width, 10), round((b + 1) * width, 10)
        last = b == CALIBRATION_BANDS - 1
        inside = [d for d in decided if low <= d.score < high or (last and d.score == high)]
        weight = sum(d.weight for d in inside)
        bands.append(
            CalibrationBand(
                low=low,
                high=high,
                items=len(inside),
                observed=_ratio(sum(d.weight for d in inside if d.positive), weight),
                mean_score=_ratio(sum(d.weight * d.score for d in inside), weight),
            )
        )
    return tuple(bands)


GroupKey = tuple[str, int, str]  # policy, policy version, model


def evaluate_group(
    items: Sequence[ReviewedItem],
    verdict: Verdict,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    entered: Mapping[str, int] | None = None,
) -> GroupEvaluation:
    """Every figure for one policy version x model (``items`` all belong to it);
    ``entered`` counts the group's items in the queue by entry."""
    entered = entered or {}
    first = items[0]
    counts: dict[str, int] = defaultdict(int)
    decided: list[_Decided] = []
    for item in items:
        audit = item.entry == Entry.AUDIT.value
        side = "audit" if audit else "flagged"
        counts[f"reviewed_{side}"] += 1
        counts["excluded_answers"] += sum(1 for a in item.answers if verdict.of(a) is None)
        if item.adjudicated is not None and verdict.of(item.adjudicated) is not None:
            counts["adjudicated"] += 1
        truth = truth_of(item.answers, verdict, item.adjudicated)
        if truth is Truth.TIE:
            counts["undecided_ties"] += 1
            continue
        if truth is Truth.UNSURE:
            counts["undecided_unsure"] += 1
            continue
        positive = truth is Truth.POSITIVE
        counts[f"decided_{side}"] += 1
        counts[f"positives_{side}"] += int(positive)
        score = round(item.score, SCORE_DECIMALS)
        decided.append(_Decided(score, 1 / item.probability, positive, audit))

    flagged = [d for d in decided if not d.audit]
    audit_items = [d for d in decided if d.audit]
    precision = _ratio(counts["positives_flagged"], counts["decided_flagged"])
    tp = sum(d.weight for d in flagged if d.positive)
    fn = sum(d.weight for d in audit_items if d.positive)
    everything = sum(d.weight for d in decided)
    recall = _ratio(tp, tp + fn) if audit_items else None
    prevalence = _ratio(tp + fn, everything) if audit_items else None

    lowest_threshold = min(round(i.threshold, SCORE_DECIMALS) for i in items)
    sweep = _sweep(decided, lowest_threshold)
    scored = [p for p in sweep if p.f1 is not None]
    best = max(scored, key=lambda p: p.f1 or 0.0) if scored else None  # first on ties
    reaching = [
        p.threshold for p in sweep if p.precision is not None and p.precision >= target_precision
    ]
    return GroupEvaluation(
        policy=first.policy,
        policy_version=first.policy_version,
        model=first.model,
        entered_flagged=entered.get(Entry.FLAGGED.value, 0),
        entered_audit=entered.get(Entry.AUDIT.value, 0),
        reviewed_flagged=counts["reviewed_flagged"],
        reviewed_audit=counts["reviewed_audit"],
        decided_flagged=counts["decided_flagged"],
        decided_audit=counts["decided_audit"],
        positives_flagged=counts["positives_flagged"],
        positives_audit=counts["positives_audit"],
        undecided_ties=counts["undecided_ties"],
        undecided_unsure=counts["undecided_unsure"],
        excluded_answers=counts["excluded_answers"],
        adjudicated=counts["adjudicated"],
        precision=precision,
        precision_ci=wilson_interval(counts["positives_flagged"], counts["decided_flagged"]),
        recall=recall,
        prevalence=prevalence,
        f1=f1_of(precision, recall),
        target_precision=target_precision,
        best_f1_threshold=best.threshold if best else None,
        threshold_for_precision=min(reaching) if reaching else None,
        sweep=sweep,
        calibration=_calibration(decided),
    )


def evaluate(
    items: Iterable[ReviewedItem],
    verdict: Verdict,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    entered: Mapping[GroupKey, Mapping[str, int]] | None = None,
) -> list[GroupEvaluation]:
    """One GroupEvaluation per reviewed policy version x model, in name, version, model
    order; ``entered`` counts each group's items in the queue by entry."""
    groups: dict[GroupKey, list[ReviewedItem]] = defaultdict(list)
    for item in items:
        groups[(item.policy, item.policy_version, item.model)].append(item)
    entered = entered or {}
    return [
        evaluate_group(groups[key], verdict, target_precision, entered.get(key))
        for key in sorted(groups)
    ]
