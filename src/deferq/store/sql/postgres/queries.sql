-- Named queries of the PostgreSQL store. Parameters are psycopg's %(name)s. Every "now" is
-- the database's now(), so workers' clocks never decide what is due or lost. Relative times
-- arrive as seconds (`*_in`), absolute ones as timestamptz (`*_at`).

-- name: insert_execution
-- One round trip: insert, then wake listening workers (delivered at commit).
WITH inserted AS (
    INSERT INTO deferq_executions (
        id, function_name, state, arguments, metadata, created_at, scheduled_for,
        discard_after, retry_policy, max_duration, cron_tick
    ) VALUES (
        %(id)s, %(function_name)s, 'created', %(arguments)s, %(metadata)s::jsonb, now(),
        coalesce(%(scheduled_at)s::timestamptz, now() + %(scheduled_in)s * interval '1 second'),
        coalesce(%(discard_at)s::timestamptz, now() + %(discard_in)s * interval '1 second'),
        %(retry_policy)s, %(max_duration)s, %(cron_tick)s
    )
    RETURNING created_at, scheduled_for, discard_after
)
SELECT created_at, scheduled_for, discard_after, pg_notify(%(channel)s, '') FROM inserted

-- name: insert_executions
-- Bulk: one statement over arrays, times computed by the database.
INSERT INTO deferq_executions (
    id, function_name, state, arguments, metadata, created_at, scheduled_for, discard_after,
    retry_policy, max_duration
)
SELECT i, f, 'created', a, m::jsonb, now(),
    coalesce(sa, now() + si * interval '1 second'),
    coalesce(da, now() + di * interval '1 second'),
    r, d
FROM unnest(
    %(ids)s::text[], %(functions)s::text[], %(arguments)s::text[], %(metadata)s::text[],
    %(scheduled_at)s::timestamptz[], %(scheduled_in)s::float8[],
    %(discard_at)s::timestamptz[], %(discard_in)s::float8[],
    %(retry_policies)s::text[], %(max_durations)s::float8[]
) AS t(i, f, a, m, sa, si, da, di, r, d)
RETURNING id, created_at, scheduled_for, discard_after

-- name: notify
SELECT pg_notify(%(channel)s, '')

-- name: insert_cron_execution
INSERT INTO deferq_executions (
    id, function_name, state, arguments, created_at, scheduled_for, retry_policy,
    max_duration, cron_tick
) VALUES (
    %(id)s, %(function_name)s, 'created', %(arguments)s, now(), %(scheduled_at)s,
    %(retry_policy)s, %(max_duration)s, %(cron_tick)s
)
ON CONFLICT (function_name, cron_tick) WHERE cron_tick IS NOT NULL DO NOTHING

-- name: set_last_tick
UPDATE deferq_schedules
SET last_tick = greatest(last_tick, %(tick)s), next_tick = %(next_tick)s
WHERE function_name = %(name)s

-- name: upsert_schedule
-- A changed expression or time zone starts the schedule afresh: no catch-up of the old one.
INSERT INTO deferq_schedules AS s
    (function_name, expression, timezone, first_seen, seen_at, next_tick)
VALUES (%(name)s, %(expression)s, %(timezone)s, %(now)s, %(now)s, %(next_tick)s)
ON CONFLICT (function_name) DO UPDATE SET
    first_seen = CASE WHEN s.expression = excluded.expression
        AND s.timezone = excluded.timezone THEN s.first_seen ELSE excluded.first_seen END,
    last_tick = CASE WHEN s.expression = excluded.expression
        AND s.timezone = excluded.timezone THEN s.last_tick ELSE NULL END,
    expression = excluded.expression,
    timezone = excluded.timezone,
    seen_at = excluded.seen_at,
    next_tick = excluded.next_tick
RETURNING first_seen, last_tick

-- name: list_schedules
SELECT * FROM deferq_schedules ORDER BY function_name

-- name: get_execution
SELECT * FROM deferq_executions WHERE id = %(id)s

-- name: list_attempts
SELECT * FROM deferq_attempts WHERE execution_id = %(id)s ORDER BY number

-- name: cancel_execution
-- created → cancelled; with force, started → aborting. Returns the row as it now is.
WITH changed AS (
    UPDATE deferq_executions
    SET state = CASE WHEN state = 'created' THEN 'cancelled' ELSE 'aborting' END,
        finished_at = CASE WHEN state = 'created' THEN now() ELSE finished_at END,
        error_message = CASE WHEN state = 'created' THEN 'cancelled on request'
            ELSE error_message END
    WHERE id = %(id)s AND (state = 'created' OR (%(force)s AND state = 'started'))
    RETURNING *
)
SELECT * FROM changed
UNION ALL
SELECT * FROM deferq_executions WHERE id = %(id)s AND NOT EXISTS (SELECT 1 FROM changed)

-- name: reschedule
WITH changed AS (
    UPDATE deferq_executions
    SET scheduled_for = coalesce(%(at)s::timestamptz, now() + %(in)s * interval '1 second')
    WHERE id = %(id)s AND state = 'created'
    RETURNING *
)
SELECT * FROM changed
UNION ALL
SELECT * FROM deferq_executions WHERE id = %(id)s AND NOT EXISTS (SELECT 1 FROM changed)

-- name: register_worker
INSERT INTO deferq_workers (id, name, host, pid, started_at, heartbeat_at)
VALUES (%(id)s, %(name)s, %(host)s, %(pid)s, now(), now())

