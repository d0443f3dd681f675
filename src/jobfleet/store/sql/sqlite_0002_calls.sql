-- jobfleet schema, version 2 (SQLite): Python calls.
-- A call job carries its pickled call (inline, or a reference into the blob store) and, once
-- an attempt ends, its pickled result or exception (likewise). Shell jobs leave both NULL.
ALTER TABLE jobs ADD COLUMN payload BLOB;
ALTER TABLE jobs ADD COLUMN result BLOB;
-- what a waiting caller polls: the jobs of a run that ended since a moment
CREATE INDEX jobs_finished ON jobs (run_id, finished_at);
