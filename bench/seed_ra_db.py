"""Seed a pipeline database with synthetic results at scale, fast.

    .venv/bin/python -m bench.seed_ra_db postgresql://pipeline:...@127.0.0.1:15432/db \
        [--files 100000] [--classifications 1000000] [--flagged-share 0.05] [--seed 1]

Writes batches, audio files, transcripts with segments, a few versioned policies and
classifications (several models and policies per file, a share of them flagged) with
COPY through psycopg 3, in one transaction, then ANALYZEs so the planner sees the
real sizes. The RA app's performance tests and the benchmarks use it.

- Connect as the pipeline role: the ra_app role may only read these tables.
- The database must hold no pipeline rows yet (the schema applied, tables empty); a
  database with data is refused and left as it was.
- Content is a function of the seed: the same arguments give the same rows and
  ids. Only timestamps that default to now() (files, transcripts,
  classifications) differ between runs; batch timestamps are fixed.
- Transcripts are synthetic, benign sentences; segments split each file's
  duration evenly, and a flagged classification's evidence names real segments.

Rows are formatted as COPY text in Python while the server ingests the previous
chunk, so the client and the server each keep one core busy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
from psycopg import sql

DEFAULT_FILES = 100_000
DEFAULT_CLASSIFICATIONS = 1_000_000
DEFAULT_FILES_PER_BATCH = 1_000
DEFAULT_FLAGGED_SHARE = 0.05  # of classifications; CoPE-A flags a few percent in practice
DEFAULT_SEED = 1
INDEX_BUILD_MEMORY_MB = 256  # per index build after the COPY: sorts 1M keys in memory
CHUNK_ROWS = 20_000  # rows formatted per COPY write: big enough to amortise, small in memory
THRESHOLD = 0.5  # score >= threshold is flagged, as the pipeline stores it
SCORE_MIN, SCORE_MAX = 0.0001, 0.9999  # a softmax of two logits is never exactly 0 or 1
SEGMENT_SECONDS = 12.0  # mean length of a transcript segment
MAX_SEGMENTS = 12
MIN_DURATION_S = 3.0
BATCH_EPOCH = datetime(2025, 1, 6, 8, 0, tzinfo=UTC)  # fixed so batch rows are reproducible
BATCH_INTERVAL = timedelta(hours=1)
HOSTS = ("gpu-01", "gpu-02", "gpu-03", "gpu-04")
ASR_MODEL, ASR_BACKEND = "large-v3", "whisperx"

# (name, version, active): hate_speech v1 was superseded by v2, whose classifications
# sit beside the old ones, as a re-run with a new prompt leaves them.
POLICIES = (
    ("hate_speech", 1, False),
    ("hate_speech", 2, True),
    ("harassment", 1, True),
    ("violent_threats", 1, True),
    ("self_harm", 1, True),
)
MODELS = ("zentropi-ai/cope-a-9b", "lexicon-v1")

SENTENCES = (
    "thanks for calling back so quickly",
    "we went down to the market on saturday",
    "can you hear me now the line keeps dropping",
    "i told him the game starts at seven",
    "she said the bus was late again this morning",
    "honestly i think the referee got that one wrong",
    "let me check the schedule and get back to you",
    "the weather has been strange all week",
    "did you see what they posted last night",
    "that is not what i meant and you know it",
    "we should meet up before the weekend",
    "i am so tired of hearing the same excuses",
    "turn the music down i can barely think",
    "they never listen to anything we say",
    "put it on the list and we will sort it out",
    "people like that should not be allowed in here",
    "you will regret saying that to me",
    "nobody would even notice if i was gone",
    "keep talking like that and see what happens",
    "get out of this channel nobody wants you here",
)


class SeedError(RuntimeError):
    """The database cannot be seeded as asked (not empty, wrong role)."""


@dataclass(frozen=True)
class SeedSpec:
    files: int = DEFAULT_FILES
    classifications: int = DEFAULT_CLASSIFICATIONS
    files_per_batch: int = DEFAULT_FILES_PER_BATCH
    flagged_share: float = DEFAULT_FLAGGED_SHARE
    seed: int = DEFAULT_SEED
    with_words: bool = False  # word timings make transcripts ~10x larger

    def __post_init__(self) -> None:
        combos = len(POLICIES) * len(MODELS)
        if self.files < 1:
            raise ValueError(f"files must be at least 1, got {self.files}")
        if not 0 <= self.classifications <= self.files * combos:
            raise ValueError(
                f"classifications must be 0..{self.files * combos} (files x {len(POLICIES)} "
                f"policies x {len(MODELS)} models, one each), got {self.classifications}"
            )
        if self.files_per_batch < 1:
            raise ValueError(f"files_per_batch must be at least 1, got {self.files_per_batch}")
        if not 0.0 <= self.flagged_share <= 1.0:
            raise ValueError(f"flagged_share must be within 0..1, got {self.flagged_share}")

    @property
    def batches(self) -> int:
        return -(-self.files // self.files_per_batch)


@dataclass
class SeedResult:
    counts: dict[str, int]
    flagged: int
    seconds: dict[str, float] = field(default_factory=dict)


# --- generation (pure: the same spec gives the same bytes) ---------------------------


@dataclass(frozen=True)
class _Files:
    """Per-file columns, index i is audio id i + 1."""

    batch_index: np.ndarray
    duration: np.ndarray
    segments: np.ndarray  # segment count
    size_bytes: np.ndarray
    host_index: np.ndarray
    sha256: list[str]


def _batch_id(index: int) -> str:
    return f"seed-{index:06d}"


def _rel_path(audio_id: int) -> str:
    return f"calls/{audio_id:08d}.mp3"


def _files(spec: SeedSpec, rng: np.random.Generator) -> _Files:
    n = spec.files
    # call lengths are long-tailed: median ~40 s, a few over ten minutes
    duration = np.round(np.maximum(rng.lognormal(3.7, 0.9, n), MIN_DURATION_S), 2)
    segments = np.clip(np.ceil(duration / SEGMENT_SECONDS), 1, MAX_SEGMENTS).astype(np.int64)
    raw = rng.bytes(32 * n)
    return _Files(
        batch_index=np.arange(n) // spec.files_per_batch,
        duration=duration,
        segments=segments,
        size_bytes=(duration * 16_000).astype(np.int64) + rng.integers(0, 4096, n),
        host_index=rng.integers(0, len(HOSTS), n),
        sha256=[raw[i * 32 : (i + 1) * 32].hex() for i in range(n)],
    )


def _chunks(lines: Iterator[str]) -> Iterator[bytes]:
    buf: list[str] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= CHUNK_ROWS:
            yield "".join(buf).encode()
            buf = []
    if buf:
        yield "".join(buf).encode()


def batch_rows(spec: SeedSpec, files: _Files) -> Iterator[str]:
    counts = np.bincount(files.batch_index, minlength=spec.batches).tolist()
    sizes = np.bincount(files.batch_index, weights=files.size_bytes, minlength=spec.batches)
    for b in range(spec.batches):
        bid = _batch_id(b)
        created = BATCH_EPOCH + b * BATCH_INTERVAL
        t1, t2, t3 = (created + timedelta(minutes=m) for m in (2, 9, 45))
        sha = f"{b:064x}"
        yield (
            f"{bid}\tarchives/{bid}.tar\tcollect-01\t/srv/incoming/{bid}.tar\t"
            f"{int(sizes[b]) + 10240}\t{sha}\t{counts[b]}\tdone\t{HOSTS[b % len(HOSTS)]}\t"
            f"{created.isoformat()}\t{t1.isoformat()}\t{t2.isoformat()}\t{t3.isoformat()}\n"
        )


def audio_rows(spec: SeedSpec, files: _Files) -> Iterator[str]:
    for i, (b, dur, size, host) in enumerate(
        zip(
            files.batch_index.tolist(),
            files.duration.tolist(),
            files.size_bytes.tolist(),
            files.host_index.tolist(),
            strict=True,
        )
    ):
        aid = i + 1
        bid = _batch_id(b)
        yield (
            f"{aid}\t{bid}\t{_rel_path(aid)}\t{size}\t{files.sha256[i]}\t{dur}\t"
            f"audio/{bid}/calls/{aid:08d}.opus\t{HOSTS[host]}\tdone\n"
        )


def _segment_bounds(duration: float, count: int, index: int) -> tuple[float, float]:
    step = duration / count
    return round(index * step, 2), round((index + 1) * step, 2)


def _words_json(text: str, start: float, end: float) -> str:
    words = text.split()
    step = (end - start) / len(words)
    return ", ".join(
        f'{{"start": {start + k * step:.2f}, "end": {start + (k + 1) * step:.2f}, '
        f'"word": " {w}", "probability": 0.9}}'
        for k, w in enumerate(words)
    )


def transcript_rows(spec: SeedSpec, files: _Files, rng: np.random.Generator) -> Iterator[str]:
    sentence_ids = rng.integers(0, len(SENTENCES), int(files.segments.sum())).tolist()
    lang_prob = np.round(rng.uniform(0.9, 1.0, spec.files), 3).tolist()
    cursor = 0
    for i, (dur, nseg) in enumerate(
        zip(files.duration.tolist(), files.segments.tolist(), strict=True)
    ):
        texts = [SENTENCES[s] for s in sentence_ids[cursor : cursor + nseg]]
        cursor += nseg
        segs = []
        for j, text in enumerate(texts):
            start, end = _segment_bounds(dur, nseg, j)
            words = _words_json(text, start, end) if spec.with_words else ""
            segs.append(
                f'{{"id": {j}, "start": {start}, "end": {end}, "text": " {text}", '
                f'"words": [{words}]}}'
            )
        yield (
            f"{i + 1}\t{' '.join(texts)}\ten\t{lang_prob[i]}\t[{', '.join(segs)}]\t"
            f"{ASR_MODEL}\t{ASR_BACKEND}\t{dur}\t{round(dur / 20, 3)}\n"
        )


def classification_plan(spec: SeedSpec) -> tuple[np.ndarray, np.ndarray]:
    """(audio index, combo index) per classification, spread evenly over the files.

    File i gets base or base + 1 classifications; its combos start at i mod C and
    wrap, so (audio, policy, model) stays unique and every combo gets used.
    """
    combos = len(POLICIES) * len(MODELS)
    base, extra = divmod(spec.classifications, spec.files)
    per_file = np.full(spec.files, base, dtype=np.int64)
    per_file[:extra] += 1
    audio_index = np.repeat(np.arange(spec.files), per_file)
    starts = np.cumsum(per_file) - per_file
    rank = np.arange(spec.classifications) - np.repeat(starts, per_file)
    combo = (audio_index + rank) % combos
    return audio_index, combo


def classification_rows(
    spec: SeedSpec, files: _Files, policy_ids: list[int], rng: np.random.Generator
) -> Iterator[str]:
    audio_index, combo = classification_plan(spec)
    m = spec.classifications
    flagged = rng.random(m) < spec.flagged_share
    # flagged scores crowd towards 1, the rest towards 0, as a calibrated model's do
    score = np.where(
        flagged,
        THRESHOLD + (1 - THRESHOLD) * rng.beta(2.0, 1.2, m),
        THRESHOLD * rng.beta(0.8, 4.0, m),
    )
    score = np.clip(np.round(score, 4), SCORE_MIN, SCORE_MAX)
    score = np.where(flagged, np.maximum(score, THRESHOLD), np.minimum(score, THRESHOLD - 1e-4))
    evidence_seg = rng.integers(0, MAX_SEGMENTS, m) % files.segments[audio_index]
    nmodels = len(MODELS)
    durations = files.duration.tolist()
    nsegs = files.segments.tolist()
    for k, (a, c, s, f, seg) in enumerate(
        zip(
            audio_index.tolist(),
            combo.tolist(),
            score.tolist(),
            flagged.tolist(),
            evidence_seg.tolist(),
            strict=True,
        )
    ):
        if f:
            start, end = _segment_bounds(durations[a], nsegs[a], seg)
            evidence = (
                f'[{{"segment": {seg}, "start": {start}, "end": {end}, "score": {s}, "terms": []}}]'
            )
        else:
            evidence = "[]"
        yield (
            f"{k + 1}\t{a + 1}\t{policy_ids[c // nmodels]}\t{MODELS[c % nmodels]}\t{s}\t"
            f"{int(f)}\t{THRESHOLD}\t{evidence}\n"
        )


# --- database ----------------------------------------------------------------------

_TABLES = ("batches", "audio_files", "transcripts", "policies", "classifications")
_COPY = {
    "batches": "COPY batches (batch_id, s3_key, source_host, source_path, archive_bytes, "
    "archive_sha256, file_count, status, unpack_host, created_at, transferred_at, "
    "unpacked_at, completed_at) FROM STDIN",
    "audio_files": "COPY audio_files (id, batch_id, rel_path, size_bytes, sha256, duration_s, "
    "opus_s3_key, host, status) FROM STDIN",
    "transcripts": "COPY transcripts (audio_id, text, language, language_probability, "
    "segments, model, backend, audio_seconds, processing_seconds) FROM STDIN",
    "classifications": "COPY classifications (id, audio_id, policy_id, model, score, label, "
    "threshold, evidence) FROM STDIN",
}


def _policy_text(name: str, version: int) -> str:
    topic = name.replace("_", " ")
    return (
        f"Content violates this policy (v{version}) when it contains {topic}: "
        f"speech that expresses, promotes or threatens {topic} toward a person or group."
    )


def _ensure_empty(conn: psycopg.Connection) -> None:
    # EXCLUSIVE blocks writers (another seeder, a worker) until commit; readers go on.
    conn.execute(f"LOCK TABLE {', '.join(_TABLES)} IN EXCLUSIVE MODE")
    counts = {
        t: conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT 1) s").fetchone()[0]  # type: ignore[index]
        for t in _TABLES
    }
    busy = [t for t, n in counts.items() if n]
    if busy:
        raise SeedError(
            f"database already holds pipeline rows (in {', '.join(busy)}); "
            "seed an empty database with the schema applied"
        )


def _copy(conn: psycopg.Connection, table: str, lines: Iterator[str]) -> None:
    """COPY the rows with the table's foreign keys and plain indexes set aside.

    Checking a foreign key row by row and growing a btree row by row cost several
    times what building them once afterwards does (the PostgreSQL manual's
    "Populating a Database"). The definitions are read from the catalog, dropped and
    recreated verbatim inside this transaction, so schema.sql stays the only source
    and a failure rolls the drop back too. Primary keys and unique constraints stay:
    other tables may reference them.
    """
    recreate = _set_aside_keys(conn, table)
    with conn.cursor() as cur, cur.copy(_COPY[table]) as copy:
        for chunk in _chunks(lines):
            copy.write(chunk)
    for statement in recreate:
        conn.execute(statement)


def _set_aside_keys(conn: psycopg.Connection, table: str) -> list[str]:
    indexes = conn.execute(
        "SELECT i.relname, pg_get_indexdef(x.indexrelid) FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE x.indrelid = %s::regclass "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid "
        "AND c.conrelid = x.indrelid) ORDER BY 1",
        (table,),
    ).fetchall()
    foreign_keys = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'f' ORDER BY 1",
        (table,),
    ).fetchall()
    recreate = [definition for _, definition in indexes]
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    for name, definition in foreign_keys:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(table), sql.Identifier(name)
            )
        )
        recreate.append(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ")
            .format(sql.Identifier(table), sql.Identifier(name))
            .as_string(conn)
            + definition
        )
    return recreate


def table_rows(spec: SeedSpec, policy_ids: list[int]) -> Iterator[tuple[str, Iterator[str]]]:
    """(table, COPY text lines) in load order; the same spec gives the same lines.

    Each table draws from its own stream of the seed, so the lines do not depend on
    which tables were generated before, or how far.
    """
    files_rng, transcripts_rng, classifications_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3)
    )
    files = _files(spec, files_rng)
    yield "batches", batch_rows(spec, files)
    yield "audio_files", audio_rows(spec, files)
    yield "transcripts", transcript_rows(spec, files, transcripts_rng)
    yield "classifications", classification_rows(spec, files, policy_ids, classifications_rng)


def _insert_policies(conn: psycopg.Connection) -> list[int]:
    return [
        conn.execute(
            "INSERT INTO policies (name, version, text, active) VALUES (%s, %s, %s, %s) "
            "RETURNING id",
            (name, version, _policy_text(name, version), active),
        ).fetchone()[0]  # type: ignore[index]
        for name, version, active in POLICIES
    ]


def seed(conninfo: str, spec: SeedSpec, *, log: Callable[[str], None] | None = None) -> SeedResult:
    """Seed an empty pipeline database; returns row counts and seconds per step."""
    say = log or (lambda msg: None)
    result = SeedResult(counts={}, flagged=0)
    t0 = time.perf_counter()
    with psycopg.connect(conninfo) as conn:
        # one commit at the end: a crash loses the whole seed, so durability buys nothing
        conn.execute("SET synchronous_commit = off")
        conn.execute(f"SET maintenance_work_mem = '{INDEX_BUILD_MEMORY_MB}MB'")
        _ensure_empty(conn)
        policy_ids = _insert_policies(conn)
        for table, lines in table_rows(spec, policy_ids):
            t = time.perf_counter()
            _copy(conn, table, lines)
            result.seconds[table] = round(time.perf_counter() - t, 3)
            say(f"{table}: {result.seconds[table]:.1f} s")
        for table in ("audio_files", "classifications"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )
        conn.commit()
        t = time.perf_counter()
        conn.execute(f"ANALYZE {', '.join(_TABLES)}")  # the planner must see 1M rows, not 0
        conn.commit()
        result.seconds["analyze"] = round(time.perf_counter() - t, 3)
        for table in _TABLES:
            count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            result.counts[table] = count[0]  # type: ignore[index]
        flagged = conn.execute("SELECT count(*) FROM classifications WHERE label = 1").fetchone()
        result.flagged = flagged[0]  # type: ignore[index]
    result.seconds["total"] = round(time.perf_counter() - t0, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database_url", help="libpq URL of an empty database, pipeline role")
    parser.add_argument("--files", type=int, default=DEFAULT_FILES)
    parser.add_argument("--classifications", type=int, default=DEFAULT_CLASSIFICATIONS)
    parser.add_argument("--files-per-batch", type=int, default=DEFAULT_FILES_PER_BATCH)
    parser.add_argument("--flagged-share", type=float, default=DEFAULT_FLAGGED_SHARE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--with-words", action="store_true", help="add word timings")
    args = parser.parse_args(argv)
    try:
        spec = SeedSpec(
            files=args.files,
            classifications=args.classifications,
            files_per_batch=args.files_per_batch,
            flagged_share=args.flagged_share,
            seed=args.seed,
            with_words=args.with_words,
        )
    except ValueError as exc:
        parser.error(str(exc))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = seed(args.database_url, spec, log=log)
    except (SeedError, psycopg.Error) as exc:
        print(f"seed_ra_db: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"spec": asdict(spec), **asdict(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
