//! The SQLite schema and its versioned migrations (`PRAGMA user_version`).

use rusqlite::Connection;

use crate::store::StoreError;

const SCHEMA_VERSION: i64 = 5;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    status              TEXT NOT NULL,
    prompt              TEXT NOT NULL,
    negative_prompt     TEXT NOT NULL,
    seed                INTEGER,
    workflow            TEXT NOT NULL,
    params              TEXT NOT NULL,
    input_content_type  TEXT NOT NULL,
    input_size          INTEGER NOT NULL,
    input_width         INTEGER NOT NULL,
    input_height        INTEGER NOT NULL,
    input_present       INTEGER NOT NULL DEFAULT 1,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    attempts            INTEGER NOT NULL DEFAULT 0,
    lease_token         TEXT,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    progress            TEXT,
    error_message       TEXT,
    result_state        TEXT NOT NULL DEFAULT 'none',
    result_content_type TEXT,
    result_size         INTEGER,
    comfy_execution_ms  INTEGER,
    idempotency_key     TEXT UNIQUE,
    request_fingerprint TEXT,
    version             INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_lease_expiry ON jobs (lease_expires_at) WHERE status = 'running';
";

/// Version 1 to 2, in one transaction. The sweep must touch only rows with work to do and `/health`
/// must not count a million rows, so: indexes on finish time (for `RESULT_TTL` over the rows that
/// still have files, and for `JOB_RETENTION` over all finished rows), a counts table kept exact by
/// triggers in the same transactions as the changes, and the restart grace of `JOB_TIMEOUT`.
const MIGRATE_TO_2: &str = "
ALTER TABLE jobs ADD COLUMN timeout_grace_until INTEGER;
CREATE INDEX jobs_with_files_by_finish ON jobs (finished_at) WHERE input_present = 1 OR result_state = 'present';
CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO job_counts (status, n)
    SELECT s.status, (SELECT COUNT(*) FROM jobs WHERE jobs.status = s.status)
    FROM (SELECT 'queued' AS status UNION ALL SELECT 'running' UNION ALL SELECT 'done'
          UNION ALL SELECT 'error' UNION ALL SELECT 'cancelled') AS s;
CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
END;
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
END;
CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status ON jobs WHEN OLD.status <> NEW.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
END;
";

/// Version 2 to 3: streams. Every job belongs to a stream (`''` is the anonymous one of jobs
/// submitted without); the claim serves streams round-robin by `stream_turns.served` (the claim
/// count at the stream's last claim), and a `latest` submission finds its stream's waiting jobs
/// through a partial index. Old cancelled jobs were all cancelled by a client.
const MIGRATE_TO_3: &str = "
ALTER TABLE jobs ADD COLUMN stream TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'queue';
ALTER TABLE jobs ADD COLUMN previews INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_reason TEXT;
ALTER TABLE jobs ADD COLUMN superseded_by TEXT;
ALTER TABLE jobs ADD COLUMN reused_from TEXT;
ALTER TABLE jobs ADD COLUMN dedupe_key TEXT;
UPDATE jobs SET cancel_reason = 'cancelled' WHERE status = 'cancelled';
CREATE INDEX jobs_waiting_by_stream ON jobs (stream, seq) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_done_by_stream ON jobs (stream, finished_at) WHERE status = 'done';
CREATE TABLE stream_turns (stream TEXT PRIMARY KEY, served INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX stream_turns_by_served ON stream_turns (served);
";

/// Version 3 to 4: the `dedupe` flag is kept, so a job queued while its twin ran is answered
/// from the twin's result when its turn comes; the stream's last finished job is the newest by
/// submission (`seq`), not by finish time, so a hit stays the reference after an older job
/// finishes later.
const MIGRATE_TO_4: &str = "
ALTER TABLE jobs ADD COLUMN dedupe INTEGER NOT NULL DEFAULT 0;
DROP INDEX jobs_done_by_stream;
CREATE INDEX jobs_done_by_stream_seq ON jobs (stream, seq) WHERE status = 'done';
";

/// Version 4 to 5: prefetch. A running job leased to a server that was busy waits in ComfyUI's
/// queue (`prefetched = 1`) until its worker says ComfyUI started it; until then it counts as not
/// started for `latest` supersedes, and no other job of its (named) stream is claimed, so a
/// stream's jobs still start in submission order across servers.
const MIGRATE_TO_5: &str = "
ALTER TABLE jobs ADD COLUMN prefetched INTEGER NOT NULL DEFAULT 0;
";

/// The steps after version 1, each bringing the schema from the version before it to its own.
const MIGRATIONS: &[(i64, &str)] = &[(2, MIGRATE_TO_2), (3, MIGRATE_TO_3), (4, MIGRATE_TO_4), (5, MIGRATE_TO_5)];

/// Brings the database's schema up to [`SCHEMA_VERSION`], or refuses one newer than this broker.
pub(super) fn migrate(writer: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = writer.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this broker understands ({SCHEMA_VERSION})"
        )));
    }
    if version < SCHEMA_VERSION {
        // Every step and the version bump commit together: a crash mid-migration leaves the
        // database as it was.
        let tx = writer.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        for (to, step) in MIGRATIONS {
            if version < *to {
                tx.execute_batch(step)?;
            }
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(())
}
