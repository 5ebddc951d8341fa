-- Claims of a concurrency-limited function (and the "cancel" sweep) read that function's due
-- executions in due order. Through deferq_executions_due alone they read past every other
-- function's due executions first, and before the table is analyzed the planner may sort all
-- of them; this index hands them over in order. Like the due index it holds only executions
-- waiting to run, so it stays small however many finished executions the table keeps.
CREATE INDEX deferq_executions_due_by_function
    ON deferq_executions (function_name, scheduled_for, id)
    WHERE state = 'created';
