"""Read-only queries of the pipeline's tables (the ra_app role may only SELECT).

Plain SQL rather than ORM models: these tables belong to schema.sql, and keeping
them out of SQLAlchemy's metadata keeps them out of the RA migrations too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import RowMapping, text

from ra_app.extensions import db


@dataclass(frozen=True)
class Segment:
    index: int
    start: float
    end: float
    text: str
    evidence: bool = False
    terms: tuple[str, ...] = ()
    score: float | None = None


@dataclass(frozen=True)
class ItemDetail:
    classification_id: int
    audio_id: int
    batch_id: str
    rel_path: str
    opus_s3_key: str | None
    duration_s: float | None
    policy_name: str
    policy_version: int
    model: str
    score: float
    threshold: float
    language: str | None
    transcript_text: str
    segments: list[Segment] = field(default_factory=list)
    # A blind item carries no trace of the classifier's verdict: see blinded().
    blind: bool = False

    def blinded(self) -> ItemDetail:
        """This item as a blind reviewer gets it: no score, threshold or evidence.

        The verdict is taken out of the data, not merely left out of the page, so no
        template, JSON response or attribute can show it by mistake. Score and
        threshold read NaN rather than a plausible number."""
        plain = [
            Segment(index=s.index, start=s.start, end=s.end, text=s.text) for s in self.segments
        ]
        nan = float("nan")
        return replace(self, score=nan, threshold=nan, segments=plain, blind=True)

    def as_json(self) -> dict[str, Any]:
        """The item for the API; a blind item's has no score, threshold or evidence keys,
        the same keys whether it was flagged or drawn for the audit."""
        segments = []
        for s in self.segments:
            seg: dict[str, Any] = {"index": s.index, "start": s.start, "end": s.end, "text": s.text}
            if not self.blind:
                seg.update(evidence=s.evidence, terms=list(s.terms), score=s.score)
            segments.append(seg)
        data: dict[str, Any] = {
            "classification_id": self.classification_id,
            "audio_id": self.audio_id,
            "batch_id": self.batch_id,
            "rel_path": self.rel_path,
            "duration_s": self.duration_s,
            "policy": {"name": self.policy_name, "version": self.policy_version},
            "model": self.model,
            "language": self.language,
            "transcript": self.transcript_text,
            "segments": segments,
        }
        if not self.blind:
            data.update(score=self.score, threshold=self.threshold)
        return data


def _segments(raw_segments: list[dict[str, Any]], evidence: list[dict[str, Any]]) -> list[Segment]:
    by_index: dict[int, dict[str, Any]] = {}
    for ev in evidence:
        if isinstance(ev, dict) and isinstance(ev.get("segment"), int):
            by_index[ev["segment"]] = ev
    segments = []
    for i, seg in enumerate(raw_segments):
        ev = by_index.get(i)
        segments.append(
            Segment(
                index=i,
                start=float(seg.get("start") or 0.0),
                end=float(seg.get("end") or 0.0),
                text=str(seg.get("text", "")).strip(),
                evidence=ev is not None,
                terms=tuple(str(t) for t in (ev or {}).get("terms") or ()),
                score=(ev or {}).get("score"),
            )
        )
    return segments


def item_detail(classification_id: int) -> ItemDetail | None:
    """One item with its transcript, in one query.

    Reads the base tables rather than ra_queue, so an item already handed out
    still shows if a re-run has since unflagged it.
    """
    row = _item_row(classification_id)
    if row is None:
        return None
    return ItemDetail(
        classification_id=row["classification_id"],
        audio_id=row["audio_id"],
        batch_id=row["batch_id"],
        rel_path=row["rel_path"],
        opus_s3_key=row["opus_s3_key"],
        duration_s=row["duration_s"],
        policy_name=row["policy_name"],
        policy_version=row["policy_version"],
        model=row["classifier_model"],
        score=float(row["score"]),
        threshold=float(row["threshold"]),
        language=row["language"],
        transcript_text=row["transcript_text"] or "",
        segments=_segments(row["segments"] or [], row["evidence"] or []),
    )


def _item_row(classification_id: int) -> RowMapping | None:
    """Everything the app reads of one item: classification, file, policy, transcript."""
    return (
        db.session.execute(
            text("""
        SELECT c.id AS classification_id, c.audio_id, f.batch_id, f.rel_path, f.opus_s3_key,
               f.duration_s, p.name AS policy_name, p.version AS policy_version,
               c.model AS classifier_model, c.score, c.threshold, c.evidence,
               t.text AS transcript_text, t.language, t.segments, t.model AS asr_model
        FROM classifications c
        JOIN audio_files f ON f.id = c.audio_id
        JOIN policies p ON p.id = c.policy_id
        LEFT JOIN transcripts t ON t.audio_id = c.audio_id
        WHERE c.id = :cid
        """),
            {"cid": classification_id},
        )
        .mappings()
        .first()
    )


def opus_key_for(classification_id: int) -> str | None:
    return db.session.execute(
        text("""SELECT a.opus_s3_key FROM classifications c
                JOIN audio_files a ON a.id = c.audio_id WHERE c.id = :cid"""),
        {"cid": classification_id},
    ).scalar_one_or_none()


# What a label copies of its item (models.Label says why): the item's own facts, then
# its transcript's; the export puts its label columns between the two.
ITEM_FACTS = (
    "audio_id",
    "batch_id",
    "rel_path",
    "duration_s",
    "opus_s3_key",
    "policy_name",
    "policy_version",
    "classifier_model",
    "score",
    "threshold",
)
TRANSCRIPT_FACTS = ("language", "asr_model")
LABEL_FACTS = ITEM_FACTS + TRANSCRIPT_FACTS


def label_facts(classification_id: int) -> dict[str, Any] | None:
    """What a label keeps of its item (models.Label says why); None once deleted."""
    row = _item_row(classification_id)
    return {k: row[k] for k in LABEL_FACTS} if row is not None else None
