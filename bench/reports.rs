//! Dashboard queries over a large ledger in Postgres.
//!
//! Fills the database `tollgate_bench` (created when missing, kept between runs) with
//! `TOLLGATE_BENCH_ROWS` ledger rows (default 10,000,000) through the real write path
//! (`Store::insert_ledger_rows`: ledger partitions plus hourly and daily rollups in one
//! transaction), then times every query the dashboard and the admin API make, and, as the
//! baseline in the same run, the same question asked of the raw ledger.
//!
//! ```sh
//! cargo bench -p tollgate-billing --bench reports
//! TOLLGATE_BENCH_ROWS=200000 cargo bench -p tollgate-billing --bench reports   # a quick look
//! ```

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tollgate_billing::ledger::{LedgerRow, Routing};
use tollgate_billing::report::{Dimension, UsageQuery};
use tollgate_billing::store::Store;

const TENANTS: usize = 40;
const KEYS_PER_TENANT: usize = 3;
const DAYS: i64 = 180;
const BATCH: usize = 1000;
const ZONES: [&str; 6] = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "America/Los_Angeles",
];
/// Public model, price per million prompt and completion tokens (USD).
const MODELS: [(&str, u64, u64); 5] = [
    ("gpt-4o", 2_500_000, 10_000_000),
    ("gpt-4o-mini", 150_000, 600_000),
    ("claude-sonnet", 3_000_000, 15_000_000),
    ("llama-70b", 600_000, 600_000),
    ("smollm2-135m", 0, 0),
];

/// xorshift64*: deterministic rows, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn cost(model: usize, prompt: i64, completion: i64) -> i64 {
    let (_, p, c) = MODELS[model];
    ((prompt as u64 * p + completion as u64 * c) / 1_000_000) as i64
}

