//! The ledger's way to the database: journal, group commits, replay, dead letters, bounds.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

fn options(dir: &std::path::Path, max_bytes: u64, on_full: OnFull) -> WriterOptions {
    WriterOptions {
        journal: JournalOptions {
            dir: dir.join("journal"),
            max_bytes,
            on_full,
            flush_interval: Duration::from_millis(20),
            max_batch: 100,
        },
        legacy_spool: None,
    }
}

async fn sqlite(dir: &std::path::Path) -> Store {
    Store::open(&format!("sqlite://{}", dir.join("ledger.db").display()))
        .await
        .unwrap()
}

/// A writer with a 1 MiB journal under `fail_closed`.
fn writer(store: &Store, dir: &std::path::Path) -> LedgerSender {
    spawn_writer(store.clone(), options(dir, 1 << 20, OnFull::FailClosed)).unwrap()
}

/// The database refuses rows of tenant `poison` (a trigger), as Postgres refuses a NUL.
async fn refuse_poison(store: &Store) {
    store
        .execute_raw(
            "CREATE TRIGGER refuse BEFORE INSERT ON ledger WHEN NEW.tenant = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poison tenant refused'); END",
        )
        .await
        .unwrap();
}

fn row(id: &str, tenant: &str) -> LedgerRow {
    let mut row = test_row(id, 1_795_822_200_000, None, 7);
    row.tenant = tenant.into();
    row
}

fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("segment-")
        })
        .count()
}

#[tokio::test]
async fn rows_reach_the_database_through_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let ledger = writer(&store, dir.path());
    for i in 0..250 {
        ledger.record(row(&format!("r{i}"), "acme"));
    }
    assert!(ledger.flush(Duration::from_secs(10)).await);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 250);
    let stats = ledger.stats();
    assert_eq!(stats.journal_rows.load(Ordering::Relaxed), 0);
    assert_eq!(stats.written_rows.load(Ordering::Relaxed), 250);
    assert_eq!(stats.write_lag_ms(), 0);
    assert!(stats.database_up.load(Ordering::Relaxed));
    // Only the active segment is left.
    assert_eq!(segments(dir.path()), 1);
    // A second process cannot share the journal.
    let second = spawn_writer(store, options(dir.path(), 1 << 20, OnFull::FailClosed));
    assert!(second.err().unwrap().to_string().contains("in use"));
}

#[tokio::test]
async fn a_refused_row_is_dead_lettered_and_never_blocks_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    refuse_poison(&store).await;
    let ledger = writer(&store, dir.path());
    for i in 0..30 {
        let tenant = if i == 10 { "poison" } else { "acme" };
        ledger.record(row(&format!("r{i}"), tenant));
    }
    assert!(ledger.flush(Duration::from_secs(10)).await);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 29);
    assert_eq!(ledger.stats().dead_letters.load(Ordering::Relaxed), 1);
    let dead =
        std::fs::read_to_string(dir.path().join("journal").join(journal::DEAD_LETTERS)).unwrap();
    let entry: serde_json::Value = serde_json::from_str(dead.trim()).unwrap();
    assert_eq!(entry["row"]["request_id"], "r10");
    assert!(entry["error"]
        .as_str()
        .unwrap()
        .contains("poison tenant refused"));
    // Rows after it still flow.
    ledger.record(row("after", "acme"));
    assert!(ledger.flush(Duration::from_secs(10)).await);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 30);

    // Retried while the cause remains: refused again, kept. Once fixed: written, gone.
    let journal = dir.path().join("journal");
    let retried = retry_dead_letters(&store, &journal).await.unwrap();
    assert_eq!(
        retried,
        Retried {
            written: 0,
            refused: 1
        }
    );
    store.execute_raw("DROP TRIGGER refuse").await.unwrap();
    let retried = retry_dead_letters(&store, &journal).await.unwrap();
    assert_eq!(
        retried,
        Retried {
            written: 1,
            refused: 0
        }
    );
    assert_eq!(store.ledger_rows("poison").await.unwrap().len(), 1);
    assert!(!journal.join(journal::DEAD_LETTERS).exists());
}

#[tokio::test]
async fn an_unreachable_database_keeps_rows_on_disk_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    // Writes fail without the data being at fault (a missing table, as with a database that
    // is not there): rows must stay in the journal, not be dead-lettered.
    store
        .execute_raw("ALTER TABLE ledger RENAME TO ledger_away")
        .await
        .unwrap();
    let ledger = writer(&store, dir.path());
    for i in 0..40 {
        ledger.record(row(&format!("r{i}"), "acme"));
    }
    assert!(!ledger.flush(Duration::from_millis(300)).await);
    let stats = ledger.stats();
    assert_eq!(stats.journal_rows.load(Ordering::Relaxed), 40);
    assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 0);
    assert!(!stats.database_up.load(Ordering::Relaxed));
    assert!(stats.write_lag_ms() > 0);
    drop(ledger);
    // "Restart": the lock is held by the old writer's file until it is dropped; a new process
    // would start with the journal as it is on disk.
    store
        .execute_raw("ALTER TABLE ledger_away RENAME TO ledger")
        .await
        .unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("journal"), &dir2.path().join("journal"));
    let ledger = spawn_writer(
        store.clone(),
        options(dir2.path(), 1 << 20, OnFull::FailClosed),
    )
    .unwrap();
    assert_eq!(ledger.stats().journal_rows.load(Ordering::Relaxed), 40);
    assert!(ledger.wait_written(Duration::from_secs(10)).await);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 40);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[tokio::test]
