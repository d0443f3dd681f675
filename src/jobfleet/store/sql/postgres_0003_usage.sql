-- jobfleet schema, version 3 (PostgreSQL): what a run's fleet cost, and runs a cap stopped.
-- Why a fleet stopped working the run (budget, timeout); NULL while it may go on.
ALTER TABLE runs ADD COLUMN stopped TEXT;
-- Worker-seconds (and their cost) a fleet spent on a run, by instance type.
CREATE TABLE usage (
    run_id          TEXT NOT NULL,
    instance_type   TEXT NOT NULL,
    worker_seconds  DOUBLE PRECISION NOT NULL,
    cost            DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, instance_type)
);
