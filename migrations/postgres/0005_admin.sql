-- Key rotation: a rotated key keeps its id; its previous secret keeps working until
-- previous_expires_ms (the grace period), then only the new one does.
ALTER TABLE api_keys ADD COLUMN previous_secret_hash TEXT;
ALTER TABLE api_keys ADD COLUMN previous_expires_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN rotated_ms BIGINT;

-- Client-supplied idempotency keys: a create retried with the same key returns the key it made
-- (without its secret, which is shown once), and a rotation retried with the same key does not
-- rotate again, whatever rotations came in between.
ALTER TABLE api_keys ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX api_keys_idempotency ON api_keys (idempotency_key);
CREATE TABLE key_rotations (
    key_id          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    rotated_ms      BIGINT NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);

-- Every admin API call: who, what, when, and how it ended.
CREATE TABLE audit_log (
    id      BIGSERIAL PRIMARY KEY,
    at_ms   BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    remote  TEXT,
    method  TEXT NOT NULL,
    path    TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT,
    status  INTEGER NOT NULL,
    detail  TEXT
);
CREATE INDEX audit_log_at ON audit_log (at_ms);

-- The tenant's time zone when the request was made: daily rollups use the tenant's calendar.
ALTER TABLE ledger ADD COLUMN time_zone TEXT;