-- name: heartbeat
UPDATE deferq_workers SET heartbeat_at = now() WHERE id = %(id)s AND lost_at IS NULL

-- name: unregister_worker
UPDATE deferq_workers SET stopped_at = now() WHERE id = %(id)s

-- name: lock_function
-- Serializes claims of one concurrency-limited function across all workers.
SELECT pg_advisory_xact_lock(hashtextextended('deferq.function:' || %(name)s, 0))

-- name: running_count
SELECT count(*) FROM deferq_executions
WHERE state IN ('started', 'aborting') AND function_name = %(name)s

-- name: claim
WITH due AS (
    SELECT id FROM deferq_executions
    WHERE state = 'created'
        AND scheduled_for <= now() + %(horizon)s * interval '1 second'
        AND (discard_after IS NULL OR discard_after > now())
        AND function_name = ANY(%(functions)s)
    ORDER BY scheduled_for, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), started AS (
    UPDATE deferq_executions e
    SET state = 'started', started_at = now(), attempts = e.attempts + 1,
        worker_id = %(worker)s
    FROM due
    WHERE e.id = due.id
    RETURNING e.id, e.function_name, e.arguments, e.attempts, e.failed_attempts,
        e.retry_policy, e.max_duration, e.discard_after, e.started_at, e.scheduled_for
), attempt AS (
    INSERT INTO deferq_attempts (execution_id, number, worker_id, started_at, outcome)
    SELECT id, attempts, %(worker)s, started_at, 'running' FROM started
)
SELECT * FROM started ORDER BY scheduled_for, id

-- name: cancel_limited
-- Due executions of a function at its concurrency limit, beyond the free places, cancelled.
WITH due AS (
    SELECT id FROM deferq_executions
    WHERE state = 'created' AND scheduled_for <= now()
        AND (discard_after IS NULL OR discard_after > now())
        AND function_name = %(name)s
    ORDER BY scheduled_for, id
    OFFSET %(keep)s
    FOR UPDATE SKIP LOCKED
)
UPDATE deferq_executions e
SET state = 'cancelled', finished_at = now(), error_code = 'concurrency_limit',
    error_message = %(reason)s
FROM due WHERE e.id = due.id

-- name: finish_execution
-- An aborting execution ends aborted whatever its attempt did (the attempt row keeps what
-- happened); a retry at or after discard_after is discarded instead.
UPDATE deferq_executions e
SET state = CASE
        WHEN e.state = 'aborting' THEN 'aborted'
        WHEN r.retry_at IS NULL THEN %(state)s
        WHEN e.discard_after IS NOT NULL AND r.retry_at >= e.discard_after THEN 'discarded'
        ELSE 'created' END,
    scheduled_for = CASE WHEN e.state = 'aborting' THEN e.scheduled_for
        ELSE coalesce(r.retry_at, e.scheduled_for) END,
    finished_at = CASE
        WHEN e.state = 'aborting' OR r.retry_at IS NULL THEN now()
        WHEN e.discard_after IS NOT NULL AND r.retry_at >= e.discard_after THEN now()
        ELSE NULL END,
    result = %(result)s,
    error_code = CASE WHEN e.state = 'aborting' THEN 'aborted' ELSE %(error_code)s END,
    error_message = CASE WHEN e.state = 'aborting' THEN 'aborted on request'
        ELSE %(error_message)s END,
    failed_attempts = e.failed_attempts + %(counts_as_failure)s,
    worker_id = NULL
FROM (SELECT now() + %(retry_in)s * interval '1 second' AS retry_at) r
WHERE e.id = %(id)s AND e.attempts = %(number)s AND e.state IN ('started', 'aborting')

-- name: finish_attempt
UPDATE deferq_attempts
SET finished_at = now(), outcome = %(outcome)s, error_code = %(error_code)s,
    error_message = %(error_message)s, traceback = %(traceback)s
WHERE execution_id = %(id)s AND number = %(number)s AND outcome = 'running'

-- name: aborting_executions
SELECT id FROM deferq_executions WHERE worker_id = %(worker)s AND state = 'aborting'

-- name: discard_expired
UPDATE deferq_executions
SET state = 'discarded', finished_at = now(),
    error_message = 'not started before its discard_after'
WHERE state = 'created' AND discard_after IS NOT NULL AND discard_after <= now()

-- name: declare_lost_workers
UPDATE deferq_workers SET lost_at = now()
WHERE lost_at IS NULL AND stopped_at IS NULL
    AND heartbeat_at < now() - %(lost_after)s * interval '1 second'
RETURNING id

-- name: running_of_workers
SELECT id, function_name, arguments, attempts, failed_attempts, retry_policy, max_duration,
    discard_after, started_at
FROM deferq_executions
WHERE worker_id = ANY(%(workers)s) AND state IN ('started', 'aborting')

-- name: next_due
SELECT extract(epoch FROM min(scheduled_for) - now()) FROM deferq_executions
WHERE state = 'created'

-- name: prune_finished
WITH gone AS (
    DELETE FROM deferq_executions
    WHERE finished_at IS NOT NULL AND finished_at < now() - %(older_than)s * interval '1 second'
    RETURNING id
), attempts AS (
    DELETE FROM deferq_attempts a USING gone WHERE a.execution_id = gone.id
)
SELECT count(*) FROM gone
