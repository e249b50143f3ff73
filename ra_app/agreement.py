"""Inter-rater reliability on double-coded items.

Input is what the app stores, flattened to rows of ``(item_id, coder_id, field,
value)``: one row per coder, item and codebook field. ``rows_from_answers`` makes
them from whole answers (``{"violates": "yes", "categories": [...]}``). A value of
None is a missing coding (the coder left the field empty); for a multi-choice field
a list of chosen options (or one row per chosen option), where an empty list means
"none of them" and is a real coding.

For each categorical field the report gives:

- ``overall``: a single-choice field's values as nominal categories; a multi-choice
  field's options pooled, each (item, option) one binary present/absent unit.
- ``labels``: one binary present/absent measure per option (for a single-choice
  field, the option against the rest), so a study sees which labels coders agree on.

Each measure carries Krippendorff's alpha (nominal, from the ``krippendorff``
package; any number of coders, missing codings allowed), Cohen's kappa per pair of
coders, observed agreement, and the item, unit and coder counts behind them. Cohen's
kappa is defined for one pair of coders; when the double-coded items were shared out
among several pairs (the usual case with a pool of RAs) the headline kappa is Light's
kappa, the mean of the pairwise Cohen's kappas, and ``kappa_method`` says which.

Where a figure is undefined (no double-coded items, every rating in one category,
no pair with two codings) it is None with a reason, never NaN or an exception.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import krippendorff
import numpy as np

from ra_app.codebook import Codebook, FieldType

PRESENT = "present"
ABSENT = "absent"
_MULTI_VALUE_TYPES = (list, tuple, set, frozenset)


class KappaMethod(StrEnum):
    COHEN = "cohen"  # one pair of coders coded every pairable unit
    LIGHT = "light"  # mean of pairwise Cohen's kappas (Light, 1971)


class Coding(NamedTuple):
    item_id: Hashable
    coder_id: Hashable
    field: str
    value: Any


@dataclass(frozen=True)
class PairKappa:
    """Cohen's kappa between two coders over the units both coded."""

    coder_a: Hashable
    coder_b: Hashable
    units: int
    observed_agreement: float
    kappa: float | None
    reason: str | None  # why kappa is None


@dataclass(frozen=True)
class Agreement:
    """Reliability of one measure (a field, or one label of a field)."""

    items: int  # items with at least two codings of this measure
    units: int  # pairable units: items, or (item, option) pairs when pooled
    coders: int  # distinct coders among the pairable units
    codings: int  # codings in pairable units (alpha's n)
    unpaired_items: int  # items with one coding only (one coder, or the other left it empty)
    # None, with the reason beside it, where a figure cannot be computed.
    observed_agreement: float | None = None  # agreeing pairs' share (coincidence diagonal / n)
    alpha: float | None = None  # Krippendorff's alpha, nominal
    alpha_reason: str | None = None
    kappa: float | None = None
    kappa_method: KappaMethod | None = None
    kappa_reason: str | None = None
    pairs: tuple[PairKappa, ...] = ()


@dataclass(frozen=True)
class LabelAgreement:
    option: str
    agreement: Agreement


@dataclass(frozen=True)
class FieldAgreement:
    field: str
    type: FieldType  # SINGLE or MULTI
    overall: Agreement
    labels: tuple[LabelAgreement, ...]

    def label(self, option: str) -> Agreement:
        for la in self.labels:
            if la.option == option:
                return la.agreement
        raise KeyError(f"{self.field}: no label {option!r}")


