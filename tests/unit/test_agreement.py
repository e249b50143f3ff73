"""Agreement figures checked against values worked out by hand.

Notation for Krippendorff's alpha (nominal): o is the coincidence matrix, where an
item coded by m coders adds 1/(m-1) for every ordered pair of its values; n_c are
its column sums and n their total. Then
    D_o = sum of off-diagonal o / n
    D_e = sum over c != k of n_c * n_k / (n - 1), divided by n
    alpha = 1 - D_o / D_e
Cohen's kappa for two coders: p_o = share of agreeing items, p_e = sum over
categories of (share A gave it) * (share B gave it), kappa = (p_o - p_e) / (1 - p_e).
"""

from __future__ import annotations

import json

import pytest

from ra_app.agreement import (
    Coding,
    KappaMethod,
    agreement_report,
    disagreements,
    rows_from_answers,
)
from ra_app.codebook import FieldType, load_codebook, parse_codebook


def _two_coders(field: str, pairs: list[tuple[object, object]]) -> list[tuple]:
    rows: list[tuple] = []
    for item, (a, b) in enumerate(pairs, start=1):
        rows += [(item, "A", field, a), (item, "B", field, b)]
    return rows


def test_kappa_and_raw_agreement_diverge_on_a_skewed_2x2_table() -> None:
    # 10 items, both coders say "yes" almost always:
    #               B yes  B no
    #       A yes     8      1      A: yes 9, no 1
    #       A no      1      0      B: yes 9, no 1
    # p_o = 8/10 = 0.80 (looks good)
    # p_e = 0.9*0.9 + 0.1*0.1 = 0.82
    # kappa = (0.80 - 0.82) / (1 - 0.82) = -0.02 / 0.18 = -1/9 = -0.1111 (worse than chance)
    #
    # alpha: coincidences   yes   no
    #                 yes    16    2     (8 agreeing items x 2 ordered pairs; 2 mixed items)
    #                 no      2    0     n_yes = 18, n_no = 2, n = 20
    # D_o = 4/20 = 0.2; D_e = 2 * 18*2/19 / 20 = 72/380
    # alpha = 1 - 0.2 / (72/380) = 1 - 76/72 = -1/18 = -0.0556
    rows = _two_coders("violates", [("yes", "yes")] * 8 + [("yes", "no"), ("no", "yes")])
    overall = agreement_report(rows).field("violates").overall

    assert overall.observed_agreement == pytest.approx(0.8)
    assert overall.kappa == pytest.approx(-1 / 9)
    assert overall.kappa_method is KappaMethod.COHEN
    assert overall.alpha == pytest.approx(-1 / 18)
    assert (overall.items, overall.units, overall.coders, overall.codings) == (10, 10, 2, 20)
    assert overall.unpaired_items == 0
    (pair,) = overall.pairs
    assert (pair.coder_a, pair.coder_b, pair.units) == ("A", "B", 10)


def test_three_category_field_and_its_one_vs_rest_labels() -> None:
    # items: (yes,yes) (yes,yes) (no,no) (no,unsure) (unsure,unsure) (yes,no)
    # kappa: agree 4 of 6, p_o = 4/6
    #        A: yes 3, no 2, unsure 1;  B: yes 2, no 2, unsure 2
    #        p_e = (3*2 + 2*2 + 1*2) / 36 = 12/36 = 1/3
    #        kappa = (4/6 - 1/3) / (2/3) = 0.5
    # alpha: coincidences    yes  no  unsure
    #                  yes     4   1    0      n_yes = 5
    #                  no      1   2    1      n_no = 4
    #                  unsure  0   1    2      n_unsure = 3, n = 12
    #        D_o = 4/12; D_e = 2 * (5*4 + 5*3 + 4*3) / 11 / 12 = 94/132
    #        alpha = 1 - (4/12) / (94/132) = 1 - 528/1128 = 25/47 = 0.5319
    rows = _two_coders(
        "violates",
        [
            ("yes", "yes"),
            ("yes", "yes"),
            ("no", "no"),
            ("no", "unsure"),
            ("unsure", "unsure"),
            ("yes", "no"),
        ],
    )
    field = agreement_report(rows).field("violates")

    assert field.type is FieldType.SINGLE
    assert field.overall.kappa == pytest.approx(0.5)
    assert field.overall.alpha == pytest.approx(25 / 47)
    assert field.overall.observed_agreement == pytest.approx(4 / 6)
    # label "yes" against the rest (P = yes, R = rest):
    #               B P   B R
    #       A P      2     1      A: P 3, R 3
    #       A R      0     3      B: P 2, R 4
    # p_o = 5/6, p_e = (3*2 + 3*4)/36 = 1/2, kappa = (5/6 - 1/2) / (1/2) = 2/3
    # alpha: o_PP = 4, o_PR = o_RP = 1, o_RR = 6; n_P = 5, n_R = 7, n = 12
    #        D_o = 2/12; D_e = 2*5*7/11/12 = 70/132; alpha = 1 - 22/70 = 24/35
    assert [la.option for la in field.labels] == ["no", "unsure", "yes"]
    assert field.label("yes").kappa == pytest.approx(2 / 3)
    assert field.label("yes").alpha == pytest.approx(24 / 35)


