"""Policies kept as files in the repository (``policies/*.yml``) and applied to the database.

One YAML file per policy::

    name: harassment-threats          # the policy's name in the database
    description: Why the policy exists (for readers; not stored)
    lexicon: [kill you, hurt you]      # terms for the lexicon classifier (may be empty)
    text: |                            # what CoPE-A is prompted with
      # Policy
      ...
    active: true                       # optional; false retires every version

``audio-pipeline policy apply PATH...`` makes the database agree with the files,
idempotently: when the newest version of a name has the file's text and lexicon
(text compared without surrounding whitespace, as ``policy add`` stores it) nothing
is written. A changed wording or lexicon becomes a new version, never an edit; it
is the one active version of that name, and the older versions stay, inactive, so
every stored classification still names the text it was judged against. Versions
are numbered by the database (1, 2, ...), so a file carries no version.

Every file is read and checked before anything is written, and all files are
applied in one transaction: a bad file changes nothing and the error names it.
Policies in the database without a file are left as they are (``policy add``
remains for experiments).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from audio_pipeline.records import policies as records

POLICY_SUFFIXES = (".yml", ".yaml")
REQUIRED_KEYS = ("name", "text")
OPTIONAL_KEYS = ("description", "lexicon", "active")


class PolicyFileError(ValueError):
    """A policy file cannot be used; the message starts with its path."""


@dataclass(frozen=True)
class PolicyFile:
    path: Path
    name: str
    text: str
    lexicon: tuple[str, ...]
    active: bool = True
    description: str = ""


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a directory stands for its *.yml and *.yaml files, sorted."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES)
            if not found:
                raise PolicyFileError(f"{path}: no policy files (*.yml, *.yaml) in this directory")
            out += found
        else:
            out.append(path)
    return out


def load_policy_file(path: Path) -> PolicyFile:
    def fail(problem: str) -> PolicyFileError:
        return PolicyFileError(f"{path}: {problem}")

    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read the file: {exc}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise fail(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise fail("expected a mapping with the keys name, text and optionally lexicon")
    if "version" in data:
        raise fail(
            "remove 'version': versions are numbered by the database, a new one each time "
            "the text or lexicon changes"
        )
    unknown = sorted(str(k) for k in data if k not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if unknown:
        allowed = ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS)
        raise fail(f"unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise fail(f"missing key(s): {', '.join(missing)}")

    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise fail("'name' must be a non-empty string")
    text = data["text"]
    if not isinstance(text, str) or not text.strip():
        raise fail("'text' must be a non-empty string (the policy CoPE-A is prompted with)")
    lexicon = data.get("lexicon") or []
    if not isinstance(lexicon, list) or not all(isinstance(t, str) for t in lexicon):
        raise fail("'lexicon' must be a list of strings")
    terms = tuple(t.strip() for t in lexicon)
    if "" in terms:
        raise fail("'lexicon' holds an empty term")
    active = data.get("active", True)
    if not isinstance(active, bool):
        raise fail("'active' must be true or false")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise fail("'description' must be a string")
    return PolicyFile(
        path=path,
        name=name.strip(),
        text=text.strip(),
        lexicon=terms,
        active=active,
        description=description.strip(),
    )


def load_policy_files(paths: Sequence[Path]) -> list[PolicyFile]:
    """Read and check every file (directories expanded); no two may share a name."""
    loaded: list[PolicyFile] = []
    by_name: dict[str, Path] = {}
    for path in expand_paths(paths):
        policy = load_policy_file(path)
        if policy.name in by_name:
            raise PolicyFileError(
                f"{path}: policy {policy.name!r} is also defined in {by_name[policy.name]}"
            )
        by_name[policy.name] = path
        loaded.append(policy)
    if not loaded:
        raise PolicyFileError("no policy files given")
    return loaded


def apply_policy(conn: psycopg.Connection, policy: PolicyFile) -> dict[str, Any]:
    """Make the database agree with one file; returns what was done (see ``apply``)."""
    records.lock_name(conn, policy.name)
    existing = records.versions(conn, policy.name)
    latest = existing[-1] if existing else None
    outcome: dict[str, Any] = {"file": str(policy.path), "name": policy.name}

    if not policy.active:
        switched_off = [v.version for v in existing if v.active]
        for version in switched_off:
            records.set_active(conn, policy.name, version, False)
        return {
            **outcome,
            "result": "deactivated" if switched_off else "unchanged",
            "version": latest.version if latest else None,
            "deactivated": switched_off,
            "changed": bool(switched_off),
        }

    if latest is not None and latest.same_wording(policy.text, policy.lexicon):
        version = latest.version
        result = "unchanged" if latest.active else "activated"
        if not latest.active:
            records.set_active(conn, policy.name, version, True)
    else:
        version = latest.version + 1 if latest else 1
        try:
            records.insert_version(conn, policy.name, version, policy.text, list(policy.lexicon))
        except psycopg.errors.CheckViolation as exc:
            # The schema owns the rules (e.g. what a name may look like).
            raise PolicyFileError(
                f"{policy.path}: rejected by the database: {exc.diag.message_primary}"
            ) from None
        result = "added" if latest is None else "new version"
    # One wording per name is in force: the versions before it stay, switched off.
    switched_off = [v.version for v in existing if v.active and v.version != version]
    for old in switched_off:
        records.set_active(conn, policy.name, old, False)
    if switched_off and result == "unchanged":
        result = "activated"  # alone now: other versions had been switched on by hand
    return {
        **outcome,
        "result": result,
        "version": version,
        "deactivated": switched_off,
        "changed": result != "unchanged",
    }


def apply(conn: psycopg.Connection, policies: Sequence[PolicyFile]) -> dict[str, Any]:
    """Apply every policy in one transaction; nothing is written if one fails.

    Returns ``{"changed": bool, "policies": [{"file", "name", "result", "version",
    "deactivated", "changed"}, ...]}`` with result one of added, new version,
    activated (the file's wording was there but not alone in force), deactivated,
    unchanged.
    """
    with conn.transaction():
        outcomes = [apply_policy(conn, p) for p in policies]
    return {"changed": any(o["changed"] for o in outcomes), "policies": outcomes}