@dataclass(frozen=True)
class AgreementReport:
    items: int  # items with any coding
    double_coded_items: int  # items coded by at least two coders (any field)
    coders: int
    fields: tuple[FieldAgreement, ...]
    skipped_fields: tuple[tuple[str, str], ...]  # (field, why it has no figures)

    def field(self, field_id: str) -> FieldAgreement:
        for f in self.fields:
            if f.field == field_id:
                return f
        raise KeyError(f"no agreement figures for field {field_id!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data for the admin page and the API."""
        return asdict(self)


@dataclass(frozen=True)
class Disagreement:
    """A field on which the coders of one item differ: a case for adjudication."""

    item_id: Hashable
    field: str
    values: dict[Hashable, Any]  # coder -> value (multi-choice: sorted list)


# --- input -----------------------------------------------------------------------


def rows_from_answers(
    answers: Iterable[tuple[Hashable, Hashable, Mapping[str, Any]]],
) -> list[Coding]:
    """Flatten (item_id, coder_id, answer dict) into codings, one per field."""
    return [
        Coding(item_id, coder_id, field, value)
        for item_id, coder_id, answer in answers
        for field, value in answer.items()
    ]


class _FieldData:
    """Codings of one field: item -> coder -> value (a frozenset for multi-choice)."""

    def __init__(self, field: str, ftype: FieldType, options: tuple[str, ...]) -> None:
        self.field = field
        self.type = ftype
        self.options = options  # from the codebook, or () to use what was coded
        self.codings: dict[Hashable, dict[Hashable, Any]] = defaultdict(dict)

    def observed_options(self) -> tuple[str, ...]:
        if self.options:
            return self.options
        seen: set[Any] = set()
        for by_coder in self.codings.values():
            for v in by_coder.values():
                seen.update(v if self.type is FieldType.MULTI else (v,))
        return tuple(sorted(seen, key=_order))


def _collect(
    rows: Iterable[Any], codebook: Codebook | None
) -> tuple[dict[str, _FieldData], list[tuple[str, str]], set[Hashable], dict[Hashable, set]]:
    rows = [_as_coding(i, r) for i, r in enumerate(rows)]
    coders_of_item: dict[Hashable, set[Hashable]] = defaultdict(set)
    all_coders: set[Hashable] = set()
    skipped: dict[str, str] = {}
    fields: dict[str, _FieldData] = {}
    if codebook is not None:  # every categorical field gets figures, coded or not
        for spec in codebook.fields:
            data = _new_field(spec.id, codebook, set(), skipped)
            if data is not None:
                fields[spec.id] = data
    inferred_multi = {
        r.field for r in rows if codebook is None and isinstance(r.value, _MULTI_VALUE_TYPES)
    }
    for i, r in enumerate(rows):
        coders_of_item[r.item_id].add(r.coder_id)
        all_coders.add(r.coder_id)
        data = fields.get(r.field)
        if data is None and r.field not in skipped:
            data = _new_field(r.field, codebook, inferred_multi, skipped)
            if data is not None:
                fields[r.field] = data
        if data is not None:
            _add(data, i, r)
    return fields, sorted(skipped.items()), all_coders, coders_of_item


def _as_coding(index: int, row: Any) -> Coding:
    try:
        item_id, coder_id, field, value = row
    except (TypeError, ValueError):
        raise ValueError(
            f"row {index}: expected (item_id, coder_id, field, value), got {row!r}"
        ) from None
    if not isinstance(field, str):
        raise ValueError(f"row {index}: field must be a string, got {field!r}")
    for what, v in (("item_id", item_id), ("coder_id", coder_id)):
        if v is None or not isinstance(v, Hashable):
            raise ValueError(f"row {index}: {what} must be a hashable id, got {v!r}")
    return Coding(item_id, coder_id, field, value)


def _new_field(
    field: str, codebook: Codebook | None, inferred_multi: set[str], skipped: dict[str, str]
) -> _FieldData | None:
    if codebook is None:
        ftype = FieldType.MULTI if field in inferred_multi else FieldType.SINGLE
        return _FieldData(field, ftype, ())
    try:
        spec = codebook.field(field)
    except KeyError:
        skipped[field] = f"not a field of codebook {codebook.study!r} v{codebook.version}"
        return None
    if spec.type is FieldType.TEXT:
        skipped[field] = "free text has no categories to agree on"
        return None
    return _FieldData(field, spec.type, spec.option_values)


def _add(data: _FieldData, index: int, r: Coding) -> None:
    by_coder = data.codings[r.item_id]
    if r.value is None:  # left empty: the item still counts, the coding does not
        return
    if data.type is FieldType.MULTI:
        chosen = r.value if isinstance(r.value, _MULTI_VALUE_TYPES) else (r.value,)
        for v in chosen:
            _check_option(data, index, r, v)
        # one row per chosen option, or one row holding the list: both add up
        by_coder[r.coder_id] = by_coder.get(r.coder_id, frozenset()) | frozenset(chosen)
        return
    if isinstance(r.value, _MULTI_VALUE_TYPES) or not isinstance(r.value, Hashable):
        raise ValueError(
            f"row {index}: field {r.field!r} is single-choice, got {type(r.value).__name__} "
            f"{r.value!r}"
        )
    _check_option(data, index, r, r.value)
    before = by_coder.get(r.coder_id)
    if before is not None and before != r.value:
        raise ValueError(
            f"row {index}: coder {r.coder_id!r} gave item {r.item_id!r} two values for "
            f"single-choice field {r.field!r}: {before!r} and {r.value!r}"
        )
    by_coder[r.coder_id] = r.value


def _check_option(data: _FieldData, index: int, r: Coding, value: Any) -> None:
    if data.options and value not in data.options:
        raise ValueError(
            f"row {index}: {value!r} is not an option of field {r.field!r} "
            f"({', '.join(data.options)})"
        )


# --- report ----------------------------------------------------------------------


def agreement_report(rows: Iterable[Any], codebook: Codebook | None = None) -> AgreementReport:
    """Agreement figures for every categorical field in ``rows``.

    With a codebook, field types and options come from it (text fields and fields
    it lacks are listed in ``skipped_fields``; a value outside a field's options is a
    ValueError). Without one, a field whose values include a list is multi-choice and
    options are the values seen.
    """
    fields, skipped, coders, coders_of_item = _collect(rows, codebook)
    order = [f.id for f in codebook.fields] if codebook else sorted(fields)
    results = [_field_agreement(fields[f]) for f in order if f in fields]
    return AgreementReport(
        items=len(coders_of_item),
        double_coded_items=sum(1 for c in coders_of_item.values() if len(c) >= 2),
        coders=len(coders),
        fields=tuple(results),
        skipped_fields=tuple(skipped),
    )


def _field_agreement(data: _FieldData) -> FieldAgreement:
    options = data.observed_options()
    per_label: dict[str, dict[Hashable, dict[Hashable, str]]] = {o: {} for o in options}
    for item, by_coder in data.codings.items():
        for option in options:
            per_label[option][item] = {
                coder: PRESENT if _has(data.type, value, option) else ABSENT
                for coder, value in by_coder.items()
            }
    labels = tuple(LabelAgreement(o, measure(per_label[o])) for o in options)
    if data.type is FieldType.MULTI:
        pooled = {
            (item, option): per_label[option][item] for option in options for item in data.codings
        }
        overall = measure(pooled, item_of=lambda unit: unit[0])
    else:
        overall = measure(data.codings)
    return FieldAgreement(data.field, data.type, overall, labels)


def _has(ftype: FieldType, value: Any, option: str) -> bool:
    return option in value if ftype is FieldType.MULTI else value == option


def measure(
    units: Mapping[Hashable, Mapping[Hashable, Hashable]],
    *,
    item_of: Callable[[Hashable], Hashable] | None = None,
) -> Agreement:
    """Alpha, kappa and counts for units of nominal codings: unit -> coder -> value.

    ``item_of`` maps a unit to its item when units are finer than items (pooled
    options). Units with one coding (a single coder, or the other left the field
    empty) count as unpaired; units with none are ignored.
    """
    to_item = item_of or (lambda unit: unit)
    pairable = {u: c for u, c in units.items() if len(c) >= 2}
    single_items = {to_item(u) for u, c in units.items() if len(c) == 1}
    pair_items = {to_item(u) for u in pairable}
    unpaired = len(single_items - pair_items)
    if not pairable:
        reason = (
            "no double-coded items"
            if not unpaired
            else f"no item has two codings ({unpaired} coded once or left empty)"
        )
        return Agreement(
            items=0,
            units=0,
            coders=0,
            codings=0,
            unpaired_items=unpaired,
            alpha_reason=reason,
            kappa_reason=reason,
        )
    categories = sorted({v for c in pairable.values() for v in c.values()}, key=_order)
    counts = np.array(
        [[Counter(c.values())[k] for k in categories] for c in pairable.values()], dtype=np.int64
    )
    alpha, alpha_reason = _alpha(counts, categories)
    pairs = _pair_kappas(pairable)
    kappa, method, kappa_reason = _headline_kappa(pairs)
    return Agreement(
        items=len(pair_items),
        units=len(pairable),
        coders=len({coder for c in pairable.values() for coder in c}),
        codings=int(counts.sum()),
        unpaired_items=unpaired,
        observed_agreement=_observed_agreement(counts),
        alpha=alpha,
        alpha_reason=alpha_reason,
        kappa=kappa,
        kappa_method=method,
        kappa_reason=kappa_reason,
        pairs=pairs,
    )


def _observed_agreement(counts: np.ndarray) -> float:
    """Diagonal of the coincidence matrix over n: sum_u sum_c n_uc(n_uc-1)/(m_u-1) / n."""
    m = counts.sum(axis=1)
    agreeing = (counts * (counts - 1)).sum(axis=1) / (m - 1)
    return float(agreeing.sum() / m.sum())


def _alpha(counts: np.ndarray, categories: list[Any]) -> tuple[float | None, str | None]:
    if len(categories) < 2:
        return None, (
            f"every rating is {categories[0]!r}: with no variation, chance-corrected "
            "agreement is undefined (observed agreement is 1)"
        )
    value = float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))
    if not math.isfinite(value):
        return None, "alpha is undefined for these codings"
    return value, None


