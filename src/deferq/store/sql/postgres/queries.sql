-- Named queries of the PostgreSQL store. Parameters are psycopg's %(name)s, except in
-- `insert_execution`, which is prepared once per connection and takes $1..$12.
--
-- Where they differ from the SQLite queries (../sqlite/queries.sql):
-- * every "now" is the database's now(), never the caller's clock: relative times arrive
--   as microseconds (`*_us`) and are added to now() here; absolute ones as timestamptz;
-- * batches travel as arrays (unnest) in one statement, where SQLite runs executemany;
-- * claims lock rows with FOR UPDATE SKIP LOCKED, where SQLite holds the database lock;
-- * enqueueing sends NOTIFY in the same statement, so idle workers wake at commit;
-- * metadata is a jsonb column searched with @>, where SQLite has a side table.

-- name: insert_execution
-- The single-call hot path, prepared once per connection: one round trip and one commit.
-- Returns now() as created_at; the store derives scheduled_for and discard_after from it
-- exactly as the database computed them.
INSERT INTO deferq_executions (
    id, function_name, state, arguments, metadata, created_at, scheduled_for,
    discard_after, retry_policy, max_duration, cron_tick
) VALUES (
    $1, $2, 'created', $3, $4::jsonb, now(),
    coalesce($5::timestamptz, now() + $6::bigint * interval '1 microsecond'),
    coalesce($7::timestamptz, now() + $8::bigint * interval '1 microsecond'),
    $9, $10::float8, $11::timestamptz
)
RETURNING created_at, pg_notify($12, '')

-- name: insert_execution_in_transaction
-- The same, on a connection and in a transaction of the caller: the notification is
-- delivered when (and only if) the caller commits.
INSERT INTO deferq_executions (
    id, function_name, state, arguments, metadata, created_at, scheduled_for,
    discard_after, retry_policy, max_duration, cron_tick
) VALUES (
    %(id)s, %(function_name)s, 'created', %(arguments)s, %(metadata)s::jsonb, now(),
    coalesce(%(scheduled_at)s::timestamptz,
        now() + %(scheduled_us)s::bigint * interval '1 microsecond'),
    coalesce(%(discard_at)s::timestamptz,
        now() + %(discard_us)s::bigint * interval '1 microsecond'),
    %(retry_policy)s, %(max_duration)s::float8, %(cron_tick)s::timestamptz
)
RETURNING created_at, pg_notify(%(channel)s, '')

-- name: now
SELECT now()

-- name: untimed
-- For the rest of the transaction, no statement timeout: for statements whose work grows
-- with the data (bulk enqueue, sweeps, migrations), not with a claim's batch.
SELECT set_config('statement_timeout', '0', true)

-- name: now_untimed
SELECT now(), set_config('statement_timeout', '0', true)

-- name: copy_executions
-- Bulk, on the store's own connections: COPY in a transaction whose now() the store reads
-- first, to compute created_at, scheduled_for and discard_after exactly as INSERT would.
COPY deferq_executions (
    id, function_name, state, arguments, metadata, created_at, scheduled_for,
    discard_after, retry_policy, max_duration, cron_tick
) FROM STDIN (FORMAT BINARY)

-- name: insert_executions
-- Bulk in the caller's transaction: one statement over arrays, one notification. A multi-argument unnest pads shorter
-- arrays with NULLs, so a column that is NULL for every item travels as an empty array.
WITH inserted AS (
    INSERT INTO deferq_executions (
        id, function_name, state, arguments, metadata, created_at, scheduled_for,
        discard_after, retry_policy, max_duration, cron_tick
    )
    SELECT i, f, 'created', a, m::jsonb, now(),
        coalesce(sa, now() + su * interval '1 microsecond'),
        coalesce(da, now() + du * interval '1 microsecond'),
        r, d, c
    FROM unnest(
        %(ids)s::text[], %(functions)s::text[], %(arguments)s::text[], %(metadata)s::text[],
        %(scheduled_at)s::timestamptz[], %(scheduled_us)s::bigint[],
        %(discard_at)s::timestamptz[], %(discard_us)s::bigint[],
        %(retry_policies)s::text[], %(max_durations)s::float8[], %(cron_ticks)s::timestamptz[]
    ) AS item(i, f, a, m, sa, su, da, du, r, d, c)
)
SELECT now(), pg_notify(%(channel)s, '')

