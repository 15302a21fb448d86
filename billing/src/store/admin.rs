//! What the admin API writes: key rotation and idempotent creation, and the audit log.

use serde::Serialize;
use sqlx::Row;

use super::{
    key_from_pg, key_from_sqlite, now_ms, sqlite_sql, KeyRecord, Pool, Store, KEY_COLUMNS,
    KEY_SELECT,
};

/// One admin API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    /// Who: the admin token's fingerprint (never the token), or `anonymous`.
    pub actor: String,
    pub remote: Option<String>,
    pub method: String,
    pub path: String,
    /// The route, e.g. `POST /admin/keys/{id}/rotate`.
    pub action: String,
    /// The object acted on (a key id), when there is one.
    pub target: Option<String>,
    pub status: i32,
    pub detail: Option<String>,
}

/// How a rotation request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    Rotated(KeyRecord),
    /// The same idempotency key rotated this key already: nothing changed.
    Replayed(KeyRecord),
    NotFound,
    Revoked,
}

impl Store {
    pub async fn key(&self, id: &str) -> anyhow::Result<Option<KeyRecord>> {
        self.key_where("id", id).await
    }

    pub async fn key_by_idempotency(
        &self,
        idempotency_key: &str,
    ) -> anyhow::Result<Option<KeyRecord>> {
        self.key_where("idempotency_key", idempotency_key).await
    }

    async fn key_where(&self, column: &str, value: &str) -> anyhow::Result<Option<KeyRecord>> {
        let sql = format!("{KEY_SELECT} WHERE {column} = $1");
        Ok(match &self.pool {
            Pool::Sqlite(pool) => sqlx::query(&sqlite_sql(&sql))
                .bind(value)
                .fetch_optional(pool)
                .await?
                .map(|row| key_from_sqlite(&row))
                .transpose()?,
            Pool::Postgres(pool) => sqlx::query(&sql)
                .bind(value)
                .fetch_optional(pool)
                .await?
                .map(|row| key_from_pg(&row))
                .transpose()?,
        })
    }

