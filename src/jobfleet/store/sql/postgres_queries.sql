-- Queries of the PostgreSQL store, looked up by name (jobfleet.store.sqlfiles.queries).
-- The same queries as SQLite's, in psycopg's placeholders, with row locks where many
-- processes may reach for the same rows at once.

-- name: job
-- A job, with what its latest finished attempt measured.
SELECT j.id, j.run_id, j.seq, j.name, j.state, j.attempts, j.max_attempts, j.exit_code,
       j.signal, j.reason, j.started_at, j.finished_at, j.not_before, j.worker_id, j.spec,
       a.peak_rss, CASE WHEN j.state = 'running' THEN j.stalled_since END
FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id AND a.number = j.attempts

-- name: lease
-- Lease the jobs that "pick" chooses, in one statement. Every lease gets its own token: a
-- random base for this call joined to the job's key. "pick" is one of the two queries below,
-- with "run_filter" empty or limiting it to one run; it locks the rows it picks and skips
-- those other workers are leasing at the same moment.
WITH picked AS ({pick})
UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, worker_id = %(worker)s,
    lease_token = %(token)s::text || '.' || j.id, lease_expires = %(expires)s,
    started_at = %(now)s, exit_code = NULL, signal = NULL, reason = NULL, finished_at = NULL,
    result = NULL, stalled_since = NULL
FROM picked WHERE j.id = picked.id
RETURNING j.id, j.run_id, j.seq, j.attempts, j.lease_token, j.spec, j.payload

-- name: fitting_together
-- The oldest ready jobs that fit in the free capacity together: the innermost query locks at
-- most :slots candidates (each fitting alone) in queue order, the window sums their needs,
-- and the prefix that fits is taken.
SELECT id FROM (
    SELECT id, sum(cpus) OVER w AS c, sum(memory) OVER w AS m, sum(gpus) OVER w AS g
    FROM (SELECT id, cpus, memory, gpus FROM jobs
          WHERE state = 'queued' AND not_before <= %(now)s {run_filter}
            AND cpus <= %(cpus)s AND memory <= %(memory)s AND gpus <= %(gpus)s
          ORDER BY id LIMIT %(slots)s
          FOR UPDATE SKIP LOCKED) AS candidates
    WINDOW w AS (ORDER BY id)) AS sums
WHERE c <= %(cpus)s AND m <= %(memory)s AND g <= %(gpus)s

-- name: fitting_alone
-- The oldest :slots ready jobs that each fit the limits on their own: leased ahead, to start
-- as capacity frees up.
SELECT id FROM jobs
WHERE state = 'queued' AND not_before <= %(now)s {run_filter}
  AND cpus <= %(cpus)s AND memory <= %(memory)s AND gpus <= %(gpus)s
ORDER BY id LIMIT %(slots)s
FOR UPDATE SKIP LOCKED

-- name: leased_by
-- The leases one `lease` call made, found again by their token's base: a call retried after
-- its commit's answer was lost returns these instead of leasing more.
SELECT id, run_id, seq, attempts, lease_token, spec, payload, lease_expires
FROM jobs WHERE state = 'running' AND worker_id = %(worker)s
  AND lease_token LIKE %(token)s::text || '.%%'
ORDER BY id