-- name: insert_cron_execution
-- The uniqueness rule on (function, tick) decides which scheduler stores a tick; every one
-- moves the schedule's last tick forward. Returns a row only if this call stored it.
WITH inserted AS (
    INSERT INTO deferq_executions (
        id, function_name, state, arguments, created_at, scheduled_for, discard_after,
        retry_policy, max_duration, cron_tick
    ) VALUES (
        %(id)s, %(function_name)s, 'created', %(arguments)s, now(),
        coalesce(%(scheduled_at)s::timestamptz,
            now() + %(scheduled_us)s::bigint * interval '1 microsecond'),
        coalesce(%(discard_at)s::timestamptz,
            now() + %(discard_us)s::bigint * interval '1 microsecond'),
        %(retry_policy)s, %(max_duration)s::float8, %(cron_tick)s::timestamptz
    )
    ON CONFLICT (function_name, cron_tick) WHERE cron_tick IS NOT NULL DO NOTHING
    RETURNING id
), ticked AS (
    UPDATE deferq_schedules
    SET last_tick = greatest(last_tick, %(cron_tick)s::timestamptz),
        next_tick = %(next_tick)s::timestamptz
    WHERE function_name = %(function_name)s
)
SELECT pg_notify(%(channel)s, '') FROM inserted

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
-- created → cancelled; with force, started → aborting. Returns the row as it now is, and
-- whether this statement changed it. The row is locked first: under READ COMMITTED a
-- claim that commits while this statement waits for the row is seen by the lock (FOR
-- UPDATE returns the newest version), so the answer is about the state the execution
-- really is in, never about the snapshot the statement started with.
WITH target AS MATERIALIZED (
    SELECT * FROM deferq_executions WHERE id = %(id)s FOR UPDATE
), changed AS (
    UPDATE deferq_executions e
    SET state = CASE WHEN t.state = 'created' THEN 'cancelled' ELSE 'aborting' END,
        finished_at = CASE WHEN t.state = 'created' THEN now() ELSE e.finished_at END,
        error_message = CASE WHEN t.state = 'created' THEN 'cancelled on request'
            ELSE e.error_message END
    FROM target t
    WHERE e.id = t.id AND (t.state = 'created' OR (%(force)s AND t.state = 'started'))
    RETURNING e.*
)
SELECT true AS changed, * FROM changed
UNION ALL
SELECT false, * FROM target WHERE NOT EXISTS (SELECT 1 FROM changed)

-- name: reschedule
-- A created execution gets a new scheduled_for, and idle workers a wake-up. Locked first,
-- as in cancel_execution: the answer is about the newest version of the row.
WITH target AS MATERIALIZED (
    SELECT * FROM deferq_executions WHERE id = %(id)s FOR UPDATE
), changed AS (
    UPDATE deferq_executions e
    SET scheduled_for = coalesce(%(at)s::timestamptz,
        now() + %(us)s::bigint * interval '1 microsecond')
    FROM target t
    WHERE e.id = t.id AND t.state = 'created'
    RETURNING e.*
)
SELECT true AS changed, *, pg_notify(%(channel)s, '')::text AS woken FROM changed
UNION ALL
SELECT false, *, NULL FROM target WHERE NOT EXISTS (SELECT 1 FROM changed)

-- name: notify
SELECT pg_notify(%(channel)s, '')

-- name: register_worker
INSERT INTO deferq_workers (id, name, host, pid, started_at, heartbeat_at)
VALUES (%(id)s, %(name)s, %(host)s, %(pid)s, now(), now())

-- name: heartbeat
UPDATE deferq_workers SET heartbeat_at = now() WHERE id = %(id)s AND lost_at IS NULL

-- name: unregister_worker
UPDATE deferq_workers SET stopped_at = now() WHERE id = %(id)s

-- name: lock_functions
-- Serializes the claims of concurrency-limited functions across all workers, until the
-- transaction ends. Taken in the order given (sorted by name), so claimers never deadlock.
-- SQLite needs none: its write lock already serializes every claim.
SELECT pg_advisory_xact_lock(hashtextextended('deferq:' || current_schema() || ':' || name, 0))
FROM unnest(%(names)s::text[]) AS name