def test_multi_choice_options_are_binary_labels_and_pool_for_overall() -> None:
    # item 1: A [hate]          B [hate]
    # item 2: A [hate, threat]  B [threat]
    # item 3: A []              B [hate]      (an empty choice is a real coding)
    #
    # hate (P present, X absent): A = P P X, B = P X P
    #               B P   B X
    #       A P      1     1      A: P 2, X 1;  B: P 2, X 1
    #       A X      1     0
    #   p_o = 1/3, p_e = (2*2 + 1*1)/9 = 5/9, kappa = (3/9 - 5/9) / (4/9) = -0.5
    #   alpha: o_PP = 2, o_PX = o_XP = 2, o_XX = 0; n_P = 4, n_X = 2, n = 6
    #          D_o = 4/6; D_e = 2*4*2/5/6 = 16/30; alpha = 1 - (4/6)/(16/30) = -0.25
    # threat: A = X P X, B = X P X: p_o = 1, p_e = 5/9, kappa = 1; D_o = 0, alpha = 1
    # overall, 6 (item, option) units:
    #               B P   B X
    #       A P      2     1      A: P 3, X 3;  B: P 3, X 3
    #       A X      1     2
    #   p_o = 4/6, p_e = 1/2, kappa = (2/3 - 1/2) / (1/2) = 1/3
    #   alpha: o_PP = 4, o_XX = 4, o_PX = o_XP = 2; n_P = n_X = 6, n = 12
    #          D_o = 4/12; D_e = 2*6*6/11/12 = 6/11; alpha = 1 - (1/3)/(6/11) = 7/18
    rows = [
        (1, "A", "categories", ["hate"]),
        (1, "B", "categories", ["hate"]),
        (2, "A", "categories", ["hate", "threat"]),
        (2, "B", "categories", ["threat"]),
        (3, "A", "categories", []),
        (3, "B", "categories", ["hate"]),
    ]
    field = agreement_report(rows).field("categories")

    assert field.type is FieldType.MULTI
    hate, threat = field.label("hate"), field.label("threat")
    assert hate.kappa == pytest.approx(-0.5)
    assert hate.alpha == pytest.approx(-0.25)
    assert threat.kappa == pytest.approx(1.0)
    assert threat.alpha == pytest.approx(1.0)
    assert field.overall.kappa == pytest.approx(1 / 3)
    assert field.overall.alpha == pytest.approx(7 / 18)
    assert (field.overall.items, field.overall.units, field.overall.codings) == (3, 6, 12)


def test_one_row_per_chosen_option_adds_up_like_a_list() -> None:
    as_lists = [(1, "A", "categories", ["hate", "threat"]), (1, "B", "categories", ["hate"])]
    as_rows = [
        (1, "A", "categories", "hate"),
        (1, "A", "categories", "threat"),
        (1, "B", "categories", "hate"),
    ]
    codebook = parse_codebook(
        """
study: s
version: 1
fields:
  - id: categories
    label: C
    type: multi
    options:
      - {value: hate, label: Hate, key: h}
      - {value: threat, label: Threat, key: t}
"""
    )
    a = agreement_report(as_lists, codebook).to_dict()
    b = agreement_report(as_rows, codebook).to_dict()
    assert a == b
    assert a["fields"][0]["overall"]["observed_agreement"] == pytest.approx(0.5)