def _pair_kappas(pairable: Mapping[Hashable, Mapping[Hashable, Hashable]]) -> tuple[PairKappa, ...]:
    tables: dict[tuple[Hashable, Hashable], list[tuple[Any, Any]]] = defaultdict(list)
    for codings in pairable.values():
        for a, b in itertools.combinations(sorted(codings, key=_order), 2):
            tables[(a, b)].append((codings[a], codings[b]))
    return tuple(_cohen_kappa(a, b, tables[(a, b)]) for a, b in sorted(tables, key=_pair_order))


def _cohen_kappa(a: Hashable, b: Hashable, pairs: list[tuple[Any, Any]]) -> PairKappa:
    """kappa = (p_o - p_e) / (1 - p_e), kept in integers: (n*agree - S) / (n^2 - S),
    where S = sum_k a_k * b_k over the coders' marginal counts."""
    n = len(pairs)
    agree = sum(1 for x, y in pairs if x == y)
    marg_a = Counter(x for x, _ in pairs)
    marg_b = Counter(y for _, y in pairs)
    chance = sum(marg_a[k] * marg_b[k] for k in marg_a)
    if chance == n * n:
        only = next(iter(marg_a))
        reason = (
            f"both coders rated all {n} shared units {only!r}: kappa is undefined "
            "(chance agreement is 1)"
        )
        return PairKappa(a, b, n, agree / n, None, reason)
    kappa = (n * agree - chance) / (n * n - chance)
    return PairKappa(a, b, n, agree / n, kappa, None)


