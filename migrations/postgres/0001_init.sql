-- Tenant API keys: only the SHA-256 of the secret is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    revoked_ms  BIGINT,
    updated_ms  BIGINT NOT NULL
);
CREATE INDEX api_keys_updated ON api_keys (updated_ms);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- One row per authenticated request. Times are Unix epoch milliseconds (UTC).
CREATE TABLE ledger (
    request_id                 TEXT PRIMARY KEY,
    created_ms                 BIGINT NOT NULL,
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
    prompt_tokens              BIGINT NOT NULL,
    cached_tokens              BIGINT NOT NULL,
    completion_tokens          BIGINT NOT NULL,
    counted_prompt_tokens      BIGINT NOT NULL,
    counted_completion_tokens  BIGINT NOT NULL,
    provider_prompt_tokens     BIGINT,
    provider_cached_tokens     BIGINT,
    provider_completion_tokens BIGINT,
    usage_source               TEXT NOT NULL,
    cost_micros                BIGINT NOT NULL,
    latency_ms                 BIGINT NOT NULL,
    ttft_ms                    BIGINT
);
CREATE INDEX ledger_tenant_time ON ledger (tenant, created_ms);
