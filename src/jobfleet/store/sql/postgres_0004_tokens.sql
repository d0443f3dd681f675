-- jobfleet schema, version 4 (PostgreSQL): the worker gateway's tokens (see jobfleet.gateway).
-- A token is shown once when made; only the SHA-256 of its secret is kept. role: worker,
-- client or admin; run_id limits a worker or client token to one run.
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    run_id      TEXT,
    name        TEXT,
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION
);
-- The worker id each worker token took when its worker registered: no other token may
-- report for that worker.
CREATE TABLE token_workers (
    worker_id   TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL,
    bound_at    DOUBLE PRECISION NOT NULL
);
-- The client token that submitted each run (runs submitted directly to the store have none).
CREATE TABLE token_runs (
    run_id      TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL
);
CREATE INDEX token_runs_by_token ON token_runs (token_id);
