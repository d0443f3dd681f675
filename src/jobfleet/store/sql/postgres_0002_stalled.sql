-- jobfleet schema, version 2 (PostgreSQL): stalled jobs.
-- When the running attempt of a job went quiet (no output, no CPU use) for longer than its
-- stall_after, as its worker last reported; NULL while it makes progress. A new lease clears it.
ALTER TABLE jobs ADD COLUMN stalled_since DOUBLE PRECISION;