-- name: succeed
-- The hot path: every success of a batch settled, fenced and its attempt written, in one
-- statement; returns the keys recorded (the others' tokens no longer hold their lease).
WITH done AS (
    SELECT * FROM unnest(%(keys)s::bigint[], %(tokens)s::text[], %(exit_codes)s::int[],
                         %(started)s::float8[], %(results)s::bytea[], %(peak_rss)s::bigint[],
                         %(logs)s::text[])
        AS o(key, token, exit_code, started_at, result, peak_rss, log)
), settled AS (
    UPDATE jobs j SET state = 'succeeded', lease_token = NULL, lease_expires = NULL,
        exit_code = done.exit_code, started_at = coalesce(done.started_at, j.started_at),
        finished_at = %(now)s, result = done.result
    FROM done WHERE j.id = done.key AND j.lease_token = done.token AND j.state = 'running'
    RETURNING j.id, j.attempts, j.started_at, done.token, done.exit_code, done.peak_rss,
              done.log
)
INSERT INTO attempts (job_id, number, worker_id, token, state, started_at, finished_at,
                      exit_code, peak_rss, log)
SELECT id, attempts, %(worker)s, token, 'succeeded', started_at, %(now)s, exit_code,
       peak_rss, log
FROM settled
RETURNING job_id

-- name: hand_back
-- A job leased ahead and never started goes back as if it had not been leased: no attempt is
-- recorded. A cancel asked for meanwhile ends it here.
UPDATE jobs SET attempts = attempts - 1, lease_token = NULL, lease_expires = NULL,
    state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
    finished_at = CASE WHEN cancel_requested THEN %(now)s END,
    reason = CASE WHEN cancel_requested THEN 'cancelled by user' END
WHERE id = %(key)s AND lease_token = %(token)s AND state = 'running'
RETURNING state

-- name: running
-- Running jobs with what ending their attempt needs (key, worker, then the columns _settle
-- reads); callers add the condition (a key and token, an expired lease, or a worker) and
-- the row lock.
SELECT id, worker_id, run_id, attempts, budget_from, max_attempts, retry_on, retry_delay,
       cancel_requested, started_at, lease_token
FROM jobs WHERE state = 'running'

-- name: settle
-- End a running attempt: the job's next state, and what the attempt left.
UPDATE jobs SET state = %s, not_before = %s, budget_from = %s, lease_token = NULL,
    lease_expires = NULL, exit_code = %s, signal = %s, reason = %s, started_at = %s,
    finished_at = %s, result = %s
WHERE id = %s

-- name: add_attempt
-- An attempt is written once, when it ends; the one under way lives in its job's row.
INSERT INTO attempts (job_id, number, worker_id, token, state, started_at, finished_at,
                      exit_code, signal, reason, peak_rss, log)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- name: recorded
-- Whether an attempt with this token was recorded: a finish retried after its commit's
-- answer was lost finds its own outcomes here, not stale ones.
SELECT 1 FROM attempts WHERE job_id = %s AND token = %s

-- name: extend
-- A heartbeat: extend every lease (key, token) still held, in one statement; returns the
-- keys extended.
UPDATE jobs j SET lease_expires = %(expires)s
FROM unnest(%(keys)s::bigint[], %(tokens)s::text[]) AS held(key, token)
WHERE j.id = held.key AND j.lease_token = held.token AND j.state = 'running'
RETURNING j.id

-- name: add_run
INSERT INTO runs (id, name, source, workdir, created_at, total) VALUES (%s, %s, %s, %s, %s, 0)

-- name: add_job
INSERT INTO jobs (run_id, seq, name, cpus, memory, gpus, max_attempts, retry_delay, retry_on,
                  spec, payload)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- name: add_event
INSERT INTO events (at, kind, run_id, job_id, worker_id, detail) VALUES (%s, %s, %s, %s, %s, %s)

-- name: beat
-- A worker's heartbeat (and how many jobs it has finished, when given).
UPDATE workers SET heartbeat_at = %s, jobs_done = coalesce(%s, jobs_done) WHERE id = %s

-- name: attempts
-- A job's attempts: those that ended, then the one under way (from its job's row).
SELECT job_id, number, worker_id, state, started_at, finished_at, exit_code, signal, reason,
       peak_rss, log
FROM attempts WHERE job_id = %(key)s
UNION ALL
SELECT id, attempts, worker_id, 'running', started_at, NULL, NULL, NULL, NULL, NULL, NULL
FROM jobs WHERE id = %(key)s AND state = 'running'
ORDER BY number

-- name: add_worker
INSERT INTO workers (id, host, pid, slots, cpus, memory, gpus, lease_seconds, run_id, state,
                     started_at, heartbeat_at, jobs_done)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
    slots = excluded.slots, cpus = excluded.cpus, memory = excluded.memory,
    gpus = excluded.gpus, lease_seconds = excluded.lease_seconds, run_id = excluded.run_id,
    state = excluded.state, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, jobs_done = excluded.jobs_done

-- name: events
-- Leases and successes are recorded once, in the attempts table (or, for the attempt under
-- way, in its job's row); "ended" and "under_way" limit them to a job or a run.
SELECT a.job_id, j.run_id, a.number, a.worker_id, a.started_at, a.finished_at, a.state,
       a.exit_code
FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE true {ended}
UNION ALL
SELECT id, run_id, attempts, worker_id, started_at, NULL, state, NULL
FROM jobs WHERE state = 'running' {under_way}

-- name: worker
SELECT id, host, pid, slots, cpus, memory, gpus, lease_seconds, run_id, state, started_at,
       heartbeat_at, jobs_done
FROM workers

-- name: run
SELECT id, name, source, workdir, created_at, total, cancelled, stopped FROM runs

-- name: add_usage
-- Worker time a fleet spent on a run, added to what it spent before.
INSERT INTO usage (run_id, instance_type, worker_seconds, cost) VALUES (%s, %s, %s, %s)
ON CONFLICT (run_id, instance_type) DO UPDATE
SET worker_seconds = usage.worker_seconds + excluded.worker_seconds,
    cost = usage.cost + excluded.cost
