-- The claim that started an execution's current attempt, named by its worker. A worker whose
-- connection broke before the claim's answer arrived reads back, by this token, what the claim
-- took if it committed. Read only together with worker_id, so the running-state index serves it.
ALTER TABLE deferq_executions ADD COLUMN claim_token text;
