"""Evaluation of the classifier with the RAs' labels, every figure checked by hand.

The study below: policy hate v1 and v2, models m1 and m2, threshold 0.5, every item
coded by two RAs (ann, bob), unflagged items drawn into the audit sample with
probability 0.25 (each audit item stands for 4 unflagged items).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from flask import Flask
from sqlalchemy import text

from ra_app import assignment, pipeline
from ra_app.audit_sample import in_audit_sample
from ra_app.codebook import DEFAULT_VERDICT, CodebookError, Verdict, parse_codebook
from ra_app.evaluation import Truth, truth_of, wilson_interval
from ra_app.extensions import db
from ra_app.labels import record_label
from ra_app.models import User
from tests.support.web import add_user, login, make_app, seed_scored

REPO = Path(__file__).resolve().parents[2]
FLASK = [str(Path(sys.executable).parent / "flask"), "--app", "ra_app"]

Y, N, U = "yes", "no", "unsure"
# (policy version, model, score) -> the (ann, bob) answers of the items with that
# score, in queue order; further items of that score are skipped by both (unreviewed).
PLAN: dict[tuple[int, str, float], list[tuple[str, str]]] = {
    # v1 x m1, flagged
    (1, "m1", 0.9): [(Y, Y), (Y, U)],  # positive; positive (the unsure is left out)
    (1, "m1", 0.8): [(Y, Y)],  # positive
    (1, "m1", 0.7): [(N, N)],  # negative
    (1, "m1", 0.6): [(Y, N), (N, N)],  # a tie (no truth); negative
    (1, "m1", 0.55): [(U, U)],  # no verdict (no truth)
    # v1 x m1, audit (drawn from 40 unflagged items at each score)
    (1, "m1", 0.4): [(Y, Y), (N, N)],  # positive; negative
    (1, "m1", 0.2): [(N, N), (N, U)],  # negative; negative
    # v2 x m1: flagged only, no audit sample
    (2, "m1", 0.8): [(Y, Y)],
    (2, "m1", 0.6): [(N, N)],
    # v1 x m2: one flagged item
    (1, "m2", 0.9): [(Y, Y)],
}
UNFLAGGED_PER_SCORE = 40  # enough that at least two of each score are drawn at 0.25


class Study(NamedTuple):
    app: Flask
    env: dict[str, str]
    drawn: int  # unflagged v1 x m1 items in the queue


@pytest.fixture
def study(ra_env: dict[str, str], db_conn: Any) -> Study:
    seed_scored(db_conn, [0.9, 0.9, 0.8, 0.7, 0.6, 0.6, 0.55], model="m1")
    scores = [0.4] * UNFLAGGED_PER_SCORE + [0.2] * UNFLAGGED_PER_SCORE
    unflagged = seed_scored(db_conn, scores, model="m1")
    seed_scored(db_conn, [0.8, 0.6], version=2, model="m1")
    seed_scored(db_conn, [0.9], model="m2")
    env = {**ra_env, "RA_AUDIT_SHARE": "0.25", "RA_DOUBLE_CODED_SHARE": "1"}
    app = make_app(env)
    for name in ("ann", "bob"):
        add_user(app, name)
    add_user(app, "boss", "admin")
    for who in (0, 1):
        _code(app, ("ann", "bob")[who], who)
    # how many unflagged items the documented rule draws into the queue at 0.25
    drawn = sum(
        in_audit_sample("study", c, s, 0.25) for c, s in zip(unflagged, scores, strict=True)
    )
    return Study(app, env, drawn)


def _code(app: Flask, name: str, who: int) -> None:
    """Work through the whole queue as ``name``, answering as PLAN says."""
    seen: dict[tuple[int, str, float], int] = defaultdict(int)
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one()
        while (a := assignment.next_assignment(user)) is not None:
            item = pipeline.item_detail(a.classification_id)
            assert item is not None
            key = (item.policy_version, item.model, round(item.score, 2))
            planned = PLAN.get(key, [])
            if seen[key] < len(planned):
                record_label(a.id, user, {"violates": planned[seen[key]][who]}, 1000)
            else:
                assignment.skip(a, user)
                db.session.commit()
            seen[key] += 1
        assert all(seen[k] >= len(v) for k, v in PLAN.items()), seen


# v1 x m1 by hand. Decided flagged: 0.9+, 0.9+, 0.8+, 0.7-, 0.6- (weight 1 each);
# decided audit: 0.4+, 0.4-, 0.2-, 0.2- (weight 1 / 0.25 = 4 each).
V1_M1 = {
    "policy": "hate",
    "policy_version": 1,
    "model": "m1",
    "entered_flagged": 7,
    "reviewed_flagged": 7,
    "reviewed_audit": 4,
    "decided_flagged": 5,
    "decided_audit": 4,
    "positives_flagged": 3,
    "positives_audit": 1,
    "undecided_ties": 1,
    "undecided_unsure": 1,
    "excluded_answers": 4,  # 0.9's unsure, 0.55's two, 0.2's unsure
    "adjudicated": 0,
    "precision": 0.6,  # 3 / 5
    # Wilson, x = 3, n = 5, z = 1.959964, z^2 = 3.841459:
    # centre = (0.6 + z^2/10) / (1 + z^2/5) = 0.984146 / 1.768292 = 0.556551
    # half = z / 1.768292 * sqrt(0.6 * 0.4 / 5 + z^2 / 100) = 1.108393 * 0.293963 = 0.325828
    "precision_ci": [0.230724, 0.882379],
    "recall": 3 / 7,  # TP = 3 * 1 = 3, FN = 1 * 4 = 4
    "prevalence": 7 / 21,  # (3 + 4) / (5 * 1 + 4 * 4)
    "f1": 0.5,  # 2 * 0.6 * 3/7 / (0.6 + 3/7) = 0.514286 / 1.028571
    "target_precision": 0.9,
    "best_f1_threshold": 0.25,  # F1 0.7 from 0.25 to 0.4, first wins
    "threshold_for_precision": 0.75,  # precision 1.0 from 0.75 (0.65 and 0.7 give 0.75)
}
# Sweep, by hand: (threshold, precision, recall, F1) with TP, FP, FN weighted.
V1_M1_SWEEP = (
    # t <= 0.2: everything predicted positive: TP 7, FP 1 + 1 + 4 + 4 + 4 = 14
    [(t, 7 / 21, 1.0, 0.5) for t in (0.0, 0.05, 0.1, 0.15, 0.2)]
    # 0.25..0.4: the 0.2 items drop out: TP 7, FP 6; F1 = 2 * 7/13 / (1 + 7/13) = 0.7
    + [(t, 7 / 13, 1.0, 0.7) for t in (0.25, 0.3, 0.35, 0.4)]
    # 0.45..0.6: flagged only: TP 3, FP 2, FN 4
    + [(t, 0.6, 3 / 7, 0.5) for t in (0.45, 0.5, 0.55, 0.6)]
    # 0.65, 0.7: TP 3, FP 1; F1 = 2 * 0.75 * 3/7 / (0.75 + 3/7) = 0.545455
    + [(t, 0.75, 3 / 7, 6 / 11) for t in (0.65, 0.7)]
    # 0.75, 0.8: TP 3, FP 0; F1 = 2 * 3/7 / (10/7) = 0.6
    + [(t, 1.0, 3 / 7, 0.6) for t in (0.75, 0.8)]
    # 0.85, 0.9: TP 2 (the 0.9s), FN 5; F1 = 2 * 2/7 / (9/7) = 4/9
    + [(t, 1.0, 2 / 7, 4 / 9) for t in (0.85, 0.9)]
    # 0.95, 1: nothing predicted positive: no precision, recall 0
    + [(t, None, 0.0, None) for t in (0.95, 1.0)]
)
# Calibration, by hand: band low -> (items, weighted observed rate, mean score).
V1_M1_CALIBRATION = {
    0.2: (2, 0.0, 0.2),  # 0.2-, 0.2-
    0.4: (2, 0.5, 0.4),  # 0.4+, 0.4-: 4 of 8
    0.6: (1, 0.0, 0.6),
    0.7: (1, 0.0, 0.7),
    0.8: (1, 1.0, 0.8),
    0.9: (2, 1.0, 0.9),
}
V2_M1 = {
    "policy_version": 2,
    "model": "m1",
    "reviewed_flagged": 2,
    "reviewed_audit": 0,
    "precision": 0.5,  # 1 / 2
    # Wilson, x = 1, n = 2: centre = (0.5 + z^2/4) / (1 + z^2/2) = 0.5;
    # half = z / 2.920730 * sqrt(0.25 / 2 + z^2 / 16) = 0.671050 * 0.604228 = 0.405469
    "precision_ci": [0.094531, 0.905469],
    "recall": None,  # no audit sample: nothing is known of what was missed
    "prevalence": None,
    "f1": None,
    "best_f1_threshold": None,
    "threshold_for_precision": 0.65,  # only the 0.8 item left: 1 / 1
}
V1_M2 = {
    "policy_version": 1,
    "model": "m2",
    "reviewed_flagged": 1,
    "reviewed_audit": 0,
    "precision": 1.0,
    # Wilson, x = 1, n = 1: centre = (1 + z^2/2) / (1 + z^2) = 2.920730 / 4.841459 = 0.603275;
    # half = z / 4.841459 * sqrt(z^2 / 4) = 0.404829 * 0.979982 = 0.396725
    "precision_ci": [0.206549, 1.0],
    "recall": None,
    "prevalence": None,
    "f1": None,
}


def _check(group: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        got = group[key]
        if isinstance(value, float | list):
            assert got == pytest.approx(value, abs=1e-6), key
        else:
            assert got == value, key


def _groups(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*FLASK, "evaluate", "--json", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.integration
def test_every_figure_by_hand_through_the_cli(study: Study) -> None:
    env = study.env
    groups = _groups(env)
    assert [(g["policy"], g["policy_version"], g["model"]) for g in groups] == [
        ("hate", 1, "m1"),
        ("hate", 1, "m2"),
        ("hate", 2, "m1"),
    ]
    v1_m1, v1_m2, v2_m1 = groups
    _check(v1_m1, V1_M1)
    assert v1_m1["entered_audit"] == study.drawn
    assert (v2_m1["entered_flagged"], v2_m1["entered_audit"]) == (2, 0)
    _check(v2_m1, V2_M1)
    _check(v1_m2, V1_M2)

    sweep = [(p["threshold"], p["precision"], p["recall"], p["f1"]) for p in v1_m1["sweep"]]
    assert len(sweep) == len(V1_M1_SWEEP)
    for got, want in zip(sweep, V1_M1_SWEEP, strict=True):
        assert got == pytest.approx(want, abs=1e-6), want

    bands = {b["low"]: b for b in v1_m1["calibration"]}
    assert len(bands) == 10
    for low, band in bands.items():
        items, observed, mean = V1_M1_CALIBRATION.get(round(low, 1), (0, None, None))
        assert band["items"] == items, low
        assert band["observed"] == pytest.approx(observed), low
        assert band["mean_score"] == pytest.approx(mean, abs=1e-6), low

    # v2 knows nothing below its threshold, and no recall anywhere
    v2_sweep = {p["threshold"]: p for p in v2_m1["sweep"]}
    assert v2_sweep[0.45]["precision"] is None
    assert v2_sweep[0.5]["precision"] == 0.5  # 1 / 2
    assert v2_sweep[0.65]["precision"] == 1.0  # 1 / 1
    assert all(p["recall"] is None for p in v2_sweep.values())

    # another target precision moves only the suggested threshold
    relaxed = _groups(env, "--precision", "0.7")[0]  # v1 x m1 again
    assert relaxed["threshold_for_precision"] == 0.65  # precision 0.75 at 0.65
    assert relaxed["target_precision"] == 0.7
    assert relaxed["precision"] == pytest.approx(0.6)

    # without --json: a table, one line per group
    table = subprocess.run(
        [*FLASK, "evaluate"],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert table[0].startswith("policy\tversion\tmodel")
    expected = f"hate\t1\tm1\t7/7\t4/{study.drawn}\t0.600\t0.231-0.882\t0.429\t0.333\t0.500"
    assert table[1] == expected
    assert len(table) == 4


@pytest.mark.integration
def test_the_admin_page_shows_the_figures_and_charts(study: Study) -> None:
    app = study.app
    client = app.test_client()
    login(client, "boss")
    response = client.get("/admin/evaluation?precision=0.7")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    first = html[html.index('id="group-1"') : html.index('id="group-2"')]
    assert "hate v1 <small>m1</small>" in first
    assert (
        '<span class="reviewed-flagged">7</span> of <span class="entered-flagged">7</span>' in first
    )
    assert '<span class="reviewed-audit">4</span>' in first
    assert 'class="precision">0.600' in first
    assert "(95 % CI 0.231\u20130.882)" in first
    assert 'class="recall">0.429' in first  # 3 / 7
    assert 'class="prevalence">0.333' in first  # 7 / 21
    assert 'class="f1">0.500' in first
    assert 'class="best-f1-threshold">0.250' in first
    assert 'class="precision-threshold">0.650' in first  # target 0.7
    # the charts are inline SVG drawn on the server, one line per figure
    for series in ("precision", "recall", "f1"):
        assert f'<polyline class="series-{series}"' in first
    assert first.count('<rect class="band"') == 6  # the six bands with items
    assert "<script" not in html
    third = html[html.index('id="group-3"') :]
    assert 'class="recall">\u2013' in third  # v2 has no audit sample
    assert '<polyline class="series-recall"' not in third
    # RAs may not see it
    ra = app.test_client()
    login(ra, "ann")
    assert ra.get("/admin/evaluation").status_code == 403


@pytest.mark.integration
def test_an_adjudicated_label_is_the_truth_where_there_is_one(study: Study) -> None:
    """Once an admin adjudicates an item, its current (latest) decision wins over the
    coders' majority (here it settles the tie at 0.6 as a violation)."""
    with study.app.app_context():
        [tie] = db.session.execute(
            text("""SELECT classification_id FROM ra_labels GROUP BY classification_id
                    HAVING array_agg(answer ->> 'violates' ORDER BY id) = '{yes,no}'""")
        ).scalars()
        boss = db.session.execute(db.select(User.id).where(User.username == "boss")).scalar_one()
        db.session.execute(
            text("""INSERT INTO ra_adjudications (classification_id, answer, note, decided_by)
                    VALUES (:c, '{"violates": "no"}', 'first look', :u),
                           (:c, '{"violates": "yes"}', 'on second listening', :u)"""),
            {"c": tie, "u": boss},
        )
        db.session.commit()
    v1_m1 = _groups(study.env)[0]
    _check(
        v1_m1,
        {
            "adjudicated": 1,
            "undecided_ties": 0,
            "decided_flagged": 6,
            "positives_flagged": 4,
            "precision": 4 / 6,  # the latest adjudication (yes) counts
            "recall": 0.5,  # TP 4, FN 1 * 4 = 4
            "prevalence": 8 / 22,  # (4 + 4) / (6 * 1 + 4 * 4)
            "f1": 4 / 7,  # 2 * 2/3 * 1/2 / (2/3 + 1/2) = (2/3) / (7/6)
        },
    )


