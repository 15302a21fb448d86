//! Usage reports, answered from the rollup tables (never the raw ledger).

use sqlx::Row;

use super::{sqlite_sql, Pool, Store};
use crate::report::{day_text, Dimension, UsageQuery, UsageReport, UsageRow};
use crate::rollup::{day_number, Sums, Table, DAILY, DAILY_BY_MODEL, HOURLY, SUM_COLUMNS};

enum Bind {
    Int(i64),
    Text(String),
}

/// The SQL of a usage query and its parameters (Postgres placeholders).
fn usage_sql(query: &UsageQuery, with_tags: bool, postgres: bool) -> (String, Vec<Bind>) {
    let mut binds = Vec::new();
    let mut param = |bind: Bind| {
        binds.push(bind);
        format!("${}", binds.len())
    };
    let mut columns = Vec::new();
    for (i, dimension) in query.group_by.iter().enumerate() {
        let expr = match dimension {
            Dimension::Tenant => "tenant".to_string(),
            Dimension::Key => "key_id".to_string(),
            Dimension::Model => "NULLIF(model, '')".to_string(),
            Dimension::Backend => "NULLIF(backend, '')".to_string(),
            Dimension::Tier => "NULLIF(tier, '')".to_string(),
            // Buckets stay integers (cheaper to group); `present` formats them.
            Dimension::Day => "day".to_string(),
            Dimension::Hour => "hour_ms".to_string(),
            Dimension::Tag(tag) if postgres => format!(
                "(CAST(NULLIF(tags, '') AS jsonb) ->> {})",
                param(Bind::Text(tag.clone()))
            ),
            Dimension::Tag(tag) => format!(
                "CAST(json_extract(NULLIF(tags, ''), {}) AS TEXT)",
                param(Bind::Text(format!("$.\"{tag}\"")))
            ),
        };
        columns.push(format!("{expr} AS g{i}"));
    }
    for column in SUM_COLUMNS {
        columns.push(format!(
            "CAST(COALESCE(SUM({column}), 0) AS BIGINT) AS {column}"
        ));
    }
    if with_tags {
        columns.push("MAX(tags) AS tags".into());
    }
    let (table, range): (Table, String) = if query.hourly() {
        let (start, end) = query.hour_range();
        let range = format!(
            "hour_ms >= {} AND hour_ms < {}",
            param(Bind::Int(start)),
            param(Bind::Int(end))
        );
        (HOURLY, range)
    } else {
        let range = format!(
            "day >= {} AND day <= {}",
            param(Bind::Int(day_number(query.from))),
            param(Bind::Int(day_number(query.to)))
        );
        // The smaller table answers whatever needs neither key nor backend.
        let narrow = query.key.is_none()
            && !query
                .group_by
                .iter()
                .any(|d| matches!(d, Dimension::Key | Dimension::Backend));
        (if narrow { DAILY_BY_MODEL } else { DAILY }, range)
    };
    let mut filters = vec![range];
    for (column, value) in [
        ("tenant", &query.tenant),
        ("key_id", &query.key),
        ("model", &query.model),
    ] {
        if let Some(value) = value {
            filters.push(format!("{column} = {}", param(Bind::Text(value.clone()))));
        }
    }
    let mut sql = format!(
        "SELECT {} FROM {} WHERE {}",
        columns.join(", "),
        table.name,
        filters.join(" AND ")
    );
    if !query.group_by.is_empty() {
        let groups: Vec<String> = (0..query.group_by.len()).map(|i| format!("g{i}")).collect();
        sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
    }
    (sql, binds)
}

/// Stored bucket values as reports show them: days `YYYY-MM-DD`, hours `YYYY-MM-DDTHH:00Z`.
fn present(dimension: &Dimension, bucket: i64) -> String {
    match dimension {
        Dimension::Hour => chrono::DateTime::from_timestamp_millis(bucket).map_or_else(
            || bucket.to_string(),
            |t| t.format("%Y-%m-%dT%H:00Z").to_string(),
        ),
        _ => day_text(bucket),
    }
}

impl Store {
    /// Answers a usage query from the rollups. `with_tags` adds the groups' tenant tags.
    pub async fn usage(&self, query: &UsageQuery, with_tags: bool) -> anyhow::Result<UsageReport> {
        query.validate().map_err(anyhow::Error::msg)?;
        let postgres = matches!(self.pool, Pool::Postgres(_));
        let (sql, binds) = usage_sql(query, with_tags, postgres);
        macro_rules! fetch {
            ($pool:expr, $sql:expr) => {{
                let mut q = sqlx::query($sql);
                for bind in binds {
                    q = match bind {
                        Bind::Int(v) => q.bind(v),
                        Bind::Text(v) => q.bind(v),
                    };
                }
                let mut out = Vec::new();
                for row in q.fetch_all($pool).await? {
                    // Columns by position: the groups, the sums, then the tags.
                    let n = query.group_by.len();
                    let mut group = Vec::with_capacity(n);
                    for (i, dimension) in query.group_by.iter().enumerate() {
                        group.push(match dimension {
                            Dimension::Day | Dimension::Hour => row
                                .try_get::<Option<i64>, _>(i)?
                                .map(|bucket| present(dimension, bucket)),
                            _ => row.try_get::<Option<String>, _>(i)?,
                        });
                    }
                    let mut values = [0i64; 6];
                    for (j, value) in values.iter_mut().enumerate() {
                        *value = row.try_get(n + j)?;
                    }
                    let tags = if with_tags {
                        row.try_get(n + SUM_COLUMNS.len())?
                    } else {
                        None
                    };
                    out.push(UsageRow {
                        group,
                        sums: Sums::from_values(values),
                        tags,
                    });
                }
                out
            }};
        }
        let mut rows = match &self.pool {
            Pool::Sqlite(pool) => {
                let sql = sqlite_sql(&sql);
                fetch!(pool, &sql)
            }
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // Reports hash tens of thousands of groups: keep that in memory, not on disk.
                sqlx::query("SET LOCAL work_mem = '64MB'")
                    .execute(&mut *tx)
                    .await?;
                let rows = fetch!(&mut *tx, &sql);
                tx.commit().await?;
                rows
            }
        };
        if query.group_by.is_empty() {
            rows.retain(|r| r.sums.requests > 0);
        }
        rows.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(UsageReport::new(query.group_by.clone(), rows))
    }
}