-- name: record_ctes
-- How attempts ended, as CTEs that `record` and `record_and_claim` start with. Same rules
-- as SQLite's finish_execution: an execution being aborted ends aborted whatever its attempt
-- did (the attempt row keeps what happened); a retry at or after discard_after is discarded
-- instead; an interrupted attempt returns the execution to created, due now, without
-- counting a failure. A report for an attempt that is not running any more is ignored.
-- Here and in claims, "now" is statement_timestamp(), not now() (the start of the
-- transaction): a claim of a limited function runs after waiting for a lock, and its
-- attempts must not seem to start before the attempt whose end freed their place.
report AS (
    SELECT r.*, statement_timestamp() + r.retry_us * interval '1 microsecond' AS retry_at
    FROM unnest(
        %(r_ids)s::text[], %(r_numbers)s::integer[], %(r_outcomes)s::text[],
        %(r_states)s::text[], %(r_retry_us)s::bigint[], %(r_results)s::text[],
        %(r_error_codes)s::text[], %(r_error_messages)s::text[], %(r_tracebacks)s::text[],
        %(r_failures)s::integer[]
    ) AS r(id, number, outcome, state, retry_us, result, error_code, error_message,
        traceback, failure)
), finished AS (
    UPDATE deferq_executions e
    SET state = CASE
            WHEN e.state = 'aborting' THEN 'aborted'
            WHEN r.retry_at IS NULL THEN r.state
            WHEN e.discard_after IS NOT NULL AND r.retry_at >= e.discard_after THEN 'discarded'
            ELSE 'created' END,
        scheduled_for = CASE WHEN e.state = 'aborting' THEN e.scheduled_for
            ELSE coalesce(r.retry_at, e.scheduled_for) END,
        finished_at = CASE
            WHEN e.state = 'aborting' OR r.retry_at IS NULL THEN statement_timestamp()
            WHEN e.discard_after IS NOT NULL AND r.retry_at >= e.discard_after
                THEN statement_timestamp()
            ELSE NULL END,
        result = r.result,
        error_code = CASE WHEN e.state = 'aborting' THEN 'aborted' ELSE r.error_code END,
        error_message = CASE WHEN e.state = 'aborting' THEN 'aborted on request'
            ELSE r.error_message END,
        failed_attempts = e.failed_attempts + r.failure,
        worker_id = NULL
    FROM report r
    WHERE e.id = r.id AND e.attempts = r.number AND e.state IN ('started', 'aborting')
    RETURNING e.state, e.scheduled_for
), ended AS (
    UPDATE deferq_attempts a
    SET finished_at = statement_timestamp(), outcome = r.outcome, error_code = r.error_code,
        error_message = r.error_message, traceback = r.traceback
    FROM report r
    WHERE a.execution_id = r.id AND a.number = r.number AND a.outcome = 'running'
)

-- name: record_result
-- Wakes idle workers when an execution is due again at once (an interrupted attempt).
SELECT pg_notify(%(channel)s, '') FROM finished
WHERE state = 'created' AND scheduled_for <= statement_timestamp()
LIMIT 1

-- name: claim_ctes
-- Start up to %(limit)s due executions, earliest first, as CTEs that `claim` and
-- `record_and_claim` end with. Functions without a concurrency limit come in %(free)s;
-- limited ones in %(limited)s with their limits, claimed only while this statement holds
-- their advisory locks (`lock_functions`, run just before): the running count it reads is
-- then exact. With the "cancel" action, due executions beyond the free places of the whole
-- store are cancelled; those beyond this worker's room stay for other workers.
limits AS (
    SELECT u.name, u.concurrency, u.cancel,
        greatest(0, u.concurrency - (
            SELECT count(*) FROM deferq_executions r
            WHERE r.state IN ('started', 'aborting') AND r.function_name = u.name
        ))::integer AS available
    FROM unnest(%(limited)s::text[], %(concurrency)s::integer[], %(cancel)s::boolean[])
        AS u(name, concurrency, cancel)
), due_free AS (
    SELECT id, scheduled_for FROM deferq_executions
    WHERE state = 'created'
        AND scheduled_for
            <= statement_timestamp() + %(horizon_us)s::bigint * interval '1 microsecond'
        AND (discard_after IS NULL OR discard_after > statement_timestamp())
        -- The name as an expression, not the bare column, so that no index can serve this
        -- test: the claim then walks deferq_executions_due in due order and stops after
        -- %(limit)s rows. Before the table is analyzed (after a bulk load) the planner would
        -- otherwise fetch every due execution through deferq_executions_due_by_function and
        -- sort them all (bench/scale.py).
        AND (function_name || '') = ANY(%(free)s::text[])
        AND cardinality(%(free)s::text[]) > 0
    ORDER BY scheduled_for, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), due_limited AS (
    SELECT d.id, d.scheduled_for
    FROM limits l CROSS JOIN LATERAL (
        SELECT id, scheduled_for FROM deferq_executions
        WHERE state = 'created'
            AND scheduled_for
            <= statement_timestamp() + %(horizon_us)s::bigint * interval '1 microsecond'
            AND (discard_after IS NULL OR discard_after > statement_timestamp())
            AND function_name = l.name
        ORDER BY scheduled_for, id
        LIMIT least(l.available, %(limit)s)
        FOR UPDATE SKIP LOCKED
    ) d
), chosen AS (
    SELECT id FROM (SELECT * FROM due_free UNION ALL SELECT * FROM due_limited) c
    ORDER BY scheduled_for, id
    LIMIT %(limit)s
), overflow AS (
    SELECT d.id
    FROM limits l CROSS JOIN LATERAL (
        SELECT id FROM deferq_executions
        WHERE l.cancel AND state = 'created'
            AND scheduled_for
            <= statement_timestamp() + %(horizon_us)s::bigint * interval '1 microsecond'
            AND (discard_after IS NULL OR discard_after > statement_timestamp())
            AND function_name = l.name
        ORDER BY scheduled_for, id
        OFFSET l.available
    ) d
    WHERE d.id NOT IN (SELECT id FROM chosen)
), cancelled AS (
    -- Not locked above (SKIP LOCKED would skip the rows this statement just locked, and
    -- count wrong): the update waits for a row another transaction holds, then re-checks it.
    UPDATE deferq_executions e
    SET state = 'cancelled', finished_at = statement_timestamp(),
        error_code = 'concurrency_limit',
        error_message = 'concurrency limit of ' || l.concurrency || ' reached'
    FROM limits l
    -- An id array, not a join with overflow: the planner then reaches the rows through the
    -- primary key without weighing join orders over a table of millions (bench/scale.py).
    WHERE e.id = ANY(ARRAY(SELECT id FROM overflow)) AND e.function_name = l.name
        AND e.state = 'created'
), started AS (
    UPDATE deferq_executions e
    SET state = 'started', started_at = statement_timestamp(), attempts = e.attempts + 1,
        worker_id = %(worker)s, claim_token = %(token)s
    FROM chosen c
    WHERE e.id = c.id
    RETURNING e.id, e.function_name, e.arguments, e.attempts, e.failed_attempts,
        e.retry_policy, e.max_duration, e.discard_after, e.started_at, e.scheduled_for
), attempt AS (
    INSERT INTO deferq_attempts (execution_id, number, worker_id, started_at, outcome)
    SELECT id, attempts, %(worker)s, started_at, 'running' FROM started
)

