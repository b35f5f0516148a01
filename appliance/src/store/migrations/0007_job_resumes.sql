-- How many times a URL staging job was resumed after the depot stopped under it. A download
-- that keeps dying with the depot (a crash it causes) is given up after a few resumes instead
-- of looping for ever.

ALTER TABLE ota_jobs ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;