def test_three_coders_with_missing_codings_use_alpha_and_lights_kappa() -> None:
    # item 1: A yes, B yes, C yes      (m = 3: each ordered pair weighs 1/2)
    # item 2: A yes, B no              (C never saw it)
    # item 3: A no,  B no,  C empty    (C left the field empty: not a coding)
    # item 4: A yes                    (single-coded: unpaired)
    # coincidences: item 1 adds 6 yes-yes pairs * 1/2 = 3; item 2 one yes-no each way;
    # item 3 two no-no pairs:
    #                  yes  no
    #          yes      3    1      n_yes = 4
    #          no       1    2      n_no = 3, n = 7
    # D_o = 2/7; D_e = 2 * 4*3/6 / 7 = 4/7; alpha = 1 - (2/7)/(4/7) = 0.5
    # observed agreement = (3 + 2)/7
    # pairs: A-B on items 1-3: (y,y) (y,n) (n,n): p_o = 2/3, A: y 2 n 1, B: y 1 n 2,
    #        p_e = (2*1 + 1*2)/9 = 4/9, kappa = (6/9 - 4/9)/(5/9) = 0.4
    #        A-C and B-C share item 1 only, both "yes": p_e = 1, kappa undefined
    # Light's kappa = mean of the defined pairwise kappas = 0.4
    rows = [
        (1, "A", "v", "yes"),
        (1, "B", "v", "yes"),
        (1, "C", "v", "yes"),
        (2, "A", "v", "yes"),
        (2, "B", "v", "no"),
        (3, "A", "v", "no"),
        (3, "B", "v", "no"),
        (3, "C", "v", None),
        (4, "A", "v", "yes"),
    ]
    report = agreement_report(rows)
    overall = report.field("v").overall

    assert overall.alpha == pytest.approx(0.5)
    assert overall.observed_agreement == pytest.approx(5 / 7)
    assert overall.kappa == pytest.approx(0.4)
    assert overall.kappa_method is KappaMethod.LIGHT
    assert (overall.items, overall.coders, overall.codings, overall.unpaired_items) == (3, 3, 7, 1)
    by_pair = {(p.coder_a, p.coder_b): p for p in overall.pairs}
    assert by_pair["A", "B"].kappa == pytest.approx(0.4)
    assert by_pair["A", "C"].kappa is None
    assert "chance agreement is 1" in (by_pair["A", "C"].reason or "")
    assert (report.items, report.double_coded_items, report.coders) == (4, 3, 3)


