-- Pipeline schema: the system of record for batches, audio files, transcripts,
-- policies and classifications. Owned by the pipeline; the RA app only reads it.
--
-- Idempotent: applied on every deploy (Ansible orchestrator role) and by the
-- local stack. Only additive, guarded statements belong here (CREATE ... IF NOT
-- EXISTS, ADD COLUMN IF NOT EXISTS, CREATE OR REPLACE VIEW with new columns
-- appended). A destructive change needs a reviewed, one-off migration instead.
--
-- This file never names an RA table (ra_*): they are created later by the RA
-- app's migrations and may not exist when this runs.

BEGIN;

-- Two deploys applying the schema at once would race on CREATE ... IF NOT EXISTS.
SELECT pg_advisory_xact_lock(hashtext('audio_pipeline.schema'));

-- One archive moved from the collection host. batch_id is the archive's name
-- without .tar and becomes a directory name on the GPU hosts, so it is restricted
-- to a safe alphabet.
CREATE TABLE IF NOT EXISTS batches (
    batch_id        text PRIMARY KEY
                    CHECK (batch_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    s3_key          text NOT NULL,
    source_host     text,
    source_path     text,
    archive_bytes   bigint CHECK (archive_bytes >= 0),
    archive_sha256  text CHECK (archive_sha256 ~ '^[0-9a-f]{64}$'),
    file_count      integer CHECK (file_count >= 0),
    status          text NOT NULL DEFAULT 'transferred'
                    CHECK (status IN ('transferring', 'transferred', 'unpacking',
                                      'unpacked', 'done', 'failed')),
    unpack_host     text,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    transferred_at  timestamptz,
    unpacked_at     timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One audio file found in a batch. id is the audio_id of transcribe jobs.
-- (batch_id, rel_path) is the natural key every upsert uses, so a redelivered
-- unpack job never duplicates a row.
CREATE TABLE IF NOT EXISTS audio_files (
    id              bigserial PRIMARY KEY,
    batch_id        text NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE,
    rel_path        text NOT NULL CHECK (rel_path <> '' AND rel_path !~ '^/'),
    size_bytes      bigint CHECK (size_bytes >= 0),
    sha256          text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    duration_s      double precision CHECK (duration_s >= 0),
    opus_s3_key     text,
    opus_path       text,
    host            text,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'converted', 'transcribing',
                                      'done', 'failed')),
    error           text,
    attempts        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (batch_id, rel_path)
);
CREATE INDEX IF NOT EXISTS audio_files_batch_status_idx ON audio_files (batch_id, status);
CREATE INDEX IF NOT EXISTS audio_files_unfinished_idx ON audio_files (status)
    WHERE status <> 'done';

-- How many of a finished batch's files failed (set when it turns 'done'; the
-- reasons are in audio_files.error). NULL while the batch is not done.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS files_failed integer CHECK (files_failed >= 0);

