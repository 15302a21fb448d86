//! The database: SQLite for the embedded default, Postgres in production. Reports over the
//! rollups live in `store/reports.rs`; admin writes (rotation, audit, partitions) in `store/admin.rs`.
//!
//! Both speak the same schema (see `migrations/`). Queries are written once in Postgres
//! placeholder style (`$1`); SQLite reads them as numbered `?1` parameters.

use std::str::FromStr;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, Row, SqlitePool};

use crate::ledger::LedgerRow;

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// An API key as stored: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub name: Option<String>,
    pub secret_hash: String,
    /// The first characters of the secret, enough to recognise it, never to use it.
    pub prefix: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
    pub updated_ms: i64,
    /// After a rotation: the replaced secret's hash, accepted until `previous_expires_ms`.
    pub previous_secret_hash: Option<String>,
    pub previous_expires_ms: Option<i64>,
    pub rotated_ms: Option<i64>,
    /// The client-supplied id that made this key (a retried create returns this key).
    pub idempotency_key: Option<String>,
}

/// Totals over a slice of the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
}

/// Executes one statement on whichever pool is configured; `$sql` is written for Postgres.
macro_rules! execute {
    ($store:expr, $sql:expr $(, $bind:expr)*) => {
        match &$store.pool {
            Pool::Sqlite(pool) => sqlx::query(&sqlite_sql($sql))$(.bind($bind))*.execute(pool).await.map(|r| r.rows_affected()),
            Pool::Postgres(pool) => sqlx::query($sql)$(.bind($bind))*.execute(pool).await.map(|r| r.rows_affected()),
        }
    };
}

/// Ledger rows per statement (34 parameters each; SQLite allows 32,766 per statement).
const LEDGER_CHUNK: usize = 900;
/// Rollup cells per statement (14 parameters each: well inside SQLite's and Postgres' limits).
const ROLLUP_CHUNK: usize = 1000;

fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

macro_rules! key_columns {
    () => {
        "id, tenant, name, secret_hash, prefix, created_ms, revoked_ms, updated_ms, \
         previous_secret_hash, previous_expires_ms, rotated_ms, idempotency_key"
    };
}
const KEY_COLUMNS: &str = key_columns!();
const KEY_SELECT: &str = concat!("SELECT ", key_columns!(), " FROM api_keys");

const LEDGER_INSERT: &str = "INSERT INTO ledger (request_id, created_ms, tenant, key_id, endpoint, model, \
    backend, upstream_model, stream, status, outcome, attempts, prompt_tokens, cached_tokens, \
    completion_tokens, counted_prompt_tokens, counted_completion_tokens, provider_prompt_tokens, \
    provider_cached_tokens, provider_completion_tokens, usage_source, cost_micros, latency_ms, ttft_ms, tags, route, tier, route_score, route_reason, routed_model, \
    premium_equivalent_micros, spec_acceptance, spec_tokens_per_pass, time_zone) ";
/// No conflict target: in Postgres the key is (request_id, created_ms), the partition key
/// included. Only the rows actually inserted come back, and only they reach the rollups.
const LEDGER_CONFLICT: &str = " ON CONFLICT DO NOTHING RETURNING request_id, created_ms";

macro_rules! push_ledger_values {
    ($b:ident, $r:ident) => {
        $b.push_bind($r.request_id.clone())
            .push_bind($r.created_ms)
            .push_bind($r.tenant.clone())
            .push_bind($r.key_id.clone())
            .push_bind($r.endpoint.clone())
            .push_bind($r.model.clone())
            .push_bind($r.backend.clone())
            .push_bind($r.upstream_model.clone())
            .push_bind($r.stream)
            .push_bind($r.status)
            .push_bind($r.outcome.clone())
            .push_bind($r.attempts)
            .push_bind($r.prompt_tokens)
            .push_bind($r.cached_tokens)
            .push_bind($r.completion_tokens)
            .push_bind($r.counted_prompt_tokens)
            .push_bind($r.counted_completion_tokens)
            .push_bind($r.provider_prompt_tokens)
            .push_bind($r.provider_cached_tokens)
            .push_bind($r.provider_completion_tokens)
            .push_bind($r.usage_source.clone())
            .push_bind($r.cost_micros)
            .push_bind($r.latency_ms)
            .push_bind($r.ttft_ms)
            .push_bind($r.tags.clone())
            .push_bind($r.routing.as_ref().map(|x| x.route.clone()))
            .push_bind($r.routing.as_ref().map(|x| x.tier.clone()))
            .push_bind($r.routing.as_ref().map(|x| x.score))
            .push_bind($r.routing.as_ref().map(|x| x.reason.clone()))
            .push_bind($r.routing.as_ref().map(|x| x.routed_model.clone()))
            .push_bind($r.routing.as_ref().map(|x| x.premium_equivalent_micros))
            .push_bind($r.speculation.map(|x| x.acceptance_rate))
            .push_bind($r.speculation.map(|x| x.tokens_per_pass))
            .push_bind($r.time_zone.clone());
    };
}

