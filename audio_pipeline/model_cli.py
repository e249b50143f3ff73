"""``audio-pipeline models ...``: publish, sync and merge models (see model_store).

    audio-pipeline models publish DIR --name NAME
    audio-pipeline models sync NAME... --dest /data/models [--group audio]
    audio-pipeline models merge-cope-a --base DIR --adapter DIR --out DIR [--publish NAME]

Every subcommand takes ``--env-file FILE`` (e.g. /etc/audio-pipeline/pipeline.env):
its S3_* settings are used instead of (over) the process environment, so Ansible
and operators run with exactly the worker's settings. ``sync`` prints one JSON
line, ``{"changed": [...], "unchanged": [...], "failed": {...}}``, which Ansible's
changed_when reads; it exits 1 when any model failed (the reasons go to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from audio_pipeline.config import Settings
from audio_pipeline.s3_cli import add_env_file_option, run_store_command, settings_for


class ModelCommandError(Exception):
    """The command cannot do what was asked; the message says why."""


def cmd_models(args: argparse.Namespace, settings: Settings, r: Any = None) -> int:
    from audio_pipeline import model_store

    # progress lines on stderr (stdout is the JSON line Ansible reads); not the libraries'
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("audio_pipeline").setLevel(logging.INFO)

    def command() -> int:
        if args.models_command == "publish":
            manifest = model_store.publish(args.dir, args.name, settings_for(args, settings))
            print(
                f"published {args.name}: {len(manifest.files)} file(s), {manifest.total_size} bytes"
            )
            return 0
        if args.models_command == "sync":
            result = model_store.sync(
                args.names, args.dest, settings_for(args, settings), group=args.group
            )
            print(json.dumps(result.as_json()))
            for reason in result.failed.values():
                print(f"audio-pipeline models sync: {reason}", file=sys.stderr)
            return 1 if result.failed else 0
        return _merge(args, settings)

    return run_store_command(
        f"audio-pipeline models {args.models_command}",
        command,
        (model_store.ModelStoreError, ModelCommandError),
    )


def _merge(args: argparse.Namespace, settings: Settings) -> int:
    from audio_pipeline import model_store
    from audio_pipeline.cope_a_merge import MergeError, merge_cope_a

    if args.publish:
        model_store.validate_name(args.publish)  # before minutes of merging, not after
    try:
        out = merge_cope_a(args.base, args.adapter, args.out)
    except MergeError as exc:
        raise ModelCommandError(str(exc)) from None
    print(f"merged model written to {out}")
    if args.publish:
        manifest = model_store.publish(out, args.publish, settings_for(args, settings))
        print(f"published {args.publish}: {len(manifest.files)} file(s)")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``models`` on the main parser's subcommands."""
    p = sub.add_parser("models", help="publish, sync and merge models (S3 model store)")
    p.set_defaults(func=cmd_models, needs_redis=False)
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    pub = msub.add_parser("publish", help="upload DIR as models/NAME/ with a sha256 manifest")
    pub.add_argument("dir", type=Path, metavar="DIR")
    pub.add_argument("--name", required=True, help="model name, e.g. whisper/large-v3")
    add_env_file_option(pub)

    syn = msub.add_parser("sync", help="bring DEST/NAME up to the published version")
    syn.add_argument("names", nargs="+", metavar="NAME")
    syn.add_argument("--dest", type=Path, required=True, help="models root, e.g. /data/models")
    syn.add_argument("--group", help="group that may read the files (others may not)")
    add_env_file_option(syn)

    merge = msub.add_parser("merge-cope-a", help="merge the CoPE-A LoRA into its Gemma-2 base")
    merge.add_argument("--base", type=Path, required=True, help="the bf16 Gemma-2 base")
    merge.add_argument("--adapter", type=Path, required=True, help="the CoPE-A peft adapter")
    merge.add_argument("--out", type=Path, required=True, help="new directory for the result")
    merge.add_argument(
        "--publish", metavar="NAME", help="then publish it, e.g. classifier/cope-a-9b"
    )
    add_env_file_option(merge)
