"""Codebook loading, validation errors with paths, and answer cleaning."""

from __future__ import annotations

import json
import textwrap
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from ra_app.codebook import (
    DEFAULT_CODEBOOK_PATH,
    RESERVED_KEYS,
    AnswerError,
    CodebookError,
    FieldType,
    codebook_from_dict,
    load_codebook,
    parse_codebook,
    validate_answer,
)


def _yaml(body: str) -> str:
    return "study: Test study\nversion: 1\nfields:\n" + textwrap.indent(
        textwrap.dedent(body).strip("\n"), "  "
    )


GOOD = _yaml(
    """
    - id: violates
      label: Violates?
      type: single
      required: true
      options:
        - {value: yes, label: "Yes", key: y}
        - {value: no, label: "No", key: n}
    - id: tags
      label: Tags
      type: multi
      options:
        - {value: a, label: A, key: "1"}
        - {value: b, label: B, key: 2}
        - {value: c, label: C, key: C}
    - id: notes
      label: Notes
      type: text
      max_length: 10
    """
)


def _errors(text: str) -> tuple[str, ...]:
    with pytest.raises(CodebookError) as info:
        parse_codebook(text)
    return info.value.errors


def test_default_codebook_loads_with_the_moderation_fields() -> None:
    cb = load_codebook()
    assert cb == load_codebook(DEFAULT_CODEBOOK_PATH)
    assert [(f.id, f.type) for f in cb.fields] == [
        ("violates", FieldType.SINGLE),
        ("severity", FieldType.SINGLE),
        ("categories", FieldType.MULTI),
        ("notes", FieldType.TEXT),
    ]
    assert cb.field("violates").option_values == ("yes", "no", "unsure")
    assert cb.field("violates").required
    keys = [o.key for f in cb.fields for o in f.options]
    assert len(keys) == len(set(keys))
    assert not set(keys) & set(RESERVED_KEYS)


def test_yes_and_no_stay_strings_and_numbers_become_text() -> None:
    cb = parse_codebook(GOOD)
    assert cb.version == "1"
    assert cb.field("violates").option_values == ("yes", "no")
    assert [o.key for o in cb.field("tags").options] == ["1", "2", "c"]  # 'C' lower-cased
    assert cb.field("notes").max_length == 10
    assert cb.field("notes").options == ()


def test_codebook_is_frozen_and_to_dict_is_json_ready() -> None:
    cb = parse_codebook(GOOD)
    with pytest.raises(FrozenInstanceError):
        cb.study = "other"  # type: ignore[misc]
    data = json.loads(json.dumps(cb.to_dict()))
    assert data["fields"][0]["type"] == "single"
    assert data["fields"][0]["options"][0] == {
        "value": "yes",
        "label": "Yes",
        "description": "",
        "key": "y",
    }
    assert data["shortcuts"]["y"] == ["violates", "yes"]
    assert data["reserved_keys"][" "].startswith("play or pause")
    assert codebook_from_dict(json.loads(json.dumps(_raw(GOOD)))) == cb


def _raw(text: str) -> dict:
    import yaml

    from ra_app.codebook import _Yaml12Loader

    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506


def test_duplicate_shortcut_names_both_paths() -> None:
    text = _yaml(
        """
        - id: a
          label: A
          type: single
          options: [{value: x, label: X, key: v}, {value: y, label: Y, key: w}]
        - id: b
          label: B
          type: multi
          options: [{value: p, label: P, key: q}]
        - id: c
          label: C
          type: multi
          options: [{value: r, label: R, key: r}, {value: s, label: S, key: V}]
        """
    )
    assert _errors(text) == (
        "fields[2].options[1].key: duplicate shortcut 'v' (also fields[0].options[0])",
    )


@pytest.mark.parametrize("key", [" ", "s", "S", "j", "k", "?"])
def test_reserved_navigation_keys_cannot_be_shortcuts(key: str) -> None:
    text = _yaml(
        f"""
        - id: a
          label: A
          type: single
          options: [{{value: x, label: X, key: "{key}"}}, {{value: y, label: Y, key: y}}]
        """
    )
    (error,) = _errors(text)
    assert error.startswith("fields[0].options[0].key: shortcut")
    assert "reserved for navigation" in error


def test_every_reserved_key_is_documented() -> None:
    assert all(isinstance(v, str) and len(v) > 8 for v in RESERVED_KEYS.values())
    assert {" ", "Enter", "s", "j", "k", "?"} <= set(RESERVED_KEYS)


