"""Models in the pipeline's S3 bucket: ``models/{name}/...`` plus a sha256 manifest.

Every GPU host pulls its models from the bucket it already reaches with its own
S3 credentials, so a fresh fleet needs no SSH trust between hosts and nothing is
fetched from a model hub at run time.

``publish(local_dir, name)`` uploads every file of a model directory to
``models/{name}/{relative path}`` and then writes ``models/{name}/.manifest.json``
(sha256 and size per relative path). The old manifest is removed before any file
changes and the new one is written last, so a model whose publishing was cut
short has no manifest and is refused by every reader, never half-synced.

``sync(names, dest_root)`` brings ``dest_root/{name}`` to the published version:
a copy whose recorded manifest (the same ``.manifest.json``, kept in the local
directory) lists the same files, each present with its size, is left alone;
otherwise the files are fetched into a temporary directory beside the
destination (files whose content did not change are hard-linked from the old
copy instead of downloaded), every sha256 is checked, and the directory is
renamed into place. A failure leaves the old copy untouched. The process doing
the sync owns the files (root, under Ansible); ``group`` makes them readable by
that group and by no one else.

Model names are relative paths (``whisper/large-v3``, ``classifier/cope-a-9b``,
``nltk``); one model may not live inside another's prefix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from audio_pipeline import s3_utils
from audio_pipeline.config import Settings, load_settings

log = logging.getLogger(__name__)

MODELS_PREFIX = "models"
MANIFEST_FILE = ".manifest.json"
MANIFEST_FORMAT = 1
LOCK_FILE = ".sync.lock"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class ModelStoreError(RuntimeError):
    """A model cannot be published or synced; the message names the model (and file)."""


class ManifestMissingError(ModelStoreError):
    """The bucket holds no complete published version of a model."""


class ModelIntegrityError(ModelStoreError):
    """A file's bytes do not match the manifest."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What one published version of a model holds: relative path -> digest and size."""

    name: str
    files: dict[str, FileEntry]
    published_at: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "name": self.name,
                "published_at": self.published_at,
                "files": {
                    path: {"sha256": e.sha256, "size": e.size}
                    for path, e in sorted(self.files.items())
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, name: str, text: str | bytes) -> Manifest:
        """Parse and validate; every path must stay inside the model's directory."""
        try:
            data = json.loads(text)
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {data.get('format')!r}")
            files = {}
            for path, entry in data["files"].items():
                _check_relative(path)
                sha, size = entry["sha256"], entry["size"]
                if not isinstance(sha, str) or not _SHA256.match(sha):
                    raise ValueError(f"{path}: bad sha256 {sha!r}")
                if not isinstance(size, int) or size < 0:
                    raise ValueError(f"{path}: bad size {size!r}")
                files[path] = FileEntry(sha, size)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelStoreError(f"model {name}: unreadable manifest: {exc}") from None
        if not files:
            raise ModelStoreError(f"model {name}: the manifest lists no files")
        return cls(name=name, files=files, published_at=str(data.get("published_at", "")))

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())


@dataclass
class SyncResult:
    """What ``sync`` did per model; ``as_json`` is the line the CLI prints for Ansible."""

    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"changed": self.changed, "unchanged": self.unchanged, "failed": self.failed}


def validate_name(name: str) -> str:
    """A model name: relative path segments of letters, digits, '.', '_', '-'."""
    parts = name.split("/")
    if not name or not all(_SEGMENT.match(p) for p in parts):
        raise ModelStoreError(
            f"bad model name {name!r}: use relative path segments of letters, digits, "
            "'.', '_' and '-' (e.g. whisper/large-v3)"
        )
    return name


def _check_relative(path: str) -> None:
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or pure.is_absolute()
        or any(p in {"", ".", ".."} for p in path.split("/"))
        or path == MANIFEST_FILE
    ):
        raise ValueError(f"path {path!r} is not a plain relative path inside the model")


def model_prefix(name: str) -> str:
    return f"{MODELS_PREFIX}/{name}/"


def manifest_key(name: str) -> str:
    return model_prefix(name) + MANIFEST_FILE


def _store(settings: Settings | None) -> tuple[Any, str]:
    s = settings or load_settings()
    return s3_utils.get_s3_client(s), s.s3_bucket


# --- publish -------------------------------------------------------------------------


def local_files(local_dir: Path) -> dict[str, Path]:
    """Every regular file under ``local_dir`` (links followed) by relative posix path.

    A top-level .manifest.json is left out: it is the record a sync writes, so a
    synced copy can be published again as it is.
    """
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(local_dir, followlinks=True):
        dirs.sort()
        for filename in sorted(files):
            path = Path(root) / filename
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST_FILE or not path.is_file():
                continue
            if filename == MANIFEST_FILE:
                # it would read as another model's manifest inside this one's prefix
                raise ModelStoreError(f"{path}: a file named {MANIFEST_FILE} cannot be published")
            found[rel] = path
    return found


