"""Study codebooks: the YAML file that defines the RA label form.

A study changes what its research assistants answer by editing a codebook file,
never code. This module loads and validates that file into frozen dataclasses and
checks a submitted answer against it. It is pure (no Flask, no database), so the
app, the CLI and the tests import it alike.

A codebook file looks like::

    study: Audio moderation review
    version: "1"
    instructions: |
      Listen to the clip ...
    fields:
      - id: violates
        label: Does the audio violate the flagged policy?
        type: single          # single | multi | text
        required: true
        options:
          - {value: "yes", label: "Yes", key: "y", description: "..."}
          - {value: "no", label: "No", key: "n"}
      - id: notes
        label: Notes
        type: text
        max_length: 2000
    verdict:                  # optional: which answers say "violates" (evaluation)
      field: violates
      positive: ["yes"]
      negative: ["no"]        # any other option (unsure) is excluded and counted

Without a ``verdict`` entry, a single-choice field ``violates`` with options ``yes``
and ``no`` is the verdict (``yes`` positive, ``no`` negative); a codebook with
neither has no verdict, and the evaluation says so.

Every problem is reported at once, each naming the path of the bad entry, e.g.
``fields[2].options[1].key: duplicate shortcut 'v' (also fields[0].options[0])``.

YAML 1.1 reads a bare ``yes``/``no``/``on``/``off`` as a boolean, which would turn
the natural option values of a moderation study into True/False. The loader here
follows YAML 1.2 instead: only ``true``/``false`` are booleans.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CODEBOOK_PATH = Path(__file__).resolve().parent / "codebooks" / "default.yml"

FIELD_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # a form name and a JSON key
OPTION_VALUE_MAX_CHARS = 64  # values are stored with every label and exported
TEXT_MAX_LENGTH_DEFAULT = 5000  # characters a free-text answer may hold
TEXT_MAX_LENGTH_LIMIT = 100_000  # the most a codebook may allow

# Keys the review page keeps for navigation, named as the browser's
# KeyboardEvent.key reports them, so a label shortcut can never shadow one.
# Shortcuts are a single character and compared without case, so only the
# one-character entries can collide; the others are listed for the help overlay.
RESERVED_KEYS: Mapping[str, str] = {
    " ": "play or pause the audio (space)",
    "Enter": "submit the answer and load the next item",
    "s": "skip this item (it returns to the pool)",
    "j": "seek the audio back 5 seconds",
    "k": "seek the audio forward 5 seconds",
    "ArrowLeft": "seek the audio back 5 seconds",
    "ArrowRight": "seek the audio forward 5 seconds",
    "?": "show or hide the keyboard help",
    "Escape": "close the help, or leave the notes box so shortcuts work again",
}


class FieldType(StrEnum):
    SINGLE = "single"  # exactly one option (radio buttons)
    MULTI = "multi"  # any number of options (checkboxes)
    TEXT = "text"  # free text (notes)


class CodebookError(ValueError):
    """A codebook file is invalid; ``errors`` lists every problem with its path."""

    def __init__(self, source: str, errors: Iterable[str]) -> None:
        self.source = source
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__(f"invalid codebook {source}:\n  " + "\n  ".join(self.errors))


class AnswerError(ValueError):
    """A submitted answer does not fit the codebook; ``errors`` maps field id to messages."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        self.errors: dict[str, list[str]] = {k: list(v) for k, v in errors.items()}
        detail = "; ".join(f"{k}: {m}" for k, msgs in self.errors.items() for m in msgs)
        super().__init__(f"invalid answer: {detail}")


@dataclass(frozen=True)
class Option:
    value: str  # what is stored and exported
    label: str  # what the RA sees
    description: str
    key: str  # one-character keyboard shortcut, lower case


@dataclass(frozen=True)
class Field:
    id: str
    label: str
    description: str
    type: FieldType
    required: bool
    options: tuple[Option, ...]  # empty for text fields
    max_length: int | None  # text fields only

    def option(self, value: str) -> Option:
        for opt in self.options:
            if opt.value == value:
                return opt
        raise KeyError(f"{self.id}: no option {value!r}")

    @property
    def option_values(self) -> tuple[str, ...]:
        return tuple(opt.value for opt in self.options)


@dataclass(frozen=True)
class Verdict:
    """Which answers of which single-choice field say the content violates the policy."""

    field: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]  # the field's other options are excluded (and counted)

    def of(self, value: Any) -> bool | None:
        """True for a positive answer, False for a negative one, None otherwise."""
        if value in self.positive:
            return True
        if value in self.negative:
            return False
        return None


DEFAULT_VERDICT = Verdict(field="violates", positive=("yes",), negative=("no",))


