-- Named queries of the SQLite store. Times are integer microseconds since the epoch (UTC).

-- name: insert_execution
INSERT INTO deferq_executions (
    id, function_name, state, arguments, metadata, created_at, scheduled_for, discard_after,
    retry_policy, max_duration, cron_tick
) VALUES (?, ?, 'created', ?, ?, ?, ?, ?, ?, ?, ?)

-- name: insert_cron_execution
INSERT INTO deferq_executions (
    id, function_name, state, arguments, metadata, created_at, scheduled_for, discard_after,
    retry_policy, max_duration, cron_tick
) VALUES (?, ?, 'created', ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING

-- name: insert_metadata
INSERT INTO deferq_metadata (execution_id, key, value) VALUES (?, ?, ?)

-- name: get_execution
SELECT * FROM deferq_executions WHERE id = ?

-- name: list_attempts
SELECT * FROM deferq_attempts WHERE execution_id = ? ORDER BY number

-- name: cancel_created
UPDATE deferq_executions
SET state = 'cancelled', finished_at = ?, error_message = 'cancelled on request'
WHERE id = ? AND state = 'created'

-- name: abort_started
UPDATE deferq_executions SET state = 'aborting' WHERE id = ? AND state = 'started'

-- name: reschedule
UPDATE deferq_executions SET scheduled_for = ? WHERE id = ? AND state = 'created'

-- name: register_worker
INSERT INTO deferq_workers (id, name, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?)

-- name: heartbeat
UPDATE deferq_workers SET heartbeat_at = ? WHERE id = ? AND lost_at IS NULL

-- name: unregister_worker
UPDATE deferq_workers SET stopped_at = ? WHERE id = ?

-- name: due_any
-- INDEXED BY here and below: with many finished executions stored, SQLite's planner, left
-- alone, may scan a larger index instead of the small partial one (bench/scale.py).
SELECT 1 FROM deferq_executions INDEXED BY deferq_executions_due
WHERE state = 'created' AND scheduled_for <= ? LIMIT 1

-- name: next_due
-- Of the functions named in a JSON array (every function when NULL), leaving out
-- executions due at or before :after (none when NULL). Walks the due index in order.
SELECT scheduled_for FROM deferq_executions INDEXED BY deferq_executions_due
WHERE state = 'created'
    AND scheduled_for > coalesce(:after, -9223372036854775808)
    AND (:functions IS NULL OR function_name IN (SELECT value FROM json_each(:functions)))
ORDER BY scheduled_for
LIMIT 1

-- name: due_of_functions
-- Whether an execution of the functions named in a JSON array is due.
SELECT 1 FROM deferq_executions INDEXED BY deferq_executions_due
WHERE state = 'created' AND scheduled_for <= ?
    AND function_name IN (SELECT value FROM json_each(?))
LIMIT 1

-- name: running_count
SELECT count(*) FROM deferq_executions INDEXED BY deferq_executions_running
WHERE state IN ('started', 'aborting') AND function_name = ?

-- name: start_executions
-- Takes the ids (a JSON array) chosen by the claim; RETURNING order is arbitrary.
UPDATE deferq_executions
SET state = 'started', started_at = ?, attempts = attempts + 1, worker_id = ?
WHERE id IN (SELECT value FROM json_each(?)) AND state = 'created'
RETURNING id, function_name, arguments, attempts, failed_attempts, retry_policy, max_duration,
    discard_after, started_at, scheduled_for

-- name: insert_attempt
INSERT INTO deferq_attempts (execution_id, number, worker_id, started_at, outcome)
VALUES (?, ?, ?, ?, 'running')

-- name: cancel_limited
UPDATE deferq_executions
SET state = 'cancelled', finished_at = ?, error_code = 'concurrency_limit',
    error_message = ?
WHERE id = ? AND state = 'created'

-- name: finish_execution
-- An execution being aborted ends aborted whatever the attempt did; a
-- retry past discard_after is discarded instead.
UPDATE deferq_executions
SET state = CASE
        WHEN state = 'aborting' THEN 'aborted'
        WHEN :retry_at IS NULL THEN :state
        WHEN discard_after IS NOT NULL AND :retry_at >= discard_after THEN 'discarded'
        ELSE 'created' END,
    scheduled_for = CASE WHEN state = 'aborting' THEN scheduled_for
        ELSE coalesce(:retry_at, scheduled_for) END,
    finished_at = CASE
        WHEN state = 'aborting' OR :retry_at IS NULL THEN :now
        WHEN discard_after IS NOT NULL AND :retry_at >= discard_after THEN :now
        ELSE NULL END,
    result = :result,
    -- An aborted execution says so; its attempt keeps what really happened.
    error_code = CASE WHEN state = 'aborting' THEN 'aborted' ELSE :error_code END,
    error_message = CASE WHEN state = 'aborting' THEN 'aborted on request'
        ELSE :error_message END,
    failed_attempts = failed_attempts + :counts_as_failure,
    worker_id = NULL
WHERE id = :id AND attempts = :number AND state IN ('started', 'aborting')

-- name: finish_attempt
UPDATE deferq_attempts
SET finished_at = ?, outcome = ?, error_code = ?, error_message = ?, traceback = ?
WHERE execution_id = ? AND number = ? AND outcome = 'running'

-- name: aborting_executions
SELECT id FROM deferq_executions WHERE worker_id = ? AND state = 'aborting'

-- name: discard_expired
UPDATE deferq_executions
SET state = 'discarded', finished_at = ?,
    error_message = 'not started before its discard_after'
WHERE state = 'created' AND discard_after IS NOT NULL AND discard_after <= ?

-- name: declare_lost_workers
UPDATE deferq_workers SET lost_at = ?
WHERE lost_at IS NULL AND stopped_at IS NULL AND heartbeat_at < ?
RETURNING id

-- name: running_of_lost_workers
-- Every attempt still held by a worker declared lost (or stopped): those just declared, and
-- those a rescuer that died midway left behind. Storing their reports is idempotent.
SELECT e.id, e.function_name, e.arguments, e.attempts, e.failed_attempts, e.retry_policy,
    e.max_duration, e.discard_after, e.started_at
FROM deferq_executions e INDEXED BY deferq_executions_running
JOIN deferq_workers w ON w.id = e.worker_id
WHERE e.state IN ('started', 'aborting')
    AND (w.lost_at IS NOT NULL OR w.stopped_at IS NOT NULL)

-- name: prune_finished
-- A batch at a time, so that claims wait for one short transaction, not for all of them.
DELETE FROM deferq_executions
WHERE id IN (
    SELECT id FROM deferq_executions INDEXED BY deferq_executions_finished
    WHERE finished_at IS NOT NULL AND finished_at < ?
    LIMIT ?
)
RETURNING id

-- name: upsert_schedule
-- A changed expression or time zone starts the schedule afresh: no catch-up of the old one.
INSERT INTO deferq_schedules (function_name, expression, timezone, first_seen, seen_at, next_tick)
VALUES (:name, :expression, :timezone, :now, :now, :next_tick)
ON CONFLICT (function_name) DO UPDATE SET
    first_seen = CASE WHEN expression = :expression AND timezone = :timezone
        THEN first_seen ELSE :now END,
    last_tick = CASE WHEN expression = :expression AND timezone = :timezone
        THEN last_tick ELSE NULL END,
    expression = :expression,
    timezone = :timezone,
    seen_at = :now,
    next_tick = :next_tick
RETURNING first_seen, last_tick

-- name: set_last_tick
UPDATE deferq_schedules SET last_tick = max(coalesce(last_tick, 0), :tick), next_tick = :next_tick
WHERE function_name = :name

-- name: list_schedules
SELECT * FROM deferq_schedules ORDER BY function_name
