//! The ledger: SQLite and Postgres receive the same correct rows, shutdown flushes, `tollgate
//! usage` reports them, and rows survive a database that is down at shutdown.

use serde_json::json;

use crate::harness::gateway::{drop_postgres, fresh_postgres};
use crate::harness::{policy, Gateway, MockUpstream};

async fn traffic(gw: &Gateway, key: &str, n: usize) {
    for i in 0..n {
        let stream = i % 2 == 1;
        let body = json!({"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": format!("request number {i}")}]});
        let r = gw.chat(key, &body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
}

#[tokio::test]
async fn postgres_and_sqlite_ledgers_agree() {
    let mock = MockUpstream::start("alpha").await;
    let (pg_url, pg_name) = fresh_postgres().await;
    let mut on_pg = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), Some(pg_url)).await;
    let mut on_sqlite = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    for gw in [&on_pg, &on_sqlite] {
        let key = gw.create_key("acme").await;
        traffic(gw, &key, 6).await;
    }
    on_pg.stop();
    on_sqlite.stop();
    let strip = |mut rows: Vec<tollgate_billing::ledger::LedgerRow>| {
        rows.sort_by_key(|r| r.counted_prompt_tokens * 10 + r.stream as i64);
        rows.into_iter()
            .map(|r| {
                (
                    r.model,
                    r.backend,
                    r.stream,
                    r.status,
                    r.outcome,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.usage_source,
                    r.cost_micros,
                )
            })
            .collect::<Vec<_>>()
    };
    let pg_rows = on_pg.ledger("acme", 6).await;
    let sqlite_rows = on_sqlite.ledger("acme", 6).await;
    assert!(pg_rows.iter().all(|r| r.usage_source == "provider"
        && r.cost_micros > 0
        && r.key_id.starts_with("key_")));
    assert_eq!(strip(pg_rows), strip(sqlite_rows));
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn shutdown_flushes_and_usage_reports() {
    let mock = MockUpstream::start("alpha").await;
    // A flush interval far beyond the test: only the shutdown flush can write these rows.
    let yaml = policy(&[("alpha", mock.base_url())], "");
    let mut gw = Gateway::start(&yaml, None).await;
    let text = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("flush_interval_ms: 50", "flush_interval_ms: 600000");
    std::fs::write(&gw.config, text).unwrap();
    gw.restart().await;
    let key = gw.create_key("acme").await;
    traffic(&gw, &key, 4).await;
    let store = gw.store().await;
    assert_eq!(
        store.ledger_rows("acme").await.unwrap().len(),
        0,
        "rows are batched, not written per request"
    );
    gw.stop();
    let rows = store.ledger_rows("acme").await.unwrap();
    assert_eq!(rows.len(), 4);
    let total: i64 = rows.iter().map(|r| r.cost_micros).sum();

    let usage = |from: &str, to: &str| -> serde_json::Value {
        let out = gw.cli(&[
            "usage", "--tenant", "acme", "--from", from, "--to", to, "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let report = usage("2020-01-01", "2999-12-31");
    assert_eq!(report["totals"]["requests"], 4, "{report}");
    assert_eq!(report["totals"]["cost_micros"], total, "{report}");
    let later = usage("2999-01-01", "2999-01-02");
    assert_eq!(later["totals"]["requests"], 0);
}

#[tokio::test]
async fn rows_survive_a_database_that_is_down_at_shutdown() {
    let mock = MockUpstream::start("alpha").await;
    let (pg_url, pg_name) = fresh_postgres().await;
    let mut gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), Some(pg_url)).await;
    let text = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("flush_interval_ms: 50", "flush_interval_ms: 600000");
    std::fs::write(&gw.config, text).unwrap();
    gw.restart().await;
    let key = gw.create_key("acme").await;
    traffic(&gw, &key, 3).await;
    // The database disappears before the shutdown flush.
    drop_postgres(&pg_name).await;
    gw.stop();
    let spool = std::fs::read_to_string(gw.dir.path().join("spool.jsonl")).expect("rows spooled");
    assert_eq!(spool.lines().count(), 3);
    // The database comes back (empty); the next start replays the spool exactly once.
    let admin = std::env::var("TOLLGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::PgPool::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {pg_name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    gw.restart().await;
    gw.restart().await;
    let rows = gw.ledger("acme", 3).await;
    assert!(rows.iter().all(|r| r.outcome == "ok"));
    assert!(!gw.dir.path().join("spool.jsonl").exists());
    gw.stop();
    drop_postgres(&pg_name).await;
}
