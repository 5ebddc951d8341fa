-- PostgreSQL keeps times as timestamptz and takes "now" from the database clock.
-- SQLite keeps integer microseconds (see ../sqlite/migrations).

CREATE TABLE deferq_executions (
    id              text COLLATE "C" PRIMARY KEY,  -- time-ordered: ORDER BY id is creation order
    function_name   text NOT NULL,
    state           text NOT NULL,
    arguments       text NOT NULL,          -- JSON text [args, kwargs], kept byte for byte
    metadata        jsonb,                  -- NULL when empty; searched with @> (GIN)
    result          text,
    created_at      timestamptz NOT NULL,
    scheduled_for   timestamptz NOT NULL,
    discard_after   timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    failed_attempts integer NOT NULL DEFAULT 0,
    retry_policy    text,
    max_duration    double precision NOT NULL,
    worker_id       text,
    error_code      text,
    error_message   text,
    cron_tick       timestamptz
);

CREATE INDEX deferq_executions_due ON deferq_executions (scheduled_for, id)
    WHERE state = 'created';
CREATE INDEX deferq_executions_discard ON deferq_executions (discard_after)
    WHERE state = 'created' AND discard_after IS NOT NULL;
CREATE INDEX deferq_executions_running ON deferq_executions (function_name, worker_id)
    WHERE state IN ('started', 'aborting');
CREATE INDEX deferq_executions_worker ON deferq_executions (worker_id)
    WHERE state IN ('started', 'aborting');
CREATE INDEX deferq_executions_function ON deferq_executions (function_name, id);
CREATE INDEX deferq_executions_state ON deferq_executions (state, id);
CREATE INDEX deferq_executions_finished ON deferq_executions (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX deferq_executions_metadata ON deferq_executions
    USING gin (metadata jsonb_path_ops) WHERE metadata IS NOT NULL;
CREATE UNIQUE INDEX deferq_executions_cron_tick ON deferq_executions (function_name, cron_tick)
    WHERE cron_tick IS NOT NULL;

CREATE TABLE deferq_attempts (
    execution_id  text COLLATE "C" NOT NULL,
    number        integer NOT NULL,
    worker_id     text,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    outcome       text NOT NULL,
    error_code    text,
    error_message text,
    traceback     text,
    PRIMARY KEY (execution_id, number)
);

CREATE TABLE deferq_workers (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at   timestamptz,
    lost_at      timestamptz
);
CREATE INDEX deferq_workers_alive ON deferq_workers (heartbeat_at)
    WHERE lost_at IS NULL AND stopped_at IS NULL;

CREATE TABLE deferq_schedules (
    function_name text PRIMARY KEY,
    expression    text NOT NULL,
    timezone      text NOT NULL,
    first_seen    timestamptz NOT NULL,
    last_tick     timestamptz,
    next_tick     timestamptz,
    seen_at       timestamptz NOT NULL
);
