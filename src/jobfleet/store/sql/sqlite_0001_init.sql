-- jobfleet schema, version 1 (SQLite)
CREATE TABLE runs (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    source      TEXT,
    workdir     TEXT,
    created_at  REAL NOT NULL,
    total       INTEGER NOT NULL,
    cancelled   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE jobs (
    id                INTEGER PRIMARY KEY,
    run_id            TEXT NOT NULL REFERENCES runs(id),
    seq               INTEGER NOT NULL,
    name              TEXT,
    state             TEXT NOT NULL DEFAULT 'queued',
    cpus              REAL NOT NULL,
    memory            INTEGER NOT NULL,
    gpus              INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    retry_delay       REAL NOT NULL,
    retry_on          TEXT,                       -- comma-separated exit codes, or NULL for any
    attempts          INTEGER NOT NULL DEFAULT 0, -- attempts started, ever
    budget_from       INTEGER NOT NULL DEFAULT 0, -- attempts made before the last `retry`
    not_before        REAL NOT NULL DEFAULT 0,
    worker_id         TEXT,
    lease_token       TEXT,
    lease_expires     REAL,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    exit_code         INTEGER,
    signal            INTEGER,
    reason            TEXT,
    started_at        REAL,
    finished_at       REAL,
    spec              TEXT NOT NULL,
    UNIQUE (run_id, seq)
);
CREATE INDEX jobs_ready ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_ready_run ON jobs (run_id, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires) WHERE state = 'running';
CREATE INDEX jobs_run_state ON jobs (run_id, state);

CREATE TABLE attempts (
    job_id       INTEGER NOT NULL,
    number       INTEGER NOT NULL,
    worker_id    TEXT,
    token        TEXT NOT NULL,
    state        TEXT NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    exit_code    INTEGER,
    signal       INTEGER,
    reason       TEXT,
    peak_rss     INTEGER,
    log          TEXT,
    PRIMARY KEY (job_id, number)
) WITHOUT ROWID;

CREATE TABLE workers (
    id            TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    slots         INTEGER NOT NULL,
    cpus          REAL NOT NULL,
    memory        INTEGER NOT NULL,
    gpus          INTEGER NOT NULL,
    lease_seconds REAL NOT NULL,
    run_id        TEXT,
    state         TEXT NOT NULL,
    started_at    REAL NOT NULL,
    heartbeat_at  REAL NOT NULL,
    jobs_done     INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    run_id     TEXT,
    job_id     INTEGER,
    worker_id  TEXT,
    detail     TEXT
);
CREATE INDEX events_job ON events (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX events_run ON events (run_id, id);
