"""The RA queue follows the active policy versions through a re-classification.

Version 1 of a policy flagged two files and an RA coded one of them. Version 2
replaces it (switched on, version 1 switched off, through the operator's commands),
``audio-pipeline reclassify`` queues the finished batch and a real gpu worker judges
the stored transcripts again. From then on "Next item" and a batch assignment hand
out only version 2's items; version 1's coded item, its assignment and its row stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devtools.dev_models import install_whisper
from ra_app import assignment, reports
from ra_app.extensions import db
from ra_app.models import Assignment, User
from tests.support.operator_cli import run_cli
from tests.support.rows import (
    add_audio_file,
    add_batch,
    add_classification,
    add_policy,
    add_transcript,
)
from tests.support.web import add_user, claim_all, make_app, user_named
from tests.support.workerkit.procs import finish, start_module

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = "b-recl-ra"
TEXTS = {"canoe.mp3": "a canoe", "ball.mp3": "a ball", "both.mp3": "a canoe and a ball"}


def cli(env: dict[str, str], *args: str) -> None:
    result = run_cli(env, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)


def test_the_queue_serves_only_the_active_version_after_a_reclassify(
    pipeline_env: dict[str, str], settings: Any, db_conn: Any, tmp_path: Path
) -> None:
    db_ = db_conn
    add_batch(db_, BATCH, "done", file_count=len(TEXTS))
    v1 = add_policy(db_, "boats", "Boats.", lexicon=["canoe"])
    ids = {}
    v1_items = {}
    for rel, text in TEXTS.items():
        ids[rel] = add_audio_file(db_, BATCH, rel, "done")
        add_transcript(db_, ids[rel], text, segments=[{"start": 0.0, "end": 1.0, "text": text}])
        score = 0.5 if "canoe" in text else 0.0  # what lexicon-v1 says of one hit
        v1_items[rel] = add_classification(db_, ids[rel], v1, score, model="lexicon-v1")
    db_.commit()

    app = make_app(
        {
            **pipeline_env,
            "SECRET_KEY": "t",
            "RA_AUDIT_SHARE": "0",  # flagged items only: the draw is tested elsewhere
            "RA_DOUBLE_CODED_SHARE": "0",
        }
    )
    add_user(app, "ann")
    add_user(app, "bob")
    with app.app_context():
        first = assignment.next_assignment(user_named("ann"))
        assert first is not None
        coded = first.classification_id
        first.status = "done"
        db.session.commit()
    assert coded in (v1_items["canoe.mp3"], v1_items["both.mp3"])

    v2_text = tmp_path / "v2.txt"
    v2_text.write_text("Balls.")
    cli(
        pipeline_env,
        "policy",
        "add",
        "boats",
        "--version",
        "2",
        "--file",
        str(v2_text),
        "--lexicon",
        "ball",
    )
    cli(pipeline_env, "policy", "deactivate", "boats", "1")
    cli(pipeline_env, "reclassify", "--policy", "boats", "--batch", BATCH)
    install_whisper(settings.models_root)  # the worker loads its models at start
    code, output = finish(
        start_module("audio_pipeline.workers.gpu_worker", pipeline_env, ["--drain"]), 240
    )
    assert code == 0, output
    v2_items = {
        r["audio_id"]: r["id"]
        for r in db_.execute(
            "SELECT c.id, c.audio_id FROM classifications c JOIN policies p ON p.id = c.policy_id "
            "WHERE p.version = 2 AND c.label = 1"
        )
    }
    db_.commit()
    assert set(v2_items) == {ids["ball.mp3"], ids["both.mp3"]}

    # The app syncs its queue at most every SYNC_INTERVAL; an RA a few seconds later
    # sees what this sync brings in, whether or not the worker took that long.
    with app.app_context():
        assignment.sync_queue()
    # Only version 2's flagged items are handed out now; version 1's other item is not.
    assert sorted(claim_all(app, "ann")) == sorted(v2_items.values())
    assert claim_all(app, "bob") == []
    untouched = ({v1_items["canoe.mp3"], v1_items["both.mp3"]} - {coded}).pop()
    with app.app_context():
        open_slots = db.session.execute(
            db.text("SELECT open_slots FROM ra_items WHERE classification_id = :c"),
            {"c": untouched},
        ).scalar_one()
        assert open_slots == 1  # still there, just not served
        counts = assignment.queue_counts()
        assert (counts.open_slots, counts.superseded_open_slots) == (0, 1)
        # The per-batch progress counts what can be handed out, as the queue does.
        [progress] = reports.batch_progress(1, 10)
        assert (progress.batch_id, progress.open_slots) == (BATCH, 0)
    with app.app_context():
        # A batch assignment follows the active versions too.
        db.session.execute(db.text("UPDATE ra_items SET open_slots = coders_needed"))
        db.session.commit()
        cathy = add_user(app, "cathy")
        assert assignment.assign_batch(BATCH, db.session.get(User, cathy)) == 2
        given = db.session.execute(
            db.select(Assignment.classification_id).where(Assignment.user_id == cathy)
        ).scalars()
        assert sorted(given) == sorted(v2_items.values())
        # What was coded under version 1 stays.
        kept = db.session.execute(
            db.select(Assignment).where(Assignment.classification_id == coded)
        ).scalar_one()
        assert kept.status == "done"