def _headline_kappa(
    pairs: tuple[PairKappa, ...],
) -> tuple[float | None, KappaMethod | None, str | None]:
    if len(pairs) == 1:
        p = pairs[0]
        return p.kappa, KappaMethod.COHEN, p.reason
    defined = [p.kappa for p in pairs if p.kappa is not None]
    if not defined:
        return None, KappaMethod.LIGHT, f"kappa is undefined for all {len(pairs)} coder pairs"
    return sum(defined) / len(defined), KappaMethod.LIGHT, None


# --- adjudication ------------------------------------------------------------------


def disagreements(rows: Iterable[Any], codebook: Codebook | None = None) -> list[Disagreement]:
    """Items whose coders gave different values to a categorical field, for adjudication.

    Ordered by item then by codebook field order (or field name without a codebook).
    """
    fields, _, _, _ = _collect(rows, codebook)
    order = [f.id for f in codebook.fields] if codebook else sorted(fields)
    found: list[Disagreement] = []
    for field in (f for f in order if f in fields):
        data = fields[field]
        for item, by_coder in data.codings.items():
            if len(by_coder) >= 2 and len(set(by_coder.values())) > 1:
                values = {
                    c: sorted(v, key=_order) if data.type is FieldType.MULTI else v
                    for c, v in sorted(by_coder.items(), key=lambda cv: _order(cv[0]))
                }
                found.append(Disagreement(item, field, values))
    found.sort(key=lambda d: (_order(d.item_id), order.index(d.field)))
    return found


def _order(value: Any) -> tuple[str, Any]:
    """Sort key for ids and values of mixed types (ints before strings, then by value)."""
    return (type(value).__name__, value)


def _pair_order(pair: tuple[Hashable, Hashable]) -> tuple[tuple[str, Any], tuple[str, Any]]:
    return (_order(pair[0]), _order(pair[1]))