def test_truth_is_the_adjudication_else_the_majority() -> None:
    v = DEFAULT_VERDICT
    assert truth_of([Y, Y, N], v) is Truth.POSITIVE
    assert truth_of([N, U], v) is Truth.NEGATIVE
    assert truth_of([Y, N], v) is Truth.TIE
    assert truth_of([U, None], v) is Truth.UNSURE
    assert truth_of([Y, N], v, adjudicated=N) is Truth.NEGATIVE
    assert truth_of([Y, Y], v, adjudicated=U) is Truth.POSITIVE  # no verdict in it


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) is None
    # x = 0, n = 10: centre = (z^2/20) / (1 + z^2/10) = 0.192073 / 1.384146 = 0.138766;
    # half = z / 1.384146 * sqrt(z^2 / 400) = 1.415987 * 0.097998 = 0.138766
    low, high = wilson_interval(0, 10) or (None, None)
    assert low == pytest.approx(0.0, abs=1e-9)
    assert high == pytest.approx(0.277533, abs=1e-6)


CODEBOOK = """
study: s
version: "1"
fields:
  - id: harmful
    label: Harmful?
    type: single
    options:
      - {value: "1", label: "Yes", key: "y"}
      - {value: "0", label: "No", key: "n"}
      - {value: "?", label: "Unsure", key: "u"}
"""


def test_the_codebook_declares_the_verdict() -> None:
    assert parse_codebook(CODEBOOK).verdict is None  # no violates field: no default
    declared = parse_codebook(
        CODEBOOK + 'verdict: {field: harmful, positive: ["1"], negative: ["0"]}'
    )
    assert declared.verdict == Verdict("harmful", ("1",), ("0",))
    assert declared.verdict.of("?") is None
    with pytest.raises(CodebookError) as err:
        parse_codebook(
            CODEBOOK + 'verdict: {field: harmful, positive: ["1", "x"], negative: ["1"]}'
        )
    assert any("'x' is not an option" in e for e in err.value.errors)
    assert any("cannot be positive and negative" in e for e in err.value.errors)
    with pytest.raises(CodebookError, match="no field 'nope'"):
        parse_codebook(CODEBOOK + "verdict: {field: nope, positive: [a], negative: [b]}")
    default = parse_codebook(
        re.sub("harmful", "violates", CODEBOOK).replace('"1"', '"yes"').replace('"0"', '"no"')
    )
    assert default.verdict == DEFAULT_VERDICT