macro_rules! ledger_from_row {
    ($row:expr) => {
        Ok::<_, sqlx::Error>(LedgerRow {
            request_id: $row.try_get("request_id")?,
            created_ms: $row.try_get("created_ms")?,
            tenant: $row.try_get("tenant")?,
            key_id: $row.try_get("key_id")?,
            endpoint: $row.try_get("endpoint")?,
            model: $row.try_get("model")?,
            backend: $row.try_get("backend")?,
            upstream_model: $row.try_get("upstream_model")?,
            stream: $row.try_get("stream")?,
            status: $row.try_get("status")?,
            outcome: $row.try_get("outcome")?,
            attempts: $row.try_get("attempts")?,
            prompt_tokens: $row.try_get("prompt_tokens")?,
            cached_tokens: $row.try_get("cached_tokens")?,
            completion_tokens: $row.try_get("completion_tokens")?,
            counted_prompt_tokens: $row.try_get("counted_prompt_tokens")?,
            counted_completion_tokens: $row.try_get("counted_completion_tokens")?,
            provider_prompt_tokens: $row.try_get("provider_prompt_tokens")?,
            provider_cached_tokens: $row.try_get("provider_cached_tokens")?,
            provider_completion_tokens: $row.try_get("provider_completion_tokens")?,
            usage_source: $row.try_get("usage_source")?,
            cost_micros: $row.try_get("cost_micros")?,
            latency_ms: $row.try_get("latency_ms")?,
            ttft_ms: $row.try_get("ttft_ms")?,
            tags: $row.try_get("tags")?,
            routing: match $row.try_get::<Option<String>, _>("route")? {
                None => None,
                Some(route) => Some(crate::ledger::Routing {
                    route,
                    tier: $row
                        .try_get::<Option<String>, _>("tier")?
                        .unwrap_or_default(),
                    score: $row
                        .try_get::<Option<f64>, _>("route_score")?
                        .unwrap_or_default(),
                    reason: $row
                        .try_get::<Option<String>, _>("route_reason")?
                        .unwrap_or_default(),
                    routed_model: $row
                        .try_get::<Option<String>, _>("routed_model")?
                        .unwrap_or_default(),
                    premium_equivalent_micros: $row
                        .try_get::<Option<i64>, _>("premium_equivalent_micros")?
                        .unwrap_or_default(),
                }),
            },
            speculation: match (
                $row.try_get::<Option<f64>, _>("spec_acceptance")?,
                $row.try_get::<Option<f64>, _>("spec_tokens_per_pass")?,
            ) {
                (Some(acceptance_rate), Some(tokens_per_pass)) => {
                    Some(crate::ledger::Speculation {
                        acceptance_rate,
                        tokens_per_pass,
                    })
                }
                _ => None,
            },
            time_zone: $row.try_get("time_zone")?,
        })
    };
}

macro_rules! key_from_row {
    ($name:ident, $row:ty) => {
        fn $name(row: &$row) -> Result<KeyRecord, sqlx::Error> {
            Ok(KeyRecord {
                id: row.try_get("id")?,
                tenant: row.try_get("tenant")?,
                name: row.try_get("name")?,
                secret_hash: row.try_get("secret_hash")?,
                prefix: row.try_get("prefix")?,
                created_ms: row.try_get("created_ms")?,
                revoked_ms: row.try_get("revoked_ms")?,
                updated_ms: row.try_get("updated_ms")?,
                previous_secret_hash: row.try_get("previous_secret_hash")?,
                previous_expires_ms: row.try_get("previous_expires_ms")?,
                rotated_ms: row.try_get("rotated_ms")?,
                idempotency_key: row.try_get("idempotency_key")?,
            })
        }
    };
}
key_from_row!(key_from_sqlite, sqlx::sqlite::SqliteRow);
key_from_row!(key_from_pg, sqlx::postgres::PgRow);