-- The ledger, partitioned by month of arrival (UTC): retention drops whole partitions instead of
-- deleting rows. The primary key must include the partition key; a request's created_ms never
-- changes (retries and spool replays send the same row), so (request_id, created_ms) still
-- makes every request land once.
ALTER TABLE ledger RENAME TO ledger_unpartitioned;
ALTER INDEX ledger_pkey RENAME TO ledger_unpartitioned_pkey;
ALTER INDEX ledger_tenant_time RENAME TO ledger_unpartitioned_tenant_time;
CREATE TABLE ledger (LIKE ledger_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (created_ms);
ALTER TABLE ledger ADD PRIMARY KEY (request_id, created_ms);
CREATE INDEX ledger_tenant_time ON ledger (tenant, created_ms);
-- Rows outside every monthly partition (clock errors, very old spool files) are kept here.
CREATE TABLE ledger_default PARTITION OF ledger DEFAULT;

-- Creates the partition holding the UTC month of `month` when missing; returns its name. Rows of
-- that month already in the default partition (a clock error, maintenance that could not run)
-- move into it, so a late partition never fails on them.
CREATE FUNCTION tollgate_ledger_partition(month DATE) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    start_ts TIMESTAMPTZ := date_trunc('month', month::timestamp) AT TIME ZONE 'UTC';
    end_ts TIMESTAMPTZ := (date_trunc('month', month::timestamp) + interval '1 month') AT TIME ZONE 'UTC';
    lo BIGINT := (extract(epoch FROM start_ts) * 1000)::BIGINT;
    hi BIGINT := (extract(epoch FROM end_ts) * 1000)::BIGINT;
    name TEXT := 'ledger_' || to_char(month, 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format('CREATE TABLE %I (LIKE ledger INCLUDING DEFAULTS)', name);
        EXECUTE format('WITH moved AS (DELETE FROM ledger_default WHERE created_ms >= %s AND created_ms < %s RETURNING *) '
                       'INSERT INTO %I SELECT * FROM moved', lo, hi, name);
        EXECUTE format('ALTER TABLE ledger ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', name, lo, hi);
    END IF;
    RETURN name;
END $$;

-- Partitions for the months already in the ledger (at most ten years back) up to two ahead.
DO $$
DECLARE
    this_month DATE := date_trunc('month', now() AT TIME ZONE 'UTC')::DATE;
    last DATE := (this_month + interval '2 months')::DATE;
    m DATE;
BEGIN
    SELECT COALESCE(date_trunc('month', to_timestamp(min(created_ms) / 1000.0) AT TIME ZONE 'UTC')::DATE, this_month)
      INTO m FROM ledger_unpartitioned;
    m := greatest(m, (last - interval '120 months')::DATE);
    WHILE m <= last LOOP
        PERFORM tollgate_ledger_partition(m);
        m := (m + interval '1 month')::DATE;
    END LOOP;
END $$;

INSERT INTO ledger SELECT * FROM ledger_unpartitioned;
DROP TABLE ledger_unpartitioned;

-- Rollups the dashboards read instead of the ledger, maintained by the ledger writer in the
-- same transaction as the rows they sum (so they can never disagree with it). Missing
-- dimensions are '' rather than NULL so that they can be part of the key.
CREATE TABLE usage_hourly (
    hour_ms                   BIGINT NOT NULL, -- start of the UTC hour, epoch ms
    tenant                    TEXT NOT NULL,
    key_id                    TEXT NOT NULL,
    model                     TEXT NOT NULL,
    backend                   TEXT NOT NULL,
    tier                      TEXT NOT NULL,
    tags                      TEXT NOT NULL,
    requests                  BIGINT NOT NULL,
    prompt_tokens             BIGINT NOT NULL,
    cached_tokens             BIGINT NOT NULL,
    completion_tokens         BIGINT NOT NULL,
    cost_micros               BIGINT NOT NULL,
    premium_equivalent_micros BIGINT NOT NULL,
    PRIMARY KEY (hour_ms, tenant, key_id, model, backend, tier, tags)
);
CREATE INDEX usage_hourly_tenant ON usage_hourly (tenant, hour_ms);

CREATE TABLE usage_daily (
    day                       BIGINT NOT NULL, -- the tenant's calendar day, as YYYYMMDD
    tenant                    TEXT NOT NULL,
    key_id                    TEXT NOT NULL,
    model                     TEXT NOT NULL,
    backend                   TEXT NOT NULL,
    tier                      TEXT NOT NULL,
    tags                      TEXT NOT NULL,
    requests                  BIGINT NOT NULL,
    prompt_tokens             BIGINT NOT NULL,
    cached_tokens             BIGINT NOT NULL,
    completion_tokens         BIGINT NOT NULL,
    cost_micros               BIGINT NOT NULL,
    premium_equivalent_micros BIGINT NOT NULL,
    PRIMARY KEY (day, tenant, key_id, model, backend, tier, tags)
);
CREATE INDEX usage_daily_tenant ON usage_daily (tenant, day);

-- The same days without key and backend: what the dashboard's charts, top models, the routing
-- split and the chargeback export read. Far fewer cells than usage_daily, so long ranges stay fast.
CREATE TABLE usage_daily_model (
    day                       BIGINT NOT NULL,
    tenant                    TEXT NOT NULL,
    model                     TEXT NOT NULL,
    tier                      TEXT NOT NULL,
    tags                      TEXT NOT NULL,
    requests                  BIGINT NOT NULL,
    prompt_tokens             BIGINT NOT NULL,
    cached_tokens             BIGINT NOT NULL,
    completion_tokens         BIGINT NOT NULL,
    cost_micros               BIGINT NOT NULL,
    premium_equivalent_micros BIGINT NOT NULL,
    PRIMARY KEY (day, tenant, model, tier, tags)
);
CREATE INDEX usage_daily_model_tenant ON usage_daily_model (tenant, day);

-- Rows written before this migration have no time zone: their days are UTC days.
INSERT INTO usage_hourly
SELECT (created_ms / 3600000) * 3600000, tenant, key_id, COALESCE(routed_model, model), COALESCE(backend, ''),
       COALESCE(tier, ''), COALESCE(tags, ''), COUNT(*), SUM(prompt_tokens), SUM(cached_tokens),
       SUM(completion_tokens), SUM(cost_micros), COALESCE(SUM(premium_equivalent_micros), 0)
FROM ledger GROUP BY 1, 2, 3, 4, 5, 6, 7;

INSERT INTO usage_daily
SELECT CAST(to_char(to_timestamp(created_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYYMMDD') AS BIGINT), tenant, key_id, COALESCE(routed_model, model),
       COALESCE(backend, ''), COALESCE(tier, ''), COALESCE(tags, ''), COUNT(*), SUM(prompt_tokens),
       SUM(cached_tokens), SUM(completion_tokens), SUM(cost_micros),
       COALESCE(SUM(premium_equivalent_micros), 0)
FROM ledger GROUP BY 1, 2, 3, 4, 5, 6, 7;

INSERT INTO usage_daily_model
SELECT day, tenant, model, tier, tags, SUM(requests), SUM(prompt_tokens), SUM(cached_tokens),
       SUM(completion_tokens), SUM(cost_micros), SUM(premium_equivalent_micros)
FROM usage_daily GROUP BY 1, 2, 3, 4, 5;