def test_all_problems_are_reported_at_once_with_paths() -> None:
    text = textwrap.dedent(
        """
        study: ""
        version: 1.10
        colour: blue
        fields:
          - id: Bad-Id
            label: X
            type: single
            requried: true
            options:
              - {value: only, label: Only, key: o}
          - id: dup
            label: D
            type: multi
            options:
              - {value: true, label: T, key: tt}
              - {value: " padded", label: P, key: p}
          - id: dup
            label: ""
            type: text
            required: "yes"
            max_length: 0
            options: []
          - id: kind
            label: K
            type: choice
          - just a string
        """
    )
    errors = _errors(text)
    assert errors == (
        "(top): unknown key 'colour' (allowed: fields, instructions, study, verdict, version)",
        "study: must not be empty",
        "version: expected text or an integer (quote it), got float 1.1",
        "fields[0]: unknown key 'requried' (allowed: description, id, label, max_length, "
        "options, required, type)",
        "fields[0].id: expected a lower-case identifier like 'severity' (letters, digits, _; "
        "max 64), got 'Bad-Id'",
        "fields[0].options: a single field needs a list of at least 2 options",
        "fields[1].options[0].value: expected text (quote it), got boolean True",
        "fields[1].options[0].key: expected one printable character, got 'tt'",
        "fields[1].options[1].value: expected 1..64 characters without surrounding spaces, "
        "got ' padded'",
        "fields[2].label: must not be empty",
        "fields[2].required: expected true or false, got str 'yes'",
        "fields[2].options: a text field has no options",
        "fields[2].max_length: expected an integer 1..100000, got 0",
        "fields[2].id: duplicate field id 'dup' (also fields[1])",
        "fields[3].type: expected single | multi | text, got 'choice'",
        "fields[4]: expected a mapping, got str 'just a string'",
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("- a list", "(top): expected a mapping, got list"),
        ("study: s\nversion: 1\nfields: []", "fields: expected a non-empty list, got list"),
        ("study: s\nfields: [{id: a", "not valid YAML"),
    ],
)
def test_wrong_shapes_are_clear(text: str, error: str) -> None:
    assert error in "\n".join(_errors(text))


def test_load_names_the_file_and_missing_file_is_a_codebook_error(tmp_path: Path) -> None:
    bad = tmp_path / "study.yml"
    bad.write_text("study: s\nversion: 1\nfields: 3\n")
    with pytest.raises(CodebookError, match=f"invalid codebook {bad}:\n  fields: expected"):
        load_codebook(bad)
    with pytest.raises(CodebookError, match="cannot read file"):
        load_codebook(tmp_path / "missing.yml")


# --- answers ---------------------------------------------------------------------


def test_valid_answer_is_cleaned_into_every_field() -> None:
    cb = parse_codebook(GOOD)
    assert cb.validate_answer({"violates": "no", "tags": ["c", "a", "a"], "notes": "  ok \n"}) == {
        "violates": "no",
        "tags": ["a", "c"],  # codebook order, no duplicates
        "notes": "ok",
    }
    assert validate_answer(cb, {"violates": "yes"}) == {
        "violates": "yes",
        "tags": [],
        "notes": None,
    }


def test_bad_answer_reports_each_field() -> None:
    cb = parse_codebook(GOOD)
    with pytest.raises(AnswerError) as info:
        cb.validate_answer({"tags": ["a", "z"], "notes": "x" * 11, "extra": 1})
    assert info.value.errors == {
        "extra": ["not a field of this codebook"],
        "violates": ["required"],
        "tags": ["'z' not among a, b, c"],
        "notes": ["too long: 11 characters, at most 10"],
    }
    assert "violates: required" in str(info.value)


@pytest.mark.parametrize(
    ("answer", "field", "message"),
    [
        ({"violates": "maybe"}, "violates", "'maybe' is not one of yes, no"),
        ({"violates": ["yes"]}, "violates", "expected one option value, got list"),
        ({"violates": "yes", "tags": 3}, "tags", "expected a list of option values, got int 3"),
        ({"violates": "yes", "notes": ["x"]}, "notes", "expected text, got list"),
    ],
)
def test_wrong_value_types_are_rejected(answer: dict, field: str, message: str) -> None:
    with pytest.raises(AnswerError) as info:
        parse_codebook(GOOD).validate_answer(answer)
    assert info.value.errors == {field: [message]}


def test_required_multi_needs_a_choice_and_required_text_needs_text() -> None:
    cb = parse_codebook(
        _yaml(
            """
            - id: tags
              label: T
              type: multi
              required: true
              options: [{value: a, label: A, key: a}]
            - id: why
              label: Why
              type: text
              required: true
            """
        )
    )
    with pytest.raises(AnswerError) as info:
        cb.validate_answer({"tags": [], "why": "   "})
    assert info.value.errors == {"tags": ["choose at least one"], "why": ["required"]}


class _FormData(dict):
    """The part of werkzeug's MultiDict the validator relies on: getlist."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self._pairs = pairs
        for k, v in pairs:
            self.setdefault(k, v)

    def getlist(self, key: str) -> list[str]:
        return [v for k, v in self._pairs if k == key]


def test_form_data_reads_checkboxes_with_getlist_and_ignores_named_keys() -> None:
    cb = parse_codebook(GOOD)
    form = _FormData(
        [("csrf_token", "t"), ("violates", "yes"), ("tags", "b"), ("tags", "a"), ("notes", "")]
    )
    assert cb.validate_answer(form, ignore=["csrf_token"]) == {
        "violates": "yes",
        "tags": ["a", "b"],
        "notes": None,
    }
    with pytest.raises(AnswerError, match="csrf_token: not a field"):
        cb.validate_answer(form)


def test_werkzeug_multidict_is_supported() -> None:
    from werkzeug.datastructures import MultiDict

    form = MultiDict([("violates", "no"), ("tags", "c"), ("tags", "b")])
    assert parse_codebook(GOOD).validate_answer(form)["tags"] == ["b", "c"]