mod admin;
mod reports;
pub use admin::{AuditEntry, Rotation};

/// Whether a failed write was the database refusing the data itself (a value it cannot store,
/// a constraint, a trigger's exception), as opposed to failing to reach or run the database.
/// Refused rows are set aside; failures to reach it are retried.
pub fn is_refusal(error: &anyhow::Error) -> bool {
    match error.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default();
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                // SQLSTATE classes that depend on the row: data exceptions (22, e.g. a NUL
                // byte), integrity (23), program limits such as an oversized index row (54),
                // raised by a trigger or function (P0). Others are about the database, not the
                // row (connection, resources, shutdown, serialisation, and 42: a missing table
                // or privilege, which every row would meet), and are retried.
                ["22", "23", "54", "P0"]
                    .iter()
                    .any(|class| code.starts_with(class))
            } else {
                // SQLite extended result codes; the primary code is the low byte: CONSTRAINT
                // (19, a trigger's RAISE included), MISMATCH (20), TOOBIG (18).
                code.parse::<u32>()
                    .is_ok_and(|c| matches!(c & 0xff, 18..=20))
            }
        }
        Some(sqlx::Error::Encode(_)) | Some(sqlx::Error::TypeNotFound { .. }) => true,
        _ => false,
    }
}

impl Store {
    /// Connects (creating a SQLite file when missing) and applies pending migrations.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .with_context(|| "invalid sqlite database_url")?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(std::time::Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .context("opening the SQLite database")?;
            sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options =
                PgConnectOptions::from_str(url).with_context(|| "invalid postgres database_url")?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect_with(options)
                .await
                .context("connecting to Postgres")?;
            sqlx::migrate!("../migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            anyhow::bail!("database_url must start with sqlite: or postgres:");
        };
        Ok(Store { pool })
    }

    /// Runs one statement as it is (tests set up triggers and faults with it).
    #[cfg(test)]
    pub(crate) async fn execute_raw(&self, sql: &str) -> anyhow::Result<()> {
        match &self.pool {
            Pool::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop)?,
            Pool::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop)?,
        }
        Ok(())
    }

    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }

    /// Stores a new key. Returns false, storing nothing, when its idempotency key is taken.
    pub async fn insert_key(&self, key: &KeyRecord) -> anyhow::Result<bool> {
        let sql = "INSERT INTO api_keys (id, tenant, name, secret_hash, prefix, created_ms, revoked_ms, updated_ms, idempotency_key) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (idempotency_key) DO NOTHING";
        let inserted = execute!(
            self,
            sql,
            &key.id,
            &key.tenant,
            &key.name,
            &key.secret_hash,
            &key.prefix,
            key.created_ms,
            key.revoked_ms,
            key.updated_ms,
            &key.idempotency_key
        )?;
        Ok(inserted > 0)
    }

    /// Marks a key revoked; returns false when no active key has that id.
    pub async fn revoke_key(&self, id: &str) -> anyhow::Result<bool> {
        let now = now_ms();
        let sql = "UPDATE api_keys SET revoked_ms = $1, updated_ms = $1 WHERE id = $2 AND revoked_ms IS NULL";
        let affected = execute!(self, sql, now, id)?;
        Ok(affected > 0)
    }

    /// Keys created or changed at or after `since_ms` (all keys for 0), oldest change first.
    pub async fn keys_changed_since(&self, since_ms: i64) -> anyhow::Result<Vec<KeyRecord>> {
        let sql = format!("{KEY_SELECT} WHERE updated_ms >= $1 ORDER BY updated_ms, id");
        let sql = sql.as_str();
        let keys = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query(&sqlite_sql(sql))
                .bind(since_ms)
                .fetch_all(pool)
                .await?
                .iter()
                .map(key_from_sqlite)
                .collect::<Result<_, _>>()?,
            Pool::Postgres(pool) => sqlx::query(sql)
                .bind(since_ms)
                .fetch_all(pool)
                .await?
                .iter()
                .map(key_from_pg)
                .collect::<Result<_, _>>()?,
        };
        Ok(keys)
    }

    /// Writes rows and their rollups in one transaction; rows already present (same request id
    /// and arrival time) are skipped and not summed again.
    pub async fn insert_ledger_rows(&self, rows: &[LedgerRow]) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        macro_rules! insert {
            ($pool:expr, $db:ty) => {{
                let mut tx = $pool.begin().await?;
                let mut inserted = std::collections::HashSet::<(String, i64)>::new();
                for chunk in rows.chunks(LEDGER_CHUNK) {
                    let mut builder = sqlx::QueryBuilder::<$db>::new(LEDGER_INSERT);
                    builder.push_values(chunk, |mut b, r| {
                        push_ledger_values!(b, r);
                    });
                    builder.push(LEDGER_CONFLICT);
                    for row in builder.build().fetch_all(&mut *tx).await? {
                        inserted.insert((row.try_get("request_id")?, row.try_get("created_ms")?));
                    }
                }
                // Each inserted row counts once, even if a batch carried it twice.
                let new_rows = rows
                    .iter()
                    .filter(|r| inserted.remove(&(r.request_id.clone(), r.created_ms)));
                let rollup = crate::rollup::Rollup::of(new_rows);
                for (table, cells) in rollup.tables() {
                    for chunk in cells.chunks(ROLLUP_CHUNK) {
                        let mut builder = sqlx::QueryBuilder::<$db>::new(format!(
                            "INSERT INTO {} ({}, {}, {}) ",
                            table.name,
                            table.bucket,
                            table.dimension_columns(),
                            crate::rollup::SUM_COLUMNS.join(", ")
                        ));
                        builder.push_values(chunk, |mut b, (key, sums)| {
                            b.push_bind(key.bucket).push_bind(&key.tenant);
                            if table.by_key_and_backend {
                                b.push_bind(&key.key_id);
                            }
                            b.push_bind(&key.model);
                            if table.by_key_and_backend {
                                b.push_bind(&key.backend);
                            }
                            b.push_bind(&key.tier).push_bind(&key.tags);
                            for value in sums.values() {
                                b.push_bind(value);
                            }
                        });
                        builder.push(table.upsert_clause());
                        builder.build().execute(&mut *tx).await?;
                    }
                }
                tx.commit().await?;
            }};
        }
        match &self.pool {
            Pool::Sqlite(pool) => insert!(pool, sqlx::Sqlite),
            Pool::Postgres(pool) => insert!(pool, sqlx::Postgres),
        }
        Ok(())
    }

    /// Totals per model for a tenant since a time (epoch ms).
    pub async fn usage_by_model(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> anyhow::Result<Vec<UsageTotals>> {
        let sql = "SELECT model, COUNT(*) AS requests, \
                   CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt, \
                   CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached, \
                   CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion, \
                   CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS cost \
                   FROM ledger WHERE tenant = $1 AND created_ms >= $2 GROUP BY model ORDER BY model";
        macro_rules! totals {
            ($rows:expr) => {
                $rows
                    .iter()
                    .map(|row| -> Result<UsageTotals, sqlx::Error> {
                        Ok(UsageTotals {
                            model: row.try_get("model")?,
                            requests: row.try_get("requests")?,
                            prompt_tokens: row.try_get("prompt")?,
                            cached_tokens: row.try_get("cached")?,
                            completion_tokens: row.try_get("completion")?,
                            cost_micros: row.try_get("cost")?,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
        }
        let totals = match &self.pool {
            Pool::Sqlite(pool) => {
                let rows = sqlx::query(&sqlite_sql(sql))
                    .bind(tenant)
                    .bind(since_ms)
                    .fetch_all(pool)
                    .await?;
                totals!(rows)
            }
            Pool::Postgres(pool) => {
                let rows = sqlx::query(sql)
                    .bind(tenant)
                    .bind(since_ms)
                    .fetch_all(pool)
                    .await?;
                totals!(rows)
            }
        };
        Ok(totals)
    }

    /// What a tenant's requests used within `[from_ms, to_ms)` of arrival, counting only those
    /// that ended before `ended_before_ms`: (admitted requests, prompt + completion tokens,
    /// cost). `key` and `model` narrow it; a routed request counts under the model that served
    /// it (`routed_model`), as admission charged it. Used to rebuild budget counters.
    pub async fn sum_usage(
        &self,
        tenant: &str,
        key: Option<&str>,
        model: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        ended_before_ms: i64,
    ) -> anyhow::Result<(i64, i64, i64)> {
        let sql = "SELECT CAST(COALESCE(SUM(CASE WHEN outcome <> 'rejected' THEN 1 ELSE 0 END), 0) AS BIGINT) AS requests, \
                   CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS tokens, \
                   CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS cost \
                   FROM ledger WHERE tenant = $1 AND created_ms >= $2 AND created_ms < $3 \
                   AND created_ms + latency_ms < $4 \
                   AND (CAST($5 AS TEXT) IS NULL OR key_id = CAST($5 AS TEXT)) \
                   AND (CAST($6 AS TEXT) IS NULL OR COALESCE(routed_model, model) = CAST($6 AS TEXT))";
        macro_rules! sums {
            ($pool:expr, $sql:expr) => {{
                let row = sqlx::query($sql)
                    .bind(tenant)
                    .bind(from_ms)
                    .bind(to_ms)
                    .bind(ended_before_ms)
                    .bind(key)
                    .bind(model)
                    .fetch_one($pool)
                    .await?;
                (
                    row.try_get("requests")?,
                    row.try_get("tokens")?,
                    row.try_get("cost")?,
                )
            }};
        }
        Ok(match &self.pool {
            Pool::Sqlite(pool) => sums!(pool, &sqlite_sql(sql)),
            Pool::Postgres(pool) => sums!(pool, sql),
        })
    }

    /// Every ledger row of a tenant, oldest first (for tests and exports).
    pub async fn ledger_rows(&self, tenant: &str) -> anyhow::Result<Vec<LedgerRow>> {
        let sql = "SELECT * FROM ledger WHERE tenant = $1 ORDER BY created_ms, request_id";
        let rows = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query(&sqlite_sql(sql))
                .bind(tenant)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| ledger_from_row!(row))
                .collect::<Result<_, sqlx::Error>>()?,
            Pool::Postgres(pool) => sqlx::query(sql)
                .bind(tenant)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| ledger_from_row!(row))
                .collect::<Result<_, sqlx::Error>>()?,
        };
        Ok(rows)
    }
}

#[cfg(test)]
mod sum_usage_tests {
    use super::*;
    use crate::ledger::{test_row, Routing};

    /// Two plain requests on `small`, two routed by `auto` to `small`, one routed to `large`.
    fn rows(now: i64) -> Vec<LedgerRow> {
        let routed = |id: &str, served: &str| {
            let mut row = test_row(id, now, None, 100);
            row.model = "auto".into();
            row.routing = Some(Routing {
                route: "auto".into(),
                tier: if served == "small" {
                    "cheap"
                } else {
                    "premium"
                }
                .into(),
                score: 0.5,
                reason: "test".into(),
                routed_model: served.into(),
                premium_equivalent_micros: 300,
            });
            row
        };
        let plain = |id: &str| {
            let mut row = test_row(id, now, None, 10);
            row.model = "small".into();
            row
        };
        vec![
            plain("p1"),
            plain("p2"),
            routed("r1", "small"),
            routed("r2", "small"),
            routed("r3", "large"),
        ]
    }

    async fn check(store: &Store) {
        let now = 1_795_822_200_000;
        store.insert_ledger_rows(&rows(now)).await.unwrap();
        let sum = |model: Option<&'static str>| {
            let store = store.clone();
            async move {
                store
                    .sum_usage("acme", None, model, now - 1, now + 1, now + 10)
                    .await
                    .unwrap()
            }
        };
        // A routed request counts under the model that served it, as admission charged it.
        assert_eq!(sum(Some("small")).await, (4, 60, 220));
        assert_eq!(sum(Some("large")).await, (1, 15, 100));
        assert_eq!(sum(Some("auto")).await, (0, 0, 0));
        assert_eq!(sum(None).await, (5, 75, 320));
    }

    #[tokio::test]
    async fn routed_requests_count_under_the_served_model_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!(
            "sqlite://{}",
            dir.path().join("ledger.db").display()
        ))
        .await
        .unwrap();
        check(&store).await;
    }

    #[tokio::test]
    async fn routed_requests_count_under_the_served_model_on_postgres() {
        let admin = std::env::var("TOLLGATE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!(
            "tollgate_sum_usage_{}_{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let store = Store::open(&url).await.unwrap();
        check(&store).await;
        // The served-model filter leaves the sum on the (tenant, created_ms) index.
        let Pool::Postgres(pg) = &store.pool else {
            unreachable!()
        };
        let mut connection = pg.acquire().await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *connection)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(
            "EXPLAIN SELECT COALESCE(SUM(cost_micros), 0) FROM ledger WHERE tenant = 'acme' \
             AND created_ms >= 0 AND created_ms < 10 AND created_ms + latency_ms < 10 \
             AND COALESCE(routed_model, model) = 'small'",
        )
        .fetch_all(&mut *connection)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("Index"), "{plan}");
        drop(connection);
        store.close().await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&pool)
            .await;
    }
}
