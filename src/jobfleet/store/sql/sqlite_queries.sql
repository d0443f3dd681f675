-- Queries of the SQLite store, looked up by name (jobfleet.store.sqlfiles.queries).

-- name: job
-- A job, with what its latest finished attempt measured.
SELECT j.id, j.run_id, j.seq, j.name, j.state, j.attempts, j.max_attempts, j.exit_code,
       j.signal, j.reason, j.started_at, j.finished_at, j.not_before, j.worker_id, j.spec,
       a.peak_rss, CASE WHEN j.state = 'running' THEN j.stalled_since END
FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id AND a.number = j.attempts

-- name: lease
-- Lease the jobs that "pick" chooses, in one statement. Every lease gets its own token: a
-- random base for this call joined to the job's key. "pick" is one of the two queries below,
-- with "run_filter" empty or limiting it to one run.
UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_id = :worker,
    lease_token = :token || '.' || id, lease_expires = :expires, started_at = :now,
    exit_code = NULL, signal = NULL, reason = NULL, finished_at = NULL, result = NULL,
    stalled_since = NULL
WHERE id IN ({pick})
RETURNING id, run_id, seq, attempts, lease_token, spec, payload

-- name: fitting_together
-- The oldest ready jobs that fit in the free capacity together: the innermost query takes at
-- most :slots candidates (each fitting alone) in queue order, the window sums their needs,
-- and the prefix that fits is taken.
SELECT id FROM (
    SELECT id, sum(cpus) OVER w AS c, sum(memory) OVER w AS m, sum(gpus) OVER w AS g
    FROM (SELECT id, cpus, memory, gpus FROM jobs
          WHERE state = 'queued' AND not_before <= :now {run_filter}
            AND cpus <= :cpus AND memory <= :memory AND gpus <= :gpus
          ORDER BY id LIMIT :slots)
    WINDOW w AS (ORDER BY id))
WHERE c <= :cpus AND m <= :memory AND g <= :gpus

-- name: fitting_alone
-- The oldest :slots ready jobs that each fit the limits on their own: leased ahead, to start
-- as capacity frees up.
SELECT id FROM jobs
WHERE state = 'queued' AND not_before <= :now {run_filter}
  AND cpus <= :cpus AND memory <= :memory AND gpus <= :gpus
ORDER BY id LIMIT :slots

-- name: add_success
-- The hot path, first: a success's attempt, written from its job's row while the lease holds.
INSERT INTO attempts (job_id, number, worker_id, token, state, started_at, finished_at,
                      exit_code, peak_rss, log)
SELECT id, attempts, ?, lease_token, 'succeeded', coalesce(?, started_at), ?, ?, ?, ?
FROM jobs WHERE id = ? AND lease_token = ? AND state = 'running'

-- name: succeed
-- The hot path, then: a fenced success in one statement.
UPDATE jobs SET state = 'succeeded', lease_token = NULL, lease_expires = NULL,
    exit_code = ?, started_at = coalesce(?, started_at), finished_at = ?, result = ?
WHERE id = ? AND lease_token = ? AND state = 'running'

-- name: hand_back
-- A job leased ahead and never started goes back as if it had not been leased: no attempt is
-- recorded. A cancel asked for meanwhile ends it here.
UPDATE jobs SET attempts = attempts - 1, lease_token = NULL, lease_expires = NULL,
    state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'queued' END,
    finished_at = CASE WHEN cancel_requested = 1 THEN :now END,
    reason = CASE WHEN cancel_requested = 1 THEN 'cancelled by user' END
WHERE id = :key AND lease_token = :token AND state = 'running'

-- name: running
-- Running jobs with what ending their attempt needs (key, worker, then the columns _settle
-- reads); callers add the condition: a key and token, an expired lease, or a worker.
SELECT id, worker_id, run_id, attempts, budget_from, max_attempts, retry_on, retry_delay,
       cancel_requested, started_at, lease_token
FROM jobs WHERE state = 'running'

-- name: add_attempt
-- An attempt is written once, when it ends; the one under way lives in its job's row.
INSERT INTO attempts (job_id, number, worker_id, token, state, started_at, finished_at,
                      exit_code, signal, reason, peak_rss, log)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: add_usage
-- Worker time a fleet spent on a run, added to what it spent before.
INSERT INTO usage (run_id, instance_type, worker_seconds, cost) VALUES (?, ?, ?, ?)
ON CONFLICT (run_id, instance_type) DO UPDATE
SET worker_seconds = usage.worker_seconds + excluded.worker_seconds,
    cost = usage.cost + excluded.cost