-- name: claim_result
SELECT id, function_name, arguments, attempts, failed_attempts, retry_policy, max_duration,
    discard_after, started_at
FROM started
ORDER BY scheduled_for, id

-- name: backend_start
-- When the server process of this connection started: with its pid, it names the process
-- for as long as it lives (a pid alone may be reused).
SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()

-- name: end_backend
-- Ends the server process that ran a claim whose answer was lost, if it still runs: what it
-- has not committed by the time it is gone, it never will. Returns a row while it is there.
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE pid = %(pid)s AND backend_start = %(since)s

-- name: claimed_by_token
-- What a claim took, if it committed: read back after its answer was lost.
SELECT id, function_name, arguments, attempts, failed_attempts, retry_policy, max_duration,
    discard_after, started_at
FROM deferq_executions
WHERE worker_id = %(worker)s AND claim_token = %(token)s AND state IN ('started', 'aborting')
ORDER BY scheduled_for, id

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
    AND heartbeat_at < now() - %(lost_after_us)s::bigint * interval '1 microsecond'
RETURNING id

-- name: running_of_lost_workers
-- Every attempt still held by a worker declared lost (or stopped): those just declared,
-- and those a rescuer that died midway left behind. Storing their reports is idempotent.
SELECT e.id, e.function_name, e.arguments, e.attempts, e.failed_attempts, e.retry_policy,
    e.max_duration, e.discard_after, e.started_at
FROM deferq_executions e
JOIN deferq_workers w ON w.id = e.worker_id
WHERE e.state IN ('started', 'aborting')
    AND (w.lost_at IS NOT NULL OR w.stopped_at IS NOT NULL)

-- name: next_due
-- Of the functions given (every function when NULL), leaving out executions already due
-- %(since_us)s ago (none when NULL).
SELECT extract(epoch FROM min(scheduled_for) - now()) FROM deferq_executions
WHERE state = 'created'
    AND (%(functions)s::text[] IS NULL OR function_name = ANY(%(functions)s::text[]))
    AND (%(since_us)s::bigint IS NULL
        OR scheduled_for > now() - %(since_us)s::bigint * interval '1 microsecond')

-- name: prune_finished
WITH gone AS (
    DELETE FROM deferq_executions
    WHERE finished_at IS NOT NULL
        AND finished_at < now() - %(older_than_us)s::bigint * interval '1 microsecond'
    RETURNING id
), attempts AS (
    DELETE FROM deferq_attempts a USING gone WHERE a.execution_id = gone.id
)
SELECT count(*) FROM gone
