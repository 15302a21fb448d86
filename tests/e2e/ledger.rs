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
    let journal = gw.dir.path().join("tollgate-journal");
    let journaled: usize = journal_segments(&journal)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .sum();
    assert_eq!(journaled, 3, "rows kept in the journal");
    // The database comes back (empty); the next start replays the journal exactly once.
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
    let left: usize = journal_segments(&journal)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .sum();
    assert_eq!(left, 0, "replayed rows leave the journal");
    gw.stop();
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn a_spool_from_an_older_version_is_replayed_and_poison_never_stops_a_start() {
    let mock = MockUpstream::start("alpha").await;
    let mut gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    traffic(&gw, &key, 2).await;
    let rows = gw.ledger("acme", 2).await;
    gw.stop();
    // An old spool (rows of another request id), with an unreadable line in it.
    let mut spooled = rows[0].clone();
    spooled.request_id = "spooled-1".into();
    let spool = format!("{}\n{{not json\n", serde_json::to_string(&spooled).unwrap());
    std::fs::write(gw.dir.path().join("spool.jsonl"), spool).unwrap();
    // And a journal segment left by a crash: a row already in the database (replayed, not
    // billed twice), a new row whose text holds a NUL, and a torn last line.
    let mut nul = rows[1].clone();
    nul.request_id = "journal-nul".into();
    nul.model = "gpt-test\u{0}".into();
    let segment = format!(
        "{}\n{}\n{{\"request_id\":\"torn",
        serde_json::to_string(&rows[0]).unwrap(),
        serde_json::to_string(&nul).unwrap()
    );
    let journal = gw.dir.path().join("tollgate-journal");
    std::fs::write(journal.join("segment-00000000000000000001.jsonl"), segment).unwrap();
    gw.restart().await;
    let rows = gw.ledger("acme", 4).await;
    assert!(rows.iter().any(|r| r.request_id == "spooled-1"));
    let cleaned = rows.iter().find(|r| r.request_id == "journal-nul").unwrap();
    assert_eq!(cleaned.model, "gpt-test\u{FFFD}");
    assert!(!gw.dir.path().join("spool.jsonl").exists());
    let dead = std::fs::read_to_string(journal.join("dead-letters.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(
        dead.contains("unreadable journal line") && dead.contains("{not json"),
        "{dead}"
    );
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", gw.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["ledger"]["dead_letters"], 1, "{health}");
    assert_eq!(health["ledger"]["journal_rows"], 0, "{health}");
    // The operator's view of the dead letters (the journal path is relative to the gateway's
    // working directory, as for `serve`).
    let listed = std::process::Command::new(crate::harness::gateway::BIN)
        .arg("--config")
        .arg(&gw.config)
        .args(["ledger", "dead-letters"])
        .current_dir(gw.dir.path())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("1 dead-lettered rows"), "{listed}");
    assert!(listed.contains("unreadable journal line"), "{listed}");
    gw.stop();
}

fn journal_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("segment-")
        })
        .collect()
}