@dataclass(frozen=True)
class Codebook:
    study: str
    version: str
    instructions: str
    fields: tuple[Field, ...]
    verdict: Verdict | None = None

    def field(self, field_id: str) -> Field:
        for f in self.fields:
            if f.id == field_id:
                return f
        raise KeyError(f"codebook has no field {field_id!r}")

    def shortcuts(self) -> dict[str, tuple[str, str]]:
        """Shortcut key -> (field id, option value), for the review page's key handler."""
        return {opt.key: (f.id, opt.value) for f in self.fields for opt in f.options}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data for templates and the API (enums become strings)."""
        data = asdict(self)
        for f in data["fields"]:
            f["type"] = str(f["type"])
        data["shortcuts"] = {k: list(v) for k, v in self.shortcuts().items()}
        data["reserved_keys"] = dict(RESERVED_KEYS)
        return data

    def validate_answer(
        self, answer: Mapping[str, Any], *, ignore: Iterable[str] = ()
    ) -> dict[str, str | list[str] | None]:
        """Check a submitted answer and return it cleaned; see ``validate_answer``."""
        return validate_answer(self, answer, ignore=ignore)


# --- loading -------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false (YAML 1.2), so `yes` stays a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_codebook(path: str | Path = DEFAULT_CODEBOOK_PATH) -> Codebook:
    """Read and validate a codebook file; raises CodebookError naming every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CodebookError(str(p), [f"cannot read file: {exc}"]) from exc
    return parse_codebook(text, source=str(p))


def parse_codebook(text: str, *, source: str = "<string>") -> Codebook:
    """Validate codebook YAML text."""
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CodebookError(source, [f"not valid YAML: {exc}"]) from exc
    return codebook_from_dict(data, source=source)


def codebook_from_dict(data: Any, *, source: str = "<dict>") -> Codebook:
    """Validate already-parsed codebook data (e.g. from JSON)."""
    return _Validator(source).codebook(data)


_CODEBOOK_KEYS = {"study", "version", "instructions", "fields", "verdict"}
_VERDICT_KEYS = {"field", "positive", "negative"}
_FIELD_KEYS = {"id", "label", "description", "type", "required", "options", "max_length"}
_OPTION_KEYS = {"value", "label", "description", "key"}


