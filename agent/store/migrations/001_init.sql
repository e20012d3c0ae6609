-- 001: the lineage store of record.
--
-- Datasets and jobs are keyed by a SHA-256 of their (namespace, name), computed by the
-- writer (agent.store.plan.identity_key): names are attacker-influenced and may be far
-- longer than a btree entry (about 2.7 kB) allows, so they are never indexed directly.

CREATE TABLE datasets (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key         bytea       NOT NULL UNIQUE,
    namespace   text        NOT NULL,
    name        text        NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);

CREATE TABLE jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key         bytea       NOT NULL UNIQUE,
    namespace   text        NOT NULL,
    name        text        NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);

-- One row per run. The state columns hold the "winning" event: the highest
-- (state_rank, state_time, state_event_id), so the final row does not depend on the order
-- in which START, RUNNING and COMPLETE/FAIL/ABORT arrive.
CREATE TABLE runs (
    run_id          uuid        PRIMARY KEY,
    job_id          bigint      NOT NULL REFERENCES jobs (id),
    state           text        NOT NULL,
    state_rank      smallint    NOT NULL,
    state_time      timestamptz NOT NULL,
    state_event_id  uuid        NOT NULL,
    started_at      timestamptz,
    ended_at        timestamptz,
    facets          jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX runs_job_idx ON runs (job_id);

CREATE TABLE run_datasets (
    run_id      uuid   NOT NULL REFERENCES runs (run_id),
    direction   text   NOT NULL CHECK (direction IN ('input', 'output')),
    dataset_id  bigint NOT NULL REFERENCES datasets (id),
    PRIMARY KEY (run_id, direction, dataset_id)
);
CREATE INDEX run_datasets_dataset_idx ON run_datasets (dataset_id);

-- Dataset-level lineage: source feeds target. The primary key serves downstream walks,
-- lineage_edges_upstream_idx upstream ones; both cover the walk without a heap visit.
CREATE TABLE lineage_edges (
    source_id    bigint      NOT NULL REFERENCES datasets (id),
    target_id    bigint      NOT NULL REFERENCES datasets (id),
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    -- Distinct runs that produced this edge (see lineage_edge_runs).
    run_count    bigint      NOT NULL,
    -- The latest run (by time, then id) that produced it; its job is runs.job_id.
    last_run_id  uuid        NOT NULL REFERENCES runs (run_id),
    PRIMARY KEY (source_id, target_id)
);
CREATE INDEX lineage_edges_upstream_idx ON lineage_edges (target_id, source_id);

-- Which runs produced an edge. Counting edges by inserting here first is what keeps
-- lineage_edges.run_count exact when a run's START and COMPLETE both carry the edge, and
-- when a batch is delivered twice.
CREATE TABLE lineage_edge_runs (
    source_id  bigint NOT NULL,
    target_id  bigint NOT NULL,
    run_id     uuid   NOT NULL REFERENCES runs (run_id),
    PRIMARY KEY (source_id, target_id, run_id),
    FOREIGN KEY (source_id, target_id) REFERENCES lineage_edges (source_id, target_id)
        DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX lineage_edge_runs_run_idx ON lineage_edge_runs (run_id);

-- Column-level lineage: target_dataset.target_column is computed from
-- source_dataset.source_column. Keyed by a hash for the same reason as datasets.
CREATE TABLE column_edges (
    key                bytea       PRIMARY KEY,
    target_dataset_id  bigint      NOT NULL REFERENCES datasets (id),
    target_column      text        NOT NULL,
    source_dataset_id  bigint      NOT NULL REFERENCES datasets (id),
    source_column      text        NOT NULL,
    first_seen         timestamptz NOT NULL,
    last_seen          timestamptz NOT NULL,
    last_run_id        uuid        NOT NULL
);
CREATE INDEX column_edges_target_idx ON column_edges (target_dataset_id);
CREATE INDEX column_edges_source_idx ON column_edges (source_dataset_id);

-- Access events, one daily partition per UTC day, made on demand by
-- ensure_access_partitions() and dropped by drop_access_partitions(). There is no default
-- partition on purpose: a row for a missing day fails loudly instead of landing where
-- retention would never find it. The primary key includes the partition key, as
-- PostgreSQL requires; an event id determines its time, so it is still unique per event.
-- No foreign key to datasets: a per-row check would cost the hottest insert path, and
-- datasets are never deleted.
CREATE TABLE access_events (
    event_id    uuid        NOT NULL,
    time        timestamptz NOT NULL,
    principal   text,
    roles       text[]      NOT NULL,
    dataset_id  bigint      NOT NULL,
    action      text        NOT NULL,
    decision    text        NOT NULL,
    rule        text,
    request_id  text        NOT NULL,
    status      integer     NOT NULL,
    PRIMARY KEY (event_id, time)
) PARTITION BY RANGE (time);
CREATE INDEX access_events_dataset_time_idx ON access_events (dataset_id, time);

-- Exactly-once bookkeeping for run events, and their OpenLineage JSON as received (what
-- GET /lineage/{id} returns and what can be handed to Marquez). Access events are
-- deduplicated by access_events' own primary key instead, so that retention, which drops
-- their partitions, bounds them completely.
CREATE TABLE events_raw (
    event_id     uuid        PRIMARY KEY,
    kind         text        NOT NULL,
    event_type   text        NOT NULL,
    event_time   timestamptz NOT NULL,
    payload      jsonb       NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dead_letter (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    -- Where it came from, e.g. "kafka:lineage/3@1234" or "event:<event id>".
    source       text        NOT NULL,
    reason       text        NOT NULL,
    payload      bytea       NOT NULL,
    -- SHA-256 of (source, payload): the same message dead-lettered twice is one row.
    key          bytea       NOT NULL UNIQUE
);

-- Create the daily access partitions for the given UTC days, if missing. Serialised by a
-- transaction-scoped advisory lock, because two writers creating the same partition at
-- once would otherwise fail on the catalog's unique index. After the lock, existence is
-- checked with a query on pg_class (a fresh snapshot), not to_regclass(), whose catalog
-- cache may not yet know of a partition another session just created.
CREATE FUNCTION ensure_access_partitions(days date[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    partition text;
BEGIN
    FOREACH day IN ARRAY days LOOP
        partition := 'access_events_p' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM pg_class
            WHERE relname = partition AND relnamespace = current_schema()::regnamespace);
        PERFORM pg_advisory_xact_lock(7160514411023985201);
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM pg_class
            WHERE relname = partition AND relnamespace = current_schema()::regnamespace);
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF access_events FOR VALUES FROM (%L) TO (%L)',
            partition,
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END;
$$;

-- Drop the access partitions whose whole day ended more than keep_days days before
-- as_of; returns the names dropped.
CREATE FUNCTION drop_access_partitions(keep_days integer, as_of timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    partition text;
BEGIN
    IF keep_days IS NULL OR keep_days < 0 THEN
        RAISE EXCEPTION 'keep_days must be zero or more, got %', keep_days;
    END IF;
    PERFORM pg_advisory_xact_lock(7160514411023985201);
    FOR partition IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'access_events'::regclass
          AND c.relname ~ '^access_events_p[0-9]{8}$'
          AND (to_date(substr(c.relname, 16), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
              <= as_of - make_interval(days => keep_days)
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', partition);
        RETURN NEXT partition;
    END LOOP;
END;
$$;
