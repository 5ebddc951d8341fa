-- SQLite keeps times as integer microseconds since the Unix epoch, in UTC.
-- PostgreSQL keeps them as timestamptz (see ../postgres/migrations).

CREATE TABLE deferq_executions (
    id              TEXT PRIMARY KEY,      -- time-ordered, so ORDER BY id is creation order
    function_name   TEXT NOT NULL,
    state           TEXT NOT NULL,
    arguments       TEXT NOT NULL,         -- JSON: [args, kwargs]
    metadata        TEXT,                  -- JSON object, NULL when empty
    result          TEXT,                  -- JSON, set when succeeded
    created_at      INTEGER NOT NULL,
    scheduled_for   INTEGER NOT NULL,
    discard_after   INTEGER,
    started_at      INTEGER,
    finished_at     INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    retry_policy    TEXT,                  -- JSON, NULL for no retry
    max_duration    REAL NOT NULL,         -- seconds
    worker_id       TEXT,                  -- the worker running the current attempt
    error_code      TEXT,
    error_message   TEXT,
    cron_tick       INTEGER
) WITHOUT ROWID;

-- The claim query walks this index in due order.
CREATE INDEX deferq_executions_due ON deferq_executions (scheduled_for)
    WHERE state = 'created';
CREATE INDEX deferq_executions_discard ON deferq_executions (discard_after)
    WHERE state = 'created' AND discard_after IS NOT NULL;
CREATE INDEX deferq_executions_running ON deferq_executions (worker_id, function_name)
    WHERE state IN ('started', 'aborting');
CREATE INDEX deferq_executions_function ON deferq_executions (function_name, id);
CREATE INDEX deferq_executions_state ON deferq_executions (state, id);
CREATE INDEX deferq_executions_finished ON deferq_executions (finished_at)
    WHERE finished_at IS NOT NULL;
-- Exactly one execution per cron tick, whatever number of schedulers race for it.
CREATE UNIQUE INDEX deferq_executions_cron_tick ON deferq_executions (function_name, cron_tick)
    WHERE cron_tick IS NOT NULL;

CREATE TABLE deferq_metadata (
    execution_id TEXT NOT NULL,
    key          TEXT NOT NULL,
    value        TEXT NOT NULL,
    PRIMARY KEY (key, value, execution_id)
) WITHOUT ROWID;
CREATE INDEX deferq_metadata_execution ON deferq_metadata (execution_id);

CREATE TABLE deferq_attempts (
    execution_id  TEXT NOT NULL,
    number        INTEGER NOT NULL,
    worker_id     TEXT,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    outcome       TEXT NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    traceback     TEXT,
    PRIMARY KEY (execution_id, number)
) WITHOUT ROWID;

CREATE TABLE deferq_workers (
    id           TEXT PRIMARY KEY,   -- new for every start, so a restart never hides a loss
    name         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    stopped_at   INTEGER,
    lost_at      INTEGER
) WITHOUT ROWID;

-- One row per cron schedule that a worker has run. `last_tick` is the latest tick an
-- execution was stored for; it outlives pruned executions, so a tick is never stored twice.
CREATE TABLE deferq_schedules (
    function_name TEXT PRIMARY KEY,
    expression    TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    first_seen    INTEGER NOT NULL,
    last_tick     INTEGER,
    next_tick     INTEGER,
    seen_at       INTEGER NOT NULL
) WITHOUT ROWID;