class _Validator:
    """Walks the parsed YAML once, collecting every error with its path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.key_owner: dict[str, str] = {}  # shortcut -> path of the option that has it

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def codebook(self, data: Any) -> Codebook:
        if not isinstance(data, Mapping):
            raise CodebookError(self.source, [f"(top): expected a mapping, got {_kind(data)}"])
        self.unknown_keys("(top)", data, _CODEBOOK_KEYS)
        study = self.text("study", data.get("study"), required=True)
        version = self.version(data.get("version"))
        instructions = self.text("instructions", data.get("instructions"), required=False)
        fields = self.fields(data.get("fields"))
        if "verdict" in data:
            verdict = self.verdict(data["verdict"], fields)
        else:
            verdict = _default_verdict(fields)
        if self.errors:
            raise CodebookError(self.source, self.errors)
        return Codebook(
            study=study, version=version, instructions=instructions, fields=fields, verdict=verdict
        )

    def verdict(self, raw: Any, fields: tuple[Field, ...]) -> Verdict | None:
        if not isinstance(raw, Mapping):
            self.error("verdict", f"expected a mapping, got {_kind(raw)}")
            return None
        self.unknown_keys("verdict", raw, _VERDICT_KEYS)
        field_id = raw.get("field")
        field = next((f for f in fields if f.id == field_id), None)
        if field is None:
            self.error("verdict.field", f"no field {field_id!r} in this codebook")
            return None
        if field.type is not FieldType.SINGLE:
            self.error("verdict.field", f"{field_id!r} must be a single-choice field")
            return None
        sides: dict[str, tuple[str, ...]] = {}
        for side in ("positive", "negative"):
            values = raw.get(side)
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not values:
                self.error(f"verdict.{side}", "expected a non-empty list of option values")
                values = []
            for value in values:
                if value not in field.option_values:
                    self.error(f"verdict.{side}", f"{value!r} is not an option of {field_id!r}")
            sides[side] = tuple(str(v) for v in values)
        both = set(sides["positive"]) & set(sides["negative"])
        if both:
            self.error("verdict", f"{', '.join(sorted(both))} cannot be positive and negative")
        return Verdict(field=field.id, positive=sides["positive"], negative=sides["negative"])

    def unknown_keys(self, path: str, data: Mapping[Any, Any], allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                self.error(path, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")

    def text(self, path: str, value: Any, *, required: bool) -> str:
        if value is None:
            if required:
                self.error(path, "required")
            return ""
        if not isinstance(value, str):
            self.error(path, f"expected text, got {_kind(value)}")
            return ""
        if required and not value.strip():
            self.error(path, "must not be empty")
        return value.strip()

    def version(self, value: Any) -> str:
        # `version: 2` and `version: "2.1"` are both fine; a float like 2.10 would
        # silently become 2.1, so it must be quoted.
        if isinstance(value, bool) or value is None or isinstance(value, float):
            self.error("version", f"expected text or an integer (quote it), got {_kind(value)}")
            return ""
        if isinstance(value, int):
            return str(value)
        return self.text("version", value, required=True)

    def fields(self, value: Any) -> tuple[Field, ...]:
        if not isinstance(value, list) or not value:
            self.error("fields", f"expected a non-empty list, got {_kind(value)}")
            return ()
        seen_ids: dict[str, str] = {}
        fields = []
        for i, raw in enumerate(value):
            path = f"fields[{i}]"
            field = self.field(path, raw)
            if field is None:
                continue
            if field.id and field.id in seen_ids:
                also = seen_ids[field.id]
                self.error(f"{path}.id", f"duplicate field id {field.id!r} (also {also})")
            seen_ids.setdefault(field.id, path)
            fields.append(field)
        return tuple(fields)

    def field(self, path: str, raw: Any) -> Field | None:
        if not isinstance(raw, Mapping):
            self.error(path, f"expected a mapping, got {_kind(raw)}")
            return None
        self.unknown_keys(path, raw, _FIELD_KEYS)
        field_id = raw.get("id")
        if not isinstance(field_id, str) or not FIELD_ID_PATTERN.match(field_id):
            self.error(
                f"{path}.id",
                f"expected a lower-case identifier like 'severity' "
                f"(letters, digits, _; max 64), got {field_id!r}",
            )
            field_id = ""
        label = self.text(f"{path}.label", raw.get("label"), required=True)
        description = self.text(f"{path}.description", raw.get("description"), required=False)
        try:
            ftype = FieldType(raw.get("type"))
        except ValueError:
            allowed = " | ".join(t.value for t in FieldType)
            self.error(f"{path}.type", f"expected {allowed}, got {raw.get('type')!r}")
            ftype = None
        required = raw.get("required", False)
        if not isinstance(required, bool):
            self.error(f"{path}.required", f"expected true or false, got {_kind(required)}")
            required = False
        options: tuple[Option, ...] = ()
        max_length = None
        if ftype is FieldType.TEXT:
            if "options" in raw:
                self.error(f"{path}.options", "a text field has no options")
            max_length = self.max_length(f"{path}.max_length", raw.get("max_length"))
        elif ftype is not None:
            if "max_length" in raw:
                self.error(f"{path}.max_length", "only a text field has max_length")
            options = self.options(f"{path}.options", raw.get("options"), ftype)
        if ftype is None:
            return None
        return Field(field_id, label, description, ftype, required, options, max_length)

    def max_length(self, path: str, value: Any) -> int:
        if value is None:
            return TEXT_MAX_LENGTH_DEFAULT
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not (1 <= value <= TEXT_MAX_LENGTH_LIMIT)
        ):
            self.error(path, f"expected an integer 1..{TEXT_MAX_LENGTH_LIMIT}, got {value!r}")
            return TEXT_MAX_LENGTH_DEFAULT
        return value

    def options(self, path: str, value: Any, ftype: FieldType) -> tuple[Option, ...]:
        minimum = 2 if ftype is FieldType.SINGLE else 1  # one forced choice is no question
        if not isinstance(value, list) or len(value) < minimum:
            self.error(path, f"a {ftype} field needs a list of at least {minimum} options")
            return ()
        seen_values: dict[str, str] = {}
        options = []
        for j, raw in enumerate(value):
            opt_path = f"{path}[{j}]"
            opt = self.option(opt_path, raw)
            if opt is None:
                continue
            if opt.value in seen_values:
                self.error(
                    f"{opt_path}.value",
                    f"duplicate value {opt.value!r} (also {seen_values[opt.value]})",
                )
            seen_values.setdefault(opt.value, opt_path)
            options.append(opt)
        return tuple(options)

    def option(self, path: str, raw: Any) -> Option | None:
        if not isinstance(raw, Mapping):
            self.error(path, f"expected a mapping, got {_kind(raw)}")
            return None
        self.unknown_keys(path, raw, _OPTION_KEYS)
        value = self.option_value(f"{path}.value", raw.get("value"))
        label = self.text(f"{path}.label", raw.get("label"), required=True)
        description = self.text(f"{path}.description", raw.get("description"), required=False)
        key = self.shortcut(f"{path}.key", raw.get("key"), owner=path)
        return Option(value=value, label=label, description=description, key=key)

    def option_value(self, path: str, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `value: 1` on a severity scale
        if not isinstance(value, str):
            self.error(path, f"expected text (quote it), got {_kind(value)}")
            return ""
        if not value or value != value.strip() or len(value) > OPTION_VALUE_MAX_CHARS:
            self.error(
                path,
                f"expected 1..{OPTION_VALUE_MAX_CHARS} characters without surrounding "
                f"spaces, got {value!r}",
            )
        return value

    def shortcut(self, path: str, value: Any, *, owner: str) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
            value = str(value)  # `key: 1`
        if not isinstance(value, str) or len(value) != 1 or not value.isprintable():
            self.error(path, f"expected one printable character, got {value!r}")
            return ""
        # Shift changes event.key ('v' -> 'V'); one shortcut answers to both cases.
        key = value.lower()
        if key in RESERVED_KEYS or key.isspace():
            what = RESERVED_KEYS.get(key, "reserved")
            self.error(path, f"shortcut {value!r} is reserved for navigation: {what}")
            return key
        if key in self.key_owner:
            self.error(path, f"duplicate shortcut {key!r} (also {self.key_owner[key]})")
            return key
        self.key_owner[key] = owner
        return key


def _default_verdict(fields: tuple[Field, ...]) -> Verdict | None:
    """The default verdict where the codebook has its field and options, else None."""
    d = DEFAULT_VERDICT
    for f in fields:
        if f.id == d.field and f.type is FieldType.SINGLE:
            wanted = (*d.positive, *d.negative)
            return d if all(v in f.option_values for v in wanted) else None
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, str | int | float):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


# --- answers -------------------------------------------------------------------


def validate_answer(
    codebook: Codebook, answer: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> dict[str, str | list[str] | None]:
    """Check an answer against the codebook and return the cleaned answer.

    ``answer`` is a JSON object or a form: anything with ``getlist`` (werkzeug's
    MultiDict) has its multi-choice fields read with ``getlist``. The result holds
    every field: a single-choice field its option value or None, a multi-choice
    field the chosen values in codebook order (possibly empty), a text field the
    stripped text or None. Keys in ``ignore`` (e.g. ``csrf_token``) are skipped; any
    other unknown key is an error. Raises AnswerError mapping each bad field (or an
    unknown key) to its messages.
    """
    skip = set(ignore)
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, str | list[str] | None] = {}
    known = {f.id for f in codebook.fields}
    for key in answer:
        if key not in known and key not in skip:
            errors.setdefault(key, []).append("not a field of this codebook")
    has_getlist = callable(getattr(answer, "getlist", None))
    for field in codebook.fields:
        if field.type is FieldType.MULTI and has_getlist:
            raw: Any = answer.getlist(field.id)  # type: ignore[attr-defined]
        else:
            raw = answer.get(field.id)
        value, messages = _clean_field(field, raw)
        if messages:
            errors[field.id] = messages
        cleaned[field.id] = value
    if errors:
        raise AnswerError(errors)
    return cleaned


def _clean_field(field: Field, raw: Any) -> tuple[str | list[str] | None, list[str]]:
    if field.type is FieldType.SINGLE:
        return _clean_single(field, raw)
    if field.type is FieldType.MULTI:
        return _clean_multi(field, raw)
    return _clean_text(field, raw)


def _clean_single(field: Field, raw: Any) -> tuple[str | None, list[str]]:
    if raw is None or raw == "":
        return None, (["required"] if field.required else [])
    if not isinstance(raw, str):
        return None, [f"expected one option value, got {_kind(raw)}"]
    if raw not in field.option_values:
        return None, [f"{raw!r} is not one of {', '.join(field.option_values)}"]
    return raw, []


def _clean_multi(field: Field, raw: Any) -> tuple[list[str], list[str]]:
    if raw is None or raw == "":
        chosen: list[Any] = []
    elif isinstance(raw, str):
        chosen = [raw]  # a form with one box ticked, read without getlist
    elif isinstance(raw, list | tuple | set | frozenset):
        chosen = list(raw)
    else:
        return [], [f"expected a list of option values, got {_kind(raw)}"]
    bad = [v for v in chosen if not isinstance(v, str) or v not in field.option_values]
    if bad:
        shown = ", ".join(repr(v) for v in bad)
        return [], [f"{shown} not among {', '.join(field.option_values)}"]
    if field.required and not chosen:
        return [], ["choose at least one"]
    picked = set(chosen)
    return [v for v in field.option_values if v in picked], []


def _clean_text(field: Field, raw: Any) -> tuple[str | None, list[str]]:
    if raw is None:
        text = ""
    elif isinstance(raw, str):
        text = raw.strip()
    else:
        return None, [f"expected text, got {_kind(raw)}"]
    if not text:
        return None, (["required"] if field.required else [])
    limit = field.max_length or TEXT_MAX_LENGTH_DEFAULT
    if len(text) > limit:
        return None, [f"too long: {len(text)} characters, at most {limit}"]
    return text, []