    /// Gives the key a new secret. The old one keeps working until `previous_expires_ms`; a
    /// secret replaced by an earlier rotation stops at once. With an idempotency key, a retry
    /// of the same rotation changes nothing, even after other rotations.
    pub async fn rotate_key(
        &self,
        id: &str,
        secret_hash: &str,
        prefix: &str,
        previous_expires_ms: i64,
        rotation_key: Option<&str>,
    ) -> anyhow::Result<Rotation> {
        let now = now_ms();
        let update = format!(
            "UPDATE api_keys SET previous_secret_hash = secret_hash, previous_expires_ms = $1, \
             secret_hash = $2, prefix = $3, rotated_ms = $4, updated_ms = $4 \
             WHERE id = $5 AND revoked_ms IS NULL RETURNING {KEY_COLUMNS}"
        );
        let remember = "INSERT INTO key_rotations (key_id, idempotency_key, rotated_ms) \
                        VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
        macro_rules! rotate {
            ($pool:expr, $sql:expr, $from_row:ident) => {{
                let mut tx = $pool.begin().await?;
                let first = match rotation_key {
                    Some(k) => {
                        sqlx::query(&$sql(remember))
                            .bind(id)
                            .bind(k)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                            > 0
                    }
                    None => true,
                };
                let rotated = if first {
                    sqlx::query(&$sql(&update))
                        .bind(previous_expires_ms)
                        .bind(secret_hash)
                        .bind(prefix)
                        .bind(now)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|row| $from_row(&row))
                        .transpose()?
                } else {
                    None
                };
                if rotated.is_some() {
                    tx.commit().await?;
                } else {
                    // Not rotated: the idempotency key stays unused for a later retry.
                    tx.rollback().await?;
                }
                (first, rotated)
            }};
        }
        let (first, rotated) = match &self.pool {
            Pool::Sqlite(pool) => rotate!(pool, sqlite_sql, key_from_sqlite),
            Pool::Postgres(pool) => rotate!(pool, str::to_string, key_from_pg),
        };
        if let Some(key) = rotated {
            return Ok(Rotation::Rotated(key));
        }
        Ok(match self.key(id).await? {
            None => Rotation::NotFound,
            Some(key) if !first => Rotation::Replayed(key),
            Some(_) => Rotation::Revoked,
        })
    }

    pub async fn audit(&self, entry: &AuditEntry) -> anyhow::Result<()> {
        let sql = "INSERT INTO audit_log (at_ms, actor, remote, method, path, action, target, status, detail) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
        execute!(
            self,
            sql,
            entry.at_ms,
            &entry.actor,
            &entry.remote,
            &entry.method,
            &entry.path,
            &entry.action,
            &entry.target,
            entry.status,
            &entry.detail
        )?;
        Ok(())
    }

    /// Deletes the audit entries made before `before_ms` (retention), in bounded batches so that
    /// a long backlog never holds one huge transaction. Returns how many were deleted.
    pub async fn prune_audit_log(&self, before_ms: i64) -> anyhow::Result<u64> {
        const BATCH: i64 = 10_000;
        let sql = "DELETE FROM audit_log WHERE id IN \
                   (SELECT id FROM audit_log WHERE at_ms < $1 ORDER BY id LIMIT $2)";
        let mut deleted = 0;
        loop {
            let n = execute!(self, sql, before_ms, BATCH)?;
            deleted += n;
            if n < BATCH as u64 {
                return Ok(deleted);
            }
        }
    }

    /// The newest audit entries first, at most `limit`, older than `before_id` when given.
    pub async fn audit_log(
        &self,
        limit: i64,
        before_id: Option<i64>,
    ) -> anyhow::Result<Vec<AuditEntry>> {
        let sql = "SELECT id, at_ms, actor, remote, method, path, action, target, status, detail \
                   FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2";
        let before = before_id.unwrap_or(i64::MAX);
        macro_rules! entries {
            ($rows:expr) => {
                $rows
                    .iter()
                    .map(|row| -> Result<AuditEntry, sqlx::Error> {
                        Ok(AuditEntry {
                            id: row.try_get("id")?,
                            at_ms: row.try_get("at_ms")?,
                            actor: row.try_get("actor")?,
                            remote: row.try_get("remote")?,
                            method: row.try_get("method")?,
                            path: row.try_get("path")?,
                            action: row.try_get("action")?,
                            target: row.try_get("target")?,
                            status: row.try_get("status")?,
                            detail: row.try_get("detail")?,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
        }
        Ok(match &self.pool {
            Pool::Sqlite(pool) => entries!(
                sqlx::query(&sqlite_sql(sql))
                    .bind(before)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            ),
            Pool::Postgres(pool) => entries!(
                sqlx::query(sql)
                    .bind(before)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            ),
        })
    }

    /// Postgres: makes sure the ledger has partitions for this month and the next two, and drops
    /// the monthly partitions that ended more than `retain_months` months before this month
    /// (whole partitions: never a mass DELETE). Returns the partitions dropped. SQLite keeps
    /// one table and nothing happens.
    pub async fn maintain_partitions(
        &self,
        retain_months: Option<u32>,
    ) -> anyhow::Result<Vec<String>> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(Vec::new());
        };
        let mut tx = pool.begin().await?;
        // One replica at a time: concurrent CREATEs of the same partition would fail.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tollgate.ledger_partitions'))")
            .execute(&mut *tx)
            .await?;
        for month in 0..3 {
            sqlx::query(
                "SELECT tollgate_ledger_partition((date_trunc('month', now() AT TIME ZONE 'UTC') + $1 * interval '1 month')::date)",
            )
            .bind(month)
            .execute(&mut *tx)
            .await?;
        }
        let mut dropped = Vec::new();
        if let Some(months) = retain_months {
            let cutoff: String = sqlx::query_scalar(
                "SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC') - $1 * interval '1 month', 'YYYY_MM')",
            )
            .bind(i32::try_from(months).unwrap_or(i32::MAX))
            .fetch_one(&mut *tx)
            .await?;
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'ledger'::regclass AND c.relname ~ '^ledger_[0-9]{4}_[0-9]{2}$' ORDER BY 1",
            )
            .fetch_all(&mut *tx)
            .await?;
            for name in names {
                // `ledger_YYYY_MM` sorts like its month.
                if name["ledger_".len()..] < *cutoff {
                    sqlx::query(&format!("DROP TABLE \"{name}\""))
                        .execute(&mut *tx)
                        .await?;
                    dropped.push(name);
                }
            }
        }
        tx.commit().await?;
        Ok(dropped)
    }
}