def test_published_krippendorff_example_through_rows() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers,
    # 12 units, values 1-5 with missing ones; nominal alpha = 0.743 (also in the
    # krippendorff package's doctest). Checks the rows -> value counts conversion.
    nan = None
    data = {
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        "C": [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    }
    rows = [
        (unit, coder, "v", value)
        for coder, values in data.items()
        for unit, value in enumerate(values)
    ]
    assert agreement_report(rows).field("v").overall.alpha == pytest.approx(0.743, abs=5e-4)


def test_no_double_coded_items_give_none_with_a_reason() -> None:
    rows = [(1, "A", "v", "yes"), (2, "B", "v", "no")]
    overall = agreement_report(rows).field("v").overall
    assert overall.alpha is None
    assert overall.kappa is None
    assert overall.observed_agreement is None
    assert "no item has two codings (2 coded once" in (overall.alpha_reason or "")
    assert overall.unpaired_items == 2
    assert agreement_report([]).fields == ()


def test_every_rating_in_one_category_gives_none_with_a_reason() -> None:
    overall = agreement_report(_two_coders("v", [("no", "no")] * 3)).field("v").overall
    assert overall.observed_agreement == 1.0
    assert overall.alpha is None
    assert "every rating is 'no'" in (overall.alpha_reason or "")
    assert overall.kappa is None
    assert "kappa is undefined" in (overall.kappa_reason or "")


def test_coder_who_left_the_field_empty_leaves_the_item_unpaired() -> None:
    overall = agreement_report([(1, "A", "v", "yes"), (1, "B", "v", None)]).field("v").overall
    assert overall.alpha is None
    assert overall.unpaired_items == 1
    assert "left empty" in (overall.alpha_reason or "")


def test_opposite_coders_give_kappa_zero_not_an_error() -> None:
    # A always yes, B always no: p_o = 0, p_e = 1*0 + 0*1 = 0, kappa = 0
    # alpha: n_yes = n_no = 4, n = 8, D_o = 1, D_e = 2*4*4/7/8 = 4/7, alpha = 1 - 7/4
    overall = agreement_report(_two_coders("v", [("yes", "no")] * 4)).field("v").overall
    assert overall.kappa == pytest.approx(0.0)
    assert overall.alpha == pytest.approx(-0.75)


def test_codebook_gives_field_types_skips_text_and_lists_uncoded_fields() -> None:
    codebook = load_codebook()
    answers = [
        (
            10,
            1,
            {"violates": "yes", "severity": "high", "categories": ["hate_speech"], "notes": "loud"},
        ),
        (10, 2, {"violates": "yes", "severity": "medium", "categories": [], "notes": None}),
        (11, 1, {"violates": "no", "severity": None, "categories": [], "notes": None}),
        (11, 2, {"violates": "no", "severity": None, "categories": []}),
    ]
    report = agreement_report(rows_from_answers(answers), codebook)

    assert [f.field for f in report.fields] == ["violates", "severity", "categories"]
    assert report.skipped_fields == (("notes", "free text has no categories to agree on"),)
    # violates: (yes,yes) (no,no): p_o = 1, A: yes 1 no 1, B: yes 1 no 1, p_e = 1/2,
    # kappa = (1 - 1/2)/(1/2) = 1
    assert report.field("violates").overall.kappa == pytest.approx(1.0)


def test_codebook_order_and_labels_for_options_nobody_chose() -> None:
    codebook = load_codebook()
    rows = _two_coders("violates", [("yes", "no"), ("no", "no")])
    report = agreement_report(rows, codebook)
    unsure = report.field("violates").label("unsure")
    assert unsure.alpha is None
    assert "every rating is 'absent'" in (unsure.alpha_reason or "")
    assert [la.option for la in report.field("categories").labels] == [
        "hate_speech",
        "harassment",
        "violent_threat",
        "self_harm",
        "sexual",
        "other",
    ]
    assert report.field("categories").overall.alpha_reason == "no double-coded items"
    json.dumps(report.to_dict())  # templates and the API get plain data


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(1, "A", "v")], "row 0: expected (item_id, coder_id, field, value)"),
        ([(1, None, "v", "yes")], "row 0: coder_id must be a hashable id"),
        ([(1, "A", 3, "yes")], "row 0: field must be a string"),
        (
            [(1, "A", "v", "yes"), (1, "A", "v", "no")],
            "row 1: coder 'A' gave item 1 two values for single-choice field 'v'",
        ),
        ([(1, "A", "v", {"x": 1})], "row 0: field 'v' is single-choice"),
    ],
)
def test_bad_rows_raise_clear_errors(rows: list[tuple], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        agreement_report(rows)


def test_value_outside_the_codebook_is_an_error() -> None:
    with pytest.raises(ValueError, match="'maybe' is not an option of field 'violates'"):
        agreement_report([(1, "A", "violates", "maybe")], load_codebook())


def test_disagreements_list_items_for_adjudication() -> None:
    rows = [
        Coding(1, "A", "violates", "yes"),
        Coding(1, "B", "violates", "yes"),
        Coding(2, "A", "violates", "yes"),
        Coding(2, "B", "violates", "no"),
        Coding(2, "A", "categories", ["harassment", "hate_speech"]),
        Coding(2, "B", "categories", ["hate_speech", "harassment"]),
        Coding(3, "B", "categories", ["other"]),
        Coding(3, "A", "categories", []),
        Coding(4, "A", "violates", "no"),
    ]
    found = disagreements(rows, load_codebook())
    assert [(d.item_id, d.field, d.values) for d in found] == [
        (2, "violates", {"A": "yes", "B": "no"}),
        (3, "categories", {"A": [], "B": ["other"]}),
    ]