-- The transcript of one audio file (the latest run wins; re-classification reads
-- it without transcribing again). segments is a JSON array of
--   {"start": s, "end": s, "text": "...", "words": [{"start", "end", "word", "probability"}]}
CREATE TABLE IF NOT EXISTS transcripts (
    audio_id            bigint PRIMARY KEY REFERENCES audio_files (id) ON DELETE CASCADE,
    text                text NOT NULL,
    language            text,
    language_probability real,
    segments            jsonb NOT NULL DEFAULT '[]'::jsonb
                        CHECK (jsonb_typeof(segments) = 'array'),
    model               text NOT NULL,
    backend             text NOT NULL,
    audio_seconds       double precision CHECK (audio_seconds >= 0),
    processing_seconds  double precision CHECK (processing_seconds >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- A moderation policy, versioned: a new wording is a new row, never an edit, so
-- every classification can say exactly which text it was judged against.
-- lexicon holds the terms the 'lexicon' classifier backend matches.
CREATE TABLE IF NOT EXISTS policies (
    id          serial PRIMARY KEY,
    name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$'),
    version     integer NOT NULL CHECK (version > 0),
    text        text NOT NULL CHECK (text <> ''),
    lexicon     text[] NOT NULL DEFAULT '{}',
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS policies_active_idx ON policies (name, version) WHERE active;

-- One verdict of one model on one transcript under one policy version.
-- label follows CoPE-A's answer token: 1 = the content meets the policy (flagged),
-- 0 = it does not; it is score >= threshold, with the threshold kept beside it.
-- evidence lists the transcript segments that drove the verdict:
--   [{"segment": index, "start": s, "end": s, "score": x, "terms": [...]}]
CREATE TABLE IF NOT EXISTS classifications (
    id          bigserial PRIMARY KEY,
    audio_id    bigint NOT NULL REFERENCES audio_files (id) ON DELETE CASCADE,
    policy_id   integer NOT NULL REFERENCES policies (id),
    model       text NOT NULL,
    score       real NOT NULL CHECK (score >= 0 AND score <= 1),
    label       smallint NOT NULL CHECK (label IN (0, 1)),
    threshold   real NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
    evidence    jsonb NOT NULL DEFAULT '[]'::jsonb
                CHECK (jsonb_typeof(evidence) = 'array'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (audio_id, policy_id, model)
);
-- How much of the transcript the classifier judged. A model with a context limit
-- (CoPE-A) judges a long transcript in windows and keeps the most severe one:
-- windows = prompts it was judged in; truncated = some text was in no window
-- (CLASSIFIER_MAX_WINDOWS reached). NULL on rows written before these existed.
ALTER TABLE classifications ADD COLUMN IF NOT EXISTS windows integer CHECK (windows >= 1);
ALTER TABLE classifications ADD COLUMN IF NOT EXISTS truncated boolean;
-- The RA queue reads flagged rows by score; the partial index keeps it small.
CREATE INDEX IF NOT EXISTS classifications_flagged_idx
    ON classifications (score DESC, id) WHERE label = 1;
CREATE INDEX IF NOT EXISTS classifications_policy_idx ON classifications (policy_id, label);

-- A re-classification an operator asked for (`audio-pipeline reclassify`): the
-- stored transcripts of finished files judged again under one policy version by one
-- model, without transcribing again. Earlier verdicts stay: classifications keeps one
-- row per file x policy version x model. batch_id NULL: every finished batch.
CREATE TABLE IF NOT EXISTS reclassify_runs (
    id          bigserial PRIMARY KEY,
    policy_id   integer NOT NULL REFERENCES policies (id),
    model       text NOT NULL CHECK (model <> ''),
    batch_id    text REFERENCES batches (batch_id) ON DELETE CASCADE,
    files       integer NOT NULL CHECK (files >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- One file of a run: 'queued' until a gpu worker stores its verdict ('done', in the
-- same transaction as the classification) or its job is dead-lettered ('failed',
-- with the reason; the file itself and its batch are left as they were).
CREATE TABLE IF NOT EXISTS reclassify_files (
    run_id      bigint NOT NULL REFERENCES reclassify_runs (id) ON DELETE CASCADE,
    audio_id    bigint NOT NULL REFERENCES audio_files (id) ON DELETE CASCADE,
    status      text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'done', 'failed')),
    error       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, audio_id)
);
CREATE INDEX IF NOT EXISTS reclassify_files_open_idx ON reclassify_files (run_id)
    WHERE status <> 'done';

-- What the pipeline flagged: one row per flagged classification, with what a
-- reviewer needs to find and play the audio. Which rows still need review is the
-- RA app's own query over its own tables (this file never names them).
CREATE OR REPLACE VIEW ra_queue AS
SELECT
    c.id            AS classification_id,
    c.audio_id,
    a.batch_id,
    a.rel_path,
    a.opus_s3_key,
    a.duration_s,
    p.id            AS policy_id,
    p.name          AS policy_name,
    p.version       AS policy_version,
    c.model,
    c.score,
    c.threshold,
    c.evidence,
    c.created_at    AS classified_at,
    c.windows,
    c.truncated
FROM classifications c
JOIN audio_files a ON a.id = c.audio_id
JOIN policies p    ON p.id = c.policy_id
WHERE c.label = 1;

COMMIT;