def _list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def _refuse_nesting(client: Any, bucket: str, name: str, keys: Sequence[str]) -> None:
    """One model inside another's prefix would be deleted as the outer one's stale files."""
    own = manifest_key(name)
    inner = [k for k in keys if k.endswith("/" + MANIFEST_FILE) and k != own]
    parts = name.split("/")
    outer = [
        "/".join(parts[:i])
        for i in range(1, len(parts))
        if s3_utils.object_exists(client, bucket, manifest_key("/".join(parts[:i])))
    ]
    if inner or outer:
        others = [k[len(MODELS_PREFIX) + 1 : -len(MANIFEST_FILE) - 1] for k in inner] + outer
        raise ModelStoreError(
            f"model {name}: cannot publish inside or around another model ({', '.join(others)})"
        )


def publish(local_dir: Path, name: str, settings: Settings | None = None) -> Manifest:
    """Upload ``local_dir`` as model ``name``; returns the manifest written last.

    Files already stored with the same sha256 are not uploaded again, and objects
    under the prefix that the new manifest does not list are removed afterwards.
    """
    validate_name(name)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ModelStoreError(f"model {name}: {local_dir} is not a directory")
    files = local_files(local_dir)
    if not files:
        raise ModelStoreError(f"model {name}: {local_dir} holds no files")
    client, bucket = _store(settings)
    existing = _list_keys(client, bucket, model_prefix(name))
    _refuse_nesting(client, bucket, name, existing)

    entries = {
        rel: FileEntry(s3_utils.sha256_file(p), p.stat().st_size) for rel, p in files.items()
    }
    # From here until the new manifest exists, readers see "not published".
    client.delete_object(Bucket=bucket, Key=manifest_key(name))
    for rel, path in files.items():
        key = model_prefix(name) + rel
        entry = entries[rel]
        if key in existing and _stored_digest(client, bucket, key) == (entry.sha256, entry.size):
            continue
        log.info("event=models.upload model=%s file=%s bytes=%d", name, rel, entry.size)
        s3_utils.upload_file(client, bucket, path, key, sha256=entry.sha256)
    manifest = Manifest(
        name=name, files=entries, published_at=datetime.now(UTC).isoformat(timespec="seconds")
    )
    client.put_object(
        Bucket=bucket,
        Key=manifest_key(name),
        Body=manifest.to_json().encode(),
        ContentType="application/json",
    )
    wanted = {model_prefix(name) + rel for rel in entries} | {manifest_key(name)}
    for key in existing:
        if key not in wanted:
            client.delete_object(Bucket=bucket, Key=key)
    return manifest


def _stored_digest(client: Any, bucket: str, key: str) -> tuple[str | None, int]:
    head = client.head_object(Bucket=bucket, Key=key)
    return head["Metadata"].get(s3_utils.SHA256_METADATA_KEY), int(head["ContentLength"])


def read_manifest(
    name: str, settings: Settings | None = None, *, client: Any = None, bucket: str | None = None
) -> Manifest:
    """The published manifest of ``name``; ManifestMissingError when there is none."""
    validate_name(name)
    if client is None or bucket is None:
        client, bucket = _store(settings)
    key = manifest_key(name)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if s3_utils.is_not_found(exc):
            raise ManifestMissingError(
                f"model {name}: no manifest at s3://{bucket}/{key} (not published, or its "
                f"publishing did not finish): run `audio-pipeline models publish DIR "
                f"--name {name}`"
            ) from None
        raise
    return Manifest.from_json(name, body)


# --- sync ----------------------------------------------------------------------------


def local_manifest(model_dir: Path) -> Manifest | None:
    """The manifest recorded by the last sync of ``model_dir``, if any and readable."""
    path = model_dir / MANIFEST_FILE
    if model_dir.is_symlink() or not path.is_file():
        return None
    try:
        return Manifest.from_json(model_dir.name, path.read_bytes())
    except (OSError, ModelStoreError):
        return None


def is_current(model_dir: Path, manifest: Manifest) -> bool:
    """The local copy was synced from this content and still has every file, at size."""
    recorded = local_manifest(model_dir)
    if recorded is None or recorded.files != manifest.files:
        return False
    for rel, entry in manifest.files.items():
        path = model_dir / rel
        if path.is_symlink() or not path.is_file() or path.stat().st_size != entry.size:
            return False
    return True


@contextlib.contextmanager
def _locked(dest_root: Path) -> Iterator[None]:
    """One sync per models root at a time (its temporary directories are cleared)."""
    with (dest_root / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Modes:
    group: str | int | None

    @property
    def file(self) -> int:
        return 0o640 if self.group is not None else 0o644

    @property
    def dir(self) -> int:
        return 0o750 if self.group is not None else 0o755

    def apply(self, path: Path, is_dir: bool) -> None:
        path.chmod(self.dir if is_dir else self.file)
        if self.group is not None:
            shutil.chown(path, group=self.group)


def _make_parents(dest_root: Path, target: Path, modes: _Modes) -> None:
    """Create the directories between the models root and ``target`` with the model modes."""
    missing = []
    parent = target.parent
    while parent != dest_root and not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir()
        modes.apply(directory, is_dir=True)


def _temp_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(4)}")