/// Row `i` of `total`, spread evenly over the `DAYS` days before `end_ms`.
fn row(i: u64, total: u64, end_ms: i64) -> LedgerRow {
    let mut rng = Rng(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let span = DAYS * 86_400_000;
    let created_ms = end_ms - span + (i as i128 * span as i128 / total as i128) as i64;
    let tenant = rng.below(TENANTS as u64) as usize;
    let key = rng.below(KEYS_PER_TENANT as u64);
    let prompt = 50 + rng.below(3000) as i64;
    let completion = 10 + rng.below(800) as i64;
    // 30% go through the `auto` route: cheap (gpt-4o-mini) or premium (gpt-4o).
    let routed = rng.below(10) < 3;
    let (model, public, routing) = if routed {
        let premium = rng.below(10) < 3;
        let served = if premium { 0 } else { 1 };
        let routing = Routing {
            route: "auto".into(),
            tier: if premium { "premium" } else { "cheap" }.into(),
            score: 0.5,
            reason: "bench".into(),
            routed_model: MODELS[served].0.into(),
            premium_equivalent_micros: cost(0, prompt, completion),
        };
        (served, "auto".to_string(), Some(routing))
    } else {
        let m = rng.below(MODELS.len() as u64) as usize;
        (m, MODELS[m].0.to_string(), None)
    };
    LedgerRow {
        request_id: format!("bench-{i:010}"),
        created_ms,
        tenant: format!("t{tenant:02}"),
        key_id: format!("key_t{tenant:02}_{key}"),
        endpoint: "chat.completions".into(),
        model: public,
        backend: Some(format!("backend-{}", model % 3)),
        upstream_model: Some(MODELS[model].0.into()),
        stream: rng.below(2) == 0,
        status: 200,
        outcome: "ok".into(),
        attempts: 1,
        prompt_tokens: prompt,
        cached_tokens: 0,
        completion_tokens: completion,
        counted_prompt_tokens: prompt,
        counted_completion_tokens: completion,
        provider_prompt_tokens: Some(prompt),
        provider_cached_tokens: None,
        provider_completion_tokens: Some(completion),
        usage_source: "provider".into(),
        cost_micros: cost(model, prompt, completion),
        latency_ms: 200 + rng.below(3000) as i64,
        ttft_ms: None,
        tags: Some(format!(
            r#"{{"team":"team-{}","cost_center":"cc-{}"}}"#,
            tenant % 8,
            tenant % 5
        )),
        routing,
        speculation: None,
        time_zone: Some(ZONES[tenant % ZONES.len()].into()),
    }
}

async fn fill(store: &Store, pool: &sqlx::PgPool, total: u64) -> anyhow::Result<i64> {
    let have: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger WHERE request_id LIKE 'bench-%'")
            .fetch_one(pool)
            .await?;
    // The rows' times are fixed by the first fill, so that reruns add to the same history.
    let end_ms: i64 =
        match sqlx::query_scalar::<_, String>("SELECT value FROM bench_meta WHERE name = 'end_ms'")
            .fetch_optional(pool)
            .await?
        {
            Some(v) => v.parse()?,
            None => {
                let now = chrono::Utc::now().timestamp_millis();
                sqlx::query("INSERT INTO bench_meta VALUES ('end_ms', $1)")
                    .bind(now.to_string())
                    .execute(pool)
                    .await?;
                now
            }
        };
    if have as u64 >= total {
        println!("ledger already holds {have} bench rows");
        return Ok(end_ms);
    }
    // Months of the whole range need partitions (the gateway keeps only the current ones ahead).
    sqlx::query(
        "SELECT tollgate_ledger_partition((date_trunc('month', now()) - m * interval '1 month')::date) \
         FROM generate_series(0, 7) AS m",
    )
    .execute(pool)
    .await?;
    println!("writing rows {have}..{total} through Store::insert_ledger_rows");
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut i = have as u64;
    while i < total {
        let end = (i + BATCH as u64).min(total);
        let rows: Vec<LedgerRow> = (i..end).map(|j| row(j, total, end_ms)).collect();
        store.insert_ledger_rows(&rows).await?;
        i = end;
        if last_report.elapsed() > Duration::from_secs(30) {
            let rate = (i - have as u64) as f64 / started.elapsed().as_secs_f64();
            println!("  {i} rows ({rate:.0} rows/s)");
            last_report = Instant::now();
        }
    }
    let rate = (total - have as u64) as f64 / started.elapsed().as_secs_f64();
    println!(
        "wrote {} rows in {:.0} s: {rate:.0} rows/s with rollups",
        total - have as u64,
        started.elapsed().as_secs_f64()
    );
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(end_ms)
}

struct Timing {
    p50: f64,
    p95: f64,
    max: f64,
}

async fn time<F, Fut>(runs: usize, mut f: F) -> anyhow::Result<Timing>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    f().await?; // warm-up
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        f().await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Ok(Timing {
        p50: at(0.5),
        p95: at(0.95),
        max: *ms.last().expect("runs > 0"),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: u64 = std::env::var("TOLLGATE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let admin = std::env::var("TOLLGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base = admin
        .rsplit_once('/')
        .expect("a database URL")
        .0
        .to_string();
    let admin_pool = sqlx::PgPool::connect(&admin).await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tollgate_bench')",
    )
    .fetch_one(&admin_pool)
    .await?;
    if !exists {
        sqlx::query("CREATE DATABASE tollgate_bench")
            .execute(&admin_pool)
            .await?;
    }
    admin_pool.close().await;
    let url = format!("{base}/tollgate_bench");
    let store = Store::open(&url).await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let end_ms = fill(&store, &pool, total).await?;

    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger")
        .fetch_one(&pool)
        .await?;
    let hourly: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_hourly")
        .fetch_one(&pool)
        .await?;
    let daily: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_daily")
        .fetch_one(&pool)
        .await?;
    println!("\nledger rows: {rows}; usage_hourly cells: {hourly}; usage_daily cells: {daily}\n");

    let to = chrono::DateTime::from_timestamp_millis(end_ms)
        .expect("valid end")
        .date_naive();
    let days = |n: u64| to - chrono::Days::new(n - 1);
    let query = |from: NaiveDate, tenant: Option<&str>, group_by: &[Dimension]| UsageQuery {
        from,
        to,
        tenant: tenant.map(str::to_string),
        key: None,
        model: None,
        group_by: group_by.to_vec(),
        hour_zone: chrono_tz::UTC,
    };
    use Dimension::*;
    let cases: Vec<(&str, UsageQuery, bool)> = vec![
        (
            "spend by day x tenant, 30 days",
            query(days(30), None, &[Day, Tenant]),
            false,
        ),
        (
            "spend by day x model, 30 days",
            query(days(30), None, &[Day, Model]),
            false,
        ),
        ("top keys, 30 days", query(days(30), None, &[Key]), false),
        (
            "top models, 30 days",
            query(days(30), None, &[Model]),
            false,
        ),
        (
            "routing tiers, 30 days",
            query(days(30), None, &[Tier]),
            false,
        ),
        ("totals, 30 days", query(days(30), None, &[]), false),
        (
            "by tag:team, 30 days",
            query(days(30), None, &[Tag("team".into())]),
            false,
        ),
        (
            "one tenant, day x model, 30 days",
            query(days(30), Some("t07"), &[Day, Model]),
            false,
        ),
        (
            "one tenant, by key, 30 days",
            query(days(30), Some("t07"), &[Key]),
            false,
        ),
        (
            "chargeback day x tenant x model + tags, 30 days",
            query(days(30), None, &[Day, Tenant, Model]),
            true,
        ),
        (
            "one tenant, by hour, 7 days",
            query(days(7), Some("t07"), &[Hour]),
            false,
        ),
        (
            "all tenants, by hour, 2 days",
            query(days(2), None, &[Hour, Tenant]),
            false,
        ),
        (
            "spend by day x tenant, 180 days",
            query(days(180), None, &[Day, Tenant]),
            false,
        ),
        (
            "chargeback, 180 days",
            query(days(180), None, &[Day, Tenant, Model]),
            true,
        ),
    ];
    println!("| query | groups | p50 ms | p95 ms | max ms |");
    println!("|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for (name, q, tags) in &cases {
        let groups = store.usage(q, *tags).await?.rows.len();
        let t = time(15, || async { Ok(store.usage(q, *tags).await?.rows.len()) }).await?;
        worst = worst.max(t.max);
        println!(
            "| {name} | {groups} | {:.1} | {:.1} | {:.1} |",
            t.p50, t.p95, t.max
        );
    }
    println!("\nslowest single run: {worst:.1} ms (target: every query under 200 ms)\n");

    // Baseline: the first question answered from the raw ledger (UTC days).
    let from_ms = end_ms - 30 * 86_400_000;
    let raw = "SELECT tenant, to_char(to_timestamp(created_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, \
               SUM(cost_micros) FROM ledger WHERE created_ms >= $1 AND created_ms <= $2 GROUP BY 1, 2";
    let raw_t = time(3, || async {
        Ok(sqlx::query(raw)
            .bind(from_ms)
            .bind(end_ms)
            .fetch_all(&pool)
            .await?
            .len())
    })
    .await?;
    let rollup_t = time(15, || async {
        Ok(store.usage(&cases[0].1, false).await?.rows.len())
    })
    .await?;
    println!("| spend by day x tenant, 30 days | p50 ms |");
    println!("|---|---|");
    println!("| raw ledger (baseline) | {:.1} |", raw_t.p50);
    println!("| rollups | {:.1} |", rollup_t.p50);
    println!(
        "| ratio raw / rollups | {:.0}x |",
        raw_t.p50 / rollup_t.p50.max(0.001)
    );
    Ok(())
}
