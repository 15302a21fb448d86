-- Key rotation: a rotated key keeps its id; its previous secret keeps working until
-- previous_expires_ms (the grace period), then only the new one does.
ALTER TABLE api_keys ADD COLUMN previous_secret_hash TEXT;
ALTER TABLE api_keys ADD COLUMN previous_expires_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN rotated_ms INTEGER;

-- Client-supplied idempotency keys: a create retried with the same key returns the key it made
-- (without its secret, which is shown once), and a rotation retried with the same key does not
-- rotate again, whatever rotations came in between.
ALTER TABLE api_keys ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX api_keys_idempotency ON api_keys (idempotency_key);
CREATE TABLE key_rotations (
    key_id          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    rotated_ms      INTEGER NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);

-- Every admin API call: who, what, when, and how it ended.
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
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

-- Rollups the dashboards read instead of the ledger, maintained by the ledger writer in the
-- same transaction as the rows they sum (so they can never disagree with it). Missing
-- dimensions are '' rather than NULL so that they can be part of the key.
CREATE TABLE usage_hourly (
    hour_ms                   INTEGER NOT NULL, -- start of the UTC hour, epoch ms
    tenant                    TEXT NOT NULL,
    key_id                    TEXT NOT NULL,
    model                     TEXT NOT NULL,
    backend                   TEXT NOT NULL,
    tier                      TEXT NOT NULL,
    tags                      TEXT NOT NULL,
    requests                  INTEGER NOT NULL,
    prompt_tokens             INTEGER NOT NULL,
    cached_tokens             INTEGER NOT NULL,
    completion_tokens         INTEGER NOT NULL,
    cost_micros               INTEGER NOT NULL,
    premium_equivalent_micros INTEGER NOT NULL,
    PRIMARY KEY (hour_ms, tenant, key_id, model, backend, tier, tags)
);
CREATE INDEX usage_hourly_tenant ON usage_hourly (tenant, hour_ms);

CREATE TABLE usage_daily (
    day                       INTEGER NOT NULL, -- the tenant's calendar day, as YYYYMMDD
    tenant                    TEXT NOT NULL,
    key_id                    TEXT NOT NULL,
    model                     TEXT NOT NULL,
    backend                   TEXT NOT NULL,
    tier                      TEXT NOT NULL,
    tags                      TEXT NOT NULL,
    requests                  INTEGER NOT NULL,
    prompt_tokens             INTEGER NOT NULL,
    cached_tokens             INTEGER NOT NULL,
    completion_tokens         INTEGER NOT NULL,
    cost_micros               INTEGER NOT NULL,
    premium_equivalent_micros INTEGER NOT NULL,
    PRIMARY KEY (day, tenant, key_id, model, backend, tier, tags)
);
CREATE INDEX usage_daily_tenant ON usage_daily (tenant, day);

-- The same days without key and backend: what the dashboard's charts, top models, the routing
-- split and the chargeback export read. Far fewer cells than usage_daily, so long ranges stay fast.
CREATE TABLE usage_daily_model (
    day                       INTEGER NOT NULL,
    tenant                    TEXT NOT NULL,
    model                     TEXT NOT NULL,
    tier                      TEXT NOT NULL,
    tags                      TEXT NOT NULL,
    requests                  INTEGER NOT NULL,
    prompt_tokens             INTEGER NOT NULL,
    cached_tokens             INTEGER NOT NULL,
    completion_tokens         INTEGER NOT NULL,
    cost_micros               INTEGER NOT NULL,
    premium_equivalent_micros INTEGER NOT NULL,
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
SELECT CAST(strftime('%Y%m%d', created_ms / 1000, 'unixepoch') AS INTEGER), tenant, key_id, COALESCE(routed_model, model),
       COALESCE(backend, ''), COALESCE(tier, ''), COALESCE(tags, ''), COUNT(*), SUM(prompt_tokens),
       SUM(cached_tokens), SUM(completion_tokens), SUM(cost_micros),
       COALESCE(SUM(premium_equivalent_micros), 0)
FROM ledger GROUP BY 1, 2, 3, 4, 5, 6, 7;

INSERT INTO usage_daily_model
SELECT day, tenant, model, tier, tags, SUM(requests), SUM(prompt_tokens), SUM(cached_tokens),
       SUM(completion_tokens), SUM(cost_micros), SUM(premium_equivalent_micros)
FROM usage_daily GROUP BY 1, 2, 3, 4, 5;