def _clear_leftovers(target: Path) -> None:
    """Temporary directories of a sync that died (the lock says none is running)."""
    if not target.parent.is_dir():
        return
    for kind in ("sync", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fetch_model(
    client: Any, bucket: str, manifest: Manifest, target: Path, temp: Path, modes: _Modes
) -> None:
    """Every file of ``manifest`` into ``temp``, verified; reused from ``target`` if unchanged."""
    name = manifest.name
    old = local_manifest(target)
    reusable = {
        rel
        for rel, entry in manifest.files.items()
        if old is not None and old.files.get(rel) == entry and (target / rel).is_file()
    }
    needed = sum(e.size for rel, e in manifest.files.items() if rel not in reusable)
    free = shutil.disk_usage(temp.parent).free
    if needed > free:
        raise ModelStoreError(
            f"model {name}: needs {needed} bytes free beside {target} for the new copy, has {free}"
        )
    temp.mkdir()
    modes.apply(temp, is_dir=True)
    for rel, entry in sorted(manifest.files.items()):
        path = temp / rel
        for directory in reversed(path.relative_to(temp).parents[:-1]):
            if not (temp / directory).is_dir():
                (temp / directory).mkdir()
                modes.apply(temp / directory, is_dir=True)
        if rel in reusable:
            try:
                os.link(target / rel, path)
            except OSError:
                shutil.copyfile(target / rel, path)
            if s3_utils.sha256_file(path) == entry.sha256:
                modes.apply(path, is_dir=False)
                continue
            path.unlink()  # the old copy was altered since its sync: fetch it again
        _download(client, bucket, name, rel, path)
        actual = s3_utils.sha256_file(path)
        size = path.stat().st_size
        if actual != entry.sha256 or size != entry.size:
            raise ModelIntegrityError(
                f"model {name}: file {rel} does not match the manifest (sha256 {actual}, "
                f"{size} bytes; expected {entry.sha256}, {entry.size} bytes): publish the "
                "model again"
            )
        modes.apply(path, is_dir=False)
    record = temp / MANIFEST_FILE
    record.write_text(manifest.to_json())
    modes.apply(record, is_dir=False)


def _download(client: Any, bucket: str, name: str, rel: str, path: Path) -> None:
    key = model_prefix(name) + rel
    try:
        client.download_file(bucket, key, str(path), Config=s3_utils.TRANSFER_CONFIG)
    except ClientError as exc:
        if s3_utils.is_not_found(exc):
            raise ModelIntegrityError(
                f"model {name}: file {rel} is in the manifest but not at s3://{bucket}/{key}"
            ) from None
        raise


def _swap_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; an existing copy is moved aside first, then removed.

    Two renames, so ``target`` is missing for an instant: the workers only open
    their models when they start, and they are restarted after a sync that
    changed anything.
    """
    if not (target.exists() or target.is_symlink()):
        temp.rename(target)
        return
    aside = _temp_name(target, "old")
    target.rename(aside)
    try:
        temp.rename(target)
    except OSError:
        aside.rename(target)
        raise
    _remove(aside)


def sync_one(client: Any, bucket: str, name: str, dest_root: Path, modes: _Modes) -> bool:
    """Bring ``dest_root/name`` to the published version; True if anything changed."""
    manifest = read_manifest(name, client=client, bucket=bucket)
    target = dest_root / name
    if is_current(target, manifest):
        return False
    _clear_leftovers(target)
    _make_parents(dest_root, target, modes)
    temp = _temp_name(target, "sync")
    try:
        _fetch_model(client, bucket, manifest, target, temp, modes)
        _swap_into_place(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    log.info(
        "event=models.synced model=%s files=%d bytes=%d",
        name,
        len(manifest.files),
        manifest.total_size,
    )
    return True


def sync(
    names: Sequence[str],
    dest_root: Path,
    settings: Settings | None = None,
    *,
    group: str | int | None = None,
) -> SyncResult:
    """Sync every model in ``names`` under ``dest_root``; one failure does not stop the rest.

    ``result.failed`` maps each model that could not be synced to the reason (its
    old local copy, if any, is untouched).
    """
    for name in names:
        validate_name(name)
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    client, bucket = _store(settings)
    modes = _Modes(group)
    result = SyncResult()
    with _locked(dest_root):
        for name in names:
            try:
                changed = sync_one(client, bucket, name, dest_root, modes)
            except ModelStoreError as exc:
                result.failed[name] = str(exc)
                continue
            except (ClientError, BotoCoreError, OSError) as exc:
                result.failed[name] = f"model {name}: {type(exc).__name__}: {exc}"
                continue
            (result.changed if changed else result.unchanged).append(name)
    return result