async fn a_full_journal_refuses_new_requests_or_counts_what_it_loses() {
    for on_full in [OnFull::FailClosed, OnFull::FailOpen] {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(dir.path()).await;
        store
            .execute_raw("ALTER TABLE ledger RENAME TO ledger_away")
            .await
            .unwrap();
        let ledger = spawn_writer(store.clone(), options(dir.path(), 1 << 20, on_full)).unwrap();
        let mut big = row("x", "acme");
        big.tags = Some(format!("{{\"note\":\"{}\"}}", "x".repeat(4000)));
        for i in 0..400 {
            big.request_id = format!("r{i}");
            ledger.record(big.clone());
        }
        assert!(ledger.sync(Duration::from_secs(5)).await);
        let stats = ledger.stats();
        let bytes = stats.journal_bytes.load(Ordering::Relaxed);
        match on_full {
            OnFull::FailClosed => {
                assert!(!ledger.accepting(), "full journal must refuse new requests");
                assert_eq!(
                    stats.journal_rows.load(Ordering::Relaxed),
                    400,
                    "rows of admitted requests are kept"
                );
                assert_eq!(stats.lost_rows.load(Ordering::Relaxed), 0);
            }
            OnFull::FailOpen => {
                assert!(ledger.accepting());
                assert!(bytes <= 1 << 20, "{bytes}");
                let lost = stats.lost_rows.load(Ordering::Relaxed);
                assert!(lost > 0);
                assert_eq!(stats.journal_rows.load(Ordering::Relaxed) + lost, 400);
            }
        }
    }
}

#[test]
fn sanitize_replaces_nul_in_every_text() {
    let mut r = row("a\0b", "t\0");
    r.model = "m\0".into();
    r.backend = Some("b\0".into());
    r.sanitize();
    assert_eq!(r.request_id, "a\u{FFFD}b");
    assert_eq!(r.tenant, "t\u{FFFD}");
    assert_eq!(r.model, "m\u{FFFD}");
    assert_eq!(r.backend.as_deref(), Some("b\u{FFFD}"));
}

#[tokio::test]
async fn a_database_that_refuses_every_row_is_an_outage_not_poison() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    store
        .execute_raw(
            "CREATE TRIGGER refuse_all BEFORE INSERT ON ledger \
             BEGIN SELECT RAISE(ABORT, 'read-only for maintenance'); END",
        )
        .await
        .unwrap();
    let ledger = writer(&store, dir.path());
    for i in 0..120 {
        ledger.record(row(&format!("r{i}"), "acme"));
    }
    assert!(!ledger.flush(Duration::from_millis(500)).await);
    let stats = ledger.stats();
    // The first refusals look like poison; then the writer finds that later rows are refused
    // too, stops, and keeps the rest on disk.
    let dead = stats.dead_letters.load(Ordering::Relaxed);
    assert_eq!(dead, (REFUSALS_BEFORE_PROBING - 1) as u64);
    assert_eq!(stats.journal_rows.load(Ordering::Relaxed), 120 - dead);
    assert!(!stats.database_up.load(Ordering::Relaxed));
    // Fixed: the rest flows; the dead letters wait for `retry_dead_letters`.
    store.execute_raw("DROP TRIGGER refuse_all").await.unwrap();
    assert!(ledger.wait_written(Duration::from_secs(10)).await);
    assert_eq!(
        store.ledger_rows("acme").await.unwrap().len() as u64,
        120 - dead
    );
    let retried = retry_dead_letters(&store, &dir.path().join("journal"))
        .await
        .unwrap();
    assert_eq!(retried.written as u64, dead);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 120);
}

#[tokio::test]
async fn a_run_of_poison_rows_is_still_poison_when_later_rows_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    refuse_poison(&store).await;
    let ledger = writer(&store, dir.path());
    for i in 0..60 {
        let tenant = if i < 45 { "poison" } else { "acme" };
        ledger.record(row(&format!("r{i}"), tenant));
    }
    assert!(ledger.flush(Duration::from_secs(10)).await);
    assert_eq!(ledger.stats().dead_letters.load(Ordering::Relaxed), 45);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 15);
}

#[tokio::test]
async fn a_refused_row_stays_in_the_journal_until_the_dead_letters_can_take_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    refuse_poison(&store).await;
    // The dead-letter file cannot be created (a directory is in its way).
    let blocker = dir.path().join("journal").join(journal::DEAD_LETTERS);
    std::fs::create_dir_all(&blocker).unwrap();
    let ledger = writer(&store, dir.path());
    ledger.record(row("a", "acme"));
    ledger.record(row("p", "poison"));
    ledger.record(row("b", "acme"));
    assert!(!ledger.flush(Duration::from_millis(500)).await);
    assert_eq!(ledger.stats().journal_rows.load(Ordering::Relaxed), 2);
    assert_eq!(ledger.stats().dead_letters.load(Ordering::Relaxed), 0);
    std::fs::remove_dir(&blocker).unwrap();
    assert!(ledger.wait_written(Duration::from_secs(10)).await);
    assert_eq!(ledger.stats().dead_letters.load(Ordering::Relaxed), 1);
    assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 2);
}
