-- Tenant API keys: only the SHA-256 of the secret is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER,
    updated_ms  INTEGER NOT NULL
);
CREATE INDEX api_keys_updated ON api_keys (updated_ms);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- One row per authenticated request. Times are Unix epoch milliseconds (UTC).
CREATE TABLE ledger (
    request_id                 TEXT PRIMARY KEY,
    created_ms                 INTEGER NOT NULL,
    tenant                     TEXT NOT NULL,
    key_id                     TEXT NOT NULL,
    endpoint                   TEXT NOT NULL,
    model                      TEXT NOT NULL,
    backend                    TEXT,
    upstream_model             TEXT,
    stream                     BOOLEAN NOT NULL,
    status                     INTEGER NOT NULL,
    outcome                    TEXT NOT NULL,
    attempts                   INTEGER NOT NULL,
    prompt_tokens              INTEGER NOT NULL,
    cached_tokens              INTEGER NOT NULL,
    completion_tokens          INTEGER NOT NULL,
    counted_prompt_tokens      INTEGER NOT NULL,
    counted_completion_tokens  INTEGER NOT NULL,
    provider_prompt_tokens     INTEGER,
    provider_cached_tokens     INTEGER,
    provider_completion_tokens INTEGER,
    usage_source               TEXT NOT NULL,
    cost_micros                INTEGER NOT NULL,
    latency_ms                 INTEGER NOT NULL,
    ttft_ms                    INTEGER
);
CREATE INDEX ledger_tenant_time ON ledger (tenant, created_ms);
