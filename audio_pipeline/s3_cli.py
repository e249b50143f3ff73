"""``audio-pipeline s3 ...``: look at the pipeline's bucket with this host's own settings.

    audio-pipeline s3 ls [PREFIX] [--count] [--env-file FILE]
    audio-pipeline s3 get KEY DEST [--env-file FILE]

The reference guide checks the store with awscli (``aws s3 ls ... | wc -l``, ``time
aws s3 cp ...``). No host has awscli, and it would need the endpoint and keys typed
into a shell. These commands read them from the environment file the host's units
use (``--env-file /etc/audio-pipeline/pipeline.env``; on the orchestrator the
operator command already carries them), reach the store exactly as the workers do
(s3_utils: path-style s3v4), and print what the guide's pipes and ``time`` were for:
how many objects, and how fast a download is.

PREFIX and KEY are keys in S3_BUCKET, or ``s3://BUCKET/KEY`` for another bucket.
``ls`` lists every key under PREFIX (recursively), one line each: the time it was
stored (UTC), its size in bytes and the key. ``get`` downloads through the unpack
worker's own path (a temporary name renamed on success, the sha256 recorded at
upload checked), then reports bytes, seconds and MB/s.

Exit codes: 0 ok, 1 the store refused or the object is missing or damaged (named on
stderr), 2 bad settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from audio_pipeline.config import ConfigError, Settings, settings_with_env_file
from audio_pipeline.envfile import EnvFileError

S3_SCHEME = "s3://"
LIST_PAGE_SIZE = 1000


class S3CommandError(Exception):
    """The store cannot give what was asked; the message says why."""


def split_location(location: str, default_bucket: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://BUCKET/KEY`` or of a bare KEY in ``default_bucket``."""
    if not location.startswith(S3_SCHEME):
        return default_bucket, location
    bucket, _, key = location[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise S3CommandError(f"no bucket in {location!r} (s3://BUCKET/KEY)")
    return bucket, key


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings``, or those of the environment file that ``--env-file`` names."""
    return settings_with_env_file(args.env_file, settings)


def add_env_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env-file", type=Path, help="read S3_* settings from this systemd environment file"
    )


def run_store_command(
    name: str, command: Callable[[], int], refusals: tuple[type[Exception], ...]
) -> int:
    """``command()``'s exit code, or its failure on stderr after ``name``: 2 for bad
    settings, 1 for one of ``refusals`` or an error from the store. The ``models``
    commands answer the same way."""
    try:
        return command()
    except (ConfigError, EnvFileError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except refusals as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"{name}: S3: {exc}", file=sys.stderr)
        return 1


def list_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under ``prefix``, in key order, as list_objects_v2 returns them."""
    paginator = client.get_paginator("list_objects_v2")
    objects: list[dict[str, Any]] = []
    pages = paginator.paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
    )
    for page in pages:
        objects.extend(page.get("Contents", []))
    return objects


def _ls(args: argparse.Namespace, settings: Settings, client: Any) -> int:
    bucket, prefix = split_location(args.prefix, settings.s3_bucket)
    objects = list_objects(client, bucket, prefix)
    where = f"{S3_SCHEME}{bucket}/{prefix}"
    if args.count:
        total = sum(int(o["Size"]) for o in objects)
        print(f"{len(objects)} object(s), {total} bytes under {where}")
        return 0
    for o in objects:
        print(f"{o['LastModified']:%Y-%m-%d %H:%M:%S} {int(o['Size']):>12} {o['Key']}")
    if not objects:
        # stderr, so a script counting lines still counts 0
        print(f"no objects under {where}", file=sys.stderr)
    return 0


def _get(args: argparse.Namespace, settings: Settings, client: Any) -> int:
    from audio_pipeline import s3_utils

    bucket, key = split_location(args.key, settings.s3_bucket)
    if not key or key.endswith("/"):
        raise S3CommandError(f"{args.key!r} names no object (give its full key)")
    dest: Path = args.dest
    if dest.is_dir():
        dest = dest / Path(key).name
    where = f"{S3_SCHEME}{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if s3_utils.is_not_found(exc):
            raise S3CommandError(f"{where}: no such object") from None
        raise
    recorded = head.get("Metadata", {}).get(s3_utils.SHA256_METADATA_KEY)
    started = time.monotonic()
    try:
        s3_utils.download_file(client, bucket, key, dest)
    except s3_utils.IntegrityError as exc:
        raise S3CommandError(str(exc)) from None
    seconds = max(time.monotonic() - started, 1e-6)
    size = dest.stat().st_size
    check = "sha256 verified" if recorded else "no sha256 recorded at upload, not checked"
    print(
        f"{where} -> {dest}: {size} bytes in {seconds:.2f} s "
        f"({size / seconds / 1e6:.1f} MB/s), {check}"
    )
    return 0


def cmd_s3(args: argparse.Namespace, settings: Settings, r: Any = None) -> int:
    from audio_pipeline import s3_utils

    def command() -> int:
        s = settings_for(args, settings)
        # One attempt: an operator checking the store wants the failure, not a wait.
        client = s3_utils.get_s3_client(s, max_attempts=1)
        return _ls(args, s, client) if args.s3_command == "ls" else _get(args, s, client)

    return run_store_command(f"audio-pipeline s3 {args.s3_command}", command, (S3CommandError,))


def add_parser(sub: Any) -> None:
    """Register ``s3`` on the main parser's subcommands."""
    p = sub.add_parser("s3", help="list or time-download objects in the pipeline's bucket")
    p.set_defaults(func=cmd_s3, needs_redis=False)
    ssub = p.add_subparsers(dest="s3_command", required=True, metavar="ACTION")

    ls = ssub.add_parser("ls", help="keys under PREFIX with time and size (or --count)")
    ls.add_argument(
        "prefix",
        nargs="?",
        default="",
        metavar="PREFIX",
        help="e.g. archives/ or s3://BUCKET/archives/ (default: the whole bucket)",
    )
    ls.add_argument("--count", action="store_true", help="only the number of objects and bytes")
    add_env_file_option(ls)

    get = ssub.add_parser("get", help="download KEY to DEST, verified, with its speed")
    get.add_argument("key", metavar="KEY", help="e.g. archives/b-001.tar or s3://BUCKET/KEY")
    get.add_argument("dest", type=Path, metavar="DEST", help="a file, or a directory for it")
    add_env_file_option(get)
