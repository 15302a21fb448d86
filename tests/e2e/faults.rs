//! Faults under load: the database, Redis, the provider or the gateway itself fails while
//! clients keep sending, and the ledger must still hold exactly one row per request, budgets
//! must hold, and the process must stay up (or come back) without losing what it owed.
//! Every test saves its numbers; together they are rendered into `bench/RELIABILITY.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tollgate_billing::ledger::LedgerRow;
use tollgate_billing::store::Store;

use crate::harness::fault_upstream::FaultUpstream;
use crate::harness::gateway::{drop_postgres, fresh_postgres};
use crate::harness::load::{
    delivered_text, ids, o200k, send, sse_events, Load, MakeReq, Outcome, Reconciled, Req, Tally,
};
use crate::harness::process::{
    flush_interval, health, metric, metrics, set_config_line, signal, wait_exit, wait_health, Exit,
    LedgerHealth, Respawned, RssSampler,
};
use crate::harness::report::Run;
use crate::harness::stores::{execute, PgServer, RedisServer};
use crate::harness::{policy, Gateway, MockUpstream};

// ---- helpers

/// A small chat request for `gpt-test`.
fn chat(n: u64, stream: bool) -> Value {
    json!({"model": "gpt-test", "stream": stream,
           "messages": [{"role": "user", "content": format!("fault test request {n}")}]})
}

/// Mixed streamed / whole requests for one key.
fn mixed(key: &str, tag: &str) -> MakeReq {
    let (key, tag) = (key.to_string(), tag.to_string());
    Arc::new(move |worker, seq| Req::json(&key, &tag, chat(seq, (worker as u64 + seq) % 2 == 1)))
}

async fn rows_of(database_url: &str, tenant: &str) -> Vec<LedgerRow> {
    let store = Store::open(database_url).await.unwrap();
    let rows = store.ledger_rows(tenant).await.unwrap();
    store.close().await;
    rows
}

/// Polls the ledger until it holds at least `n` rows for `tenant` (or `timeout` passes);
/// returns what it holds then.
async fn wait_rows(
    database_url: &str,
    tenant: &str,
    n: usize,
    timeout: Duration,
) -> Vec<LedgerRow> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = rows_of(database_url, tenant).await;
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spend(rows: &[LedgerRow]) -> i64 {
    rows.iter().map(|r| r.cost_micros).sum()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The tenant's first budget as `/admin/budgets` reports it, once nothing is reserved and
/// (when given) `used` is the expected spend — settles retried after an outage land late; the
/// last answer on timeout.
async fn settled_budget(gw: &Gateway, tenant: &str, used: Option<i64>, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, body) = gw
            .admin_get(&format!("/admin/budgets?tenant={tenant}"))
            .await;
        let budget = body["data"][0].clone();
        let settled =
            budget["reserved"] == json!(0) && used.is_none_or(|used| budget["used"] == json!(used));
        if settled || Instant::now() > deadline {
            return budget;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One streamed request, read to its end; `first` is bumped when its first content arrives.
struct StreamResult {
    status: u16,
    request_id: Option<String>,
    events: Vec<String>,
    /// The connection ended with an error instead of a clean end of body.
    broken: bool,
}

fn spawn_stream(
    client: &reqwest::Client,
    url: String,
    key: String,
    body: Value,
    first: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<StreamResult> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut result = StreamResult {
            status: 0,
            request_id: None,
            events: Vec::new(),
            broken: false,
        };
        let Ok(response) = client.post(url).bearer_auth(key).json(&body).send().await else {
            result.broken = true;
            return result;
        };
        result.status = response.status().as_u16();
        result.request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut text = String::new();
        let mut counted = false;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => {
                    result.broken = true;
                    break;
                }
            }
            if !counted && text.contains("\"content\"") {
                counted = true;
                first.fetch_add(1, Ordering::SeqCst);
            }
        }
        if !counted {
            first.fetch_add(1, Ordering::SeqCst);
        }
        result.events = sse_events(&text);
        result
    })
}

/// A policy with one model `m` (1 USD per 1M tokens both ways, o200k) on `mock`, `head` first.
fn budget_policy(mock: &MockUpstream, head: &str, tenants: &str) -> String {
    format!(
        "{head}backends:\n  - {{ name: mock, base_url: \"{}\" }}\nmodels:\n  - name: m\n    tokenizer: o200k_base\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: mock, model: up }}]\ntenants:\n{tenants}",
        mock.base_url()
    )
}

// ---- 1. Postgres goes away for 30 s under load

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_under_load() {
    let mut run = Run::new("postgres_outage_under_load");
    let mut pg = PgServer::start();
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), Some(pg.url())).await;
    let key = gw.create_key("acme").await;
    let rss = RssSampler::start(gw.pid());
    let started = Instant::now();
    let load = Load::start(&gw.url(), 8, Duration::from_millis(20), mixed(&key, "acme"));

    tokio::time::sleep(Duration::from_secs(3)).await;
    let outage = Instant::now();
    let rss_before = rss.peak_between(started, outage);
    let served_before = load.served.load(Ordering::SeqCst);
    pg.stop();
    let mut unreachable_seen = false;
    let mut refusing = false;
    let mut statuses: Vec<String> = Vec::new();
    let mut journal_peak = 0;
    let mut journal_bytes_peak = 0;
    let mut unhealthy = Vec::new();
    while outage.elapsed() < Duration::from_secs(30) {
        match health(&gw.url()).await {
            Some((status, body)) => {
                let h = LedgerHealth::of(&body);
                unreachable_seen |= h.database == "unreachable";
                journal_peak = journal_peak.max(h.journal_rows);
                journal_bytes_peak = journal_bytes_peak.max(h.journal_bytes);
                refusing |= !h.accepting;
                if !statuses.contains(&h.status) {
                    statuses.push(h.status.clone());
                }
                if status != 200 {
                    unhealthy.push(format!("{status} {body}"));
                }
            }
            None => unhealthy.push("no answer".into()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let served_during = load.served.load(Ordering::SeqCst) - served_before;
    // The admin port's gauges say the same as /healthz.
    let during_metrics = metrics(&gw).await.unwrap_or_default();
    pg.resume();
    let recovered = Instant::now();
    // Load goes on for 5 s; meanwhile, how long the backlog takes to reach the database (down
    // to what the live load keeps in flight).
    let mut backlog_written: Option<f64> = None;
    while recovered.elapsed() < Duration::from_secs(5) {
        if let Some((_, body)) = health(&gw.url()).await {
            let h = LedgerHealth::of(&body);
            if backlog_written.is_none() && h.database == "ok" && h.journal_rows <= 200 {
                backlog_written = Some(recovered.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcomes = load.stop().await;
    let drained = wait_health(&gw.url(), Duration::from_secs(60), |h| {
        h.drained() && h.database == "ok"
    })
    .await;
    let drain_secs = backlog_written.unwrap_or(recovered.elapsed().as_secs_f64());
    let after_metrics = metrics(&gw).await.unwrap_or_default();
    let rss_peak = rss.peak_between(outage, Instant::now());

    let rows = rows_of(&gw.database_url, "acme").await;
    let (answered, served) = ids(&outcomes);
    let reconciled = Reconciled::of(&rows, &answered, &served);
    let tally = Tally::of(&outcomes);
    let streamed = outcomes.iter().filter(|o| o.stream).count();
    run.tally(&tally);
    run.ledger(&reconciled);
    run.row.peak_rss_mib = Some(mib(rss_peak));
    run.note(format!(
        "8 clients, mixed streamed/whole ({streamed} streamed); Postgres stopped 30 s: {served_during} requests served during the outage, journal peaked at {journal_peak} rows ({:.1} MiB), /healthz said {statuses:?}; backlog written {drain_secs:.1} s after Postgres returned; RSS {:.0} MiB before, {:.0} MiB peak after",
        journal_bytes_peak as f64 / (1 << 20) as f64,
        mib(rss_before),
        mib(rss_peak)
    ));
    run.check(
        served_during > 0,
        "requests are served while Postgres is down",
    );
    run.check(
        unreachable_seen,
        "/healthz reported the database unreachable during the outage",
    );
    run.check(
        journal_peak > 0,
        "/healthz counted journal rows during the outage",
    );
    run.check(
        unhealthy.is_empty(),
        format!(
            "/healthz answered 200 throughout the outage: {:?}",
            unhealthy.first()
        ),
    );
    run.check(
        !refusing,
        "the gateway kept accepting (the journal never filled)",
    );
    run.check(
        drained.as_ref().is_ok_and(|h| h.lost_rows == 0),
        format!("the journal drained after recovery, nothing lost: {drained:?}"),
    );
    run.check(
        tally.failed.is_empty(),
        format!("every request was served: {:?}", tally.failed),
    );
    run.check(
        reconciled.missing.is_empty(),
        format!(
            "{} requests answered 200 have no row, e.g. {:?}",
            reconciled.missing.len(),
            reconciled.missing.first()
        ),
    );
    run.check(
        reconciled.duplicates == 0,
        format!("{} duplicate rows", reconciled.duplicates),
    );
    run.check(
        reconciled.unseen.is_empty() && rows.len() == tally.sent,
        format!(
            "exactly one row per request: {} rows for {} requests ({} unseen)",
            rows.len(),
            tally.sent,
            reconciled.unseen.len()
        ),
    );
    let gauges = |text: &str| {
        [
            "tollgate_ledger_database_up",
            "tollgate_ledger_journal_rows",
            "tollgate_ledger_rows_lost_total",
        ]
        .map(|name| metric(text, name))
    };
    let (during, after) = (gauges(&during_metrics), gauges(&after_metrics));
    run.check(
        during[0] == Some(0.0) && during[1].is_some_and(|rows| rows > 0.0),
        format!("/metrics during the outage: database_up 0, journal_rows > 0 ({during:?})"),
    );
    run.check(
        after == [Some(1.0), Some(0.0), Some(0.0)],
        format!("/metrics after the drain: database_up 1, journal_rows 0, rows_lost_total 0 ({after:?})"),
    );
    let bound = 3 * rss_before + 100 * 1024;
    run.check(
        rss_peak < bound,
        format!(
            "peak RSS {:.0} MiB < 3 x {:.0} MiB + 100 MiB",
            mib(rss_peak),
            mib(rss_before)
        ),
    );
    drop(gw);
    run.finish();
}

// ---- 2. Rows the database refuses, and requests that must never become such rows

const REFUSE_POISON: &str = r#"
CREATE FUNCTION tollgate_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tenant = 'poison' THEN
        RAISE EXCEPTION 'poison row refused by the test trigger (request %)', NEW.request_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER tollgate_test_refuse BEFORE INSERT ON ledger
    FOR EACH ROW EXECUTE FUNCTION tollgate_test_refuse();
"#;

/// Requests that must be refused with a 400 (and one ledger row), as raw bodies.
fn poison_inputs() -> Vec<(&'static str, String)> {
    let messages = r#"[{"role": "user", "content": "hi"}]"#;
    vec![
        (
            "nul",
            json!({"model": "x\u{0}", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        ),
        (
            "bell",
            json!({"model": "gpt-test\u{7}", "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        ),
        (
            "surrogate",
            format!(r#"{{"model": "\ud800", "messages": {messages}}}"#),
        ),
        (
            "10kb",
            json!({"model": "m".repeat(10_000), "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        ),
    ]
}

fn dead_letters(gw: &Gateway) -> Vec<Value> {
    std::fs::read_to_string(gw.dir.path().join("tollgate-journal/dead-letters.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A name for a hand-written segment that sorts after the journal's own (same digit width).
fn next_segment_name(journal: &std::path::Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(journal)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("segment-") && n.ends_with(".jsonl"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let digits = names
        .last()
        .map(|n| n["segment-".len()..n.len() - ".jsonl".len()].to_string())
        .filter(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
    match digits {
        Some(d) => {
            let next = d.parse::<u128>().unwrap() + 1;
            format!("segment-{next:0width$}.jsonl", width = d.len())
        }
        None => "segment-00000000000000000001.jsonl".to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_rows_do_not_stop_billing() {
    let mut run = Run::new("poison_rows_do_not_stop_billing");
    let (pg_url, pg_name) = fresh_postgres().await;
    let mock = MockUpstream::start("alpha").await;
    let yaml = policy(&[("alpha", mock.base_url())], "") + "  - name: beta\n  - name: poison\n";
    let mut gw = Gateway::start(&yaml, Some(pg_url.clone())).await;
    execute(&pg_url, REFUSE_POISON).await;
    let keys: HashMap<&str, String> = [
        ("acme", gw.create_key("acme").await),
        ("beta", gw.create_key("beta").await),
        ("poison", gw.create_key("poison").await),
    ]
    .into_iter()
    .collect();

    // Every 10th request is the poison tenant's, every 10th (offset) a hostile input.
    let inputs = poison_inputs();
    let make: MakeReq = {
        let keys = keys.clone();
        let inputs = inputs.clone();
        Arc::new(move |worker, seq| {
            let tenant = if (worker + seq as usize) % 2 == 1 {
                "beta"
            } else {
                "acme"
            };
            match seq % 10 {
                0 => Req::json(&keys["poison"], "poison", chat(seq, worker % 2 == 0)),
                5 => {
                    let (kind, body) = &inputs[(seq as usize / 10 + worker) % inputs.len()];
                    Req::raw(&keys[tenant], &format!("{tenant}/{kind}"), body)
                }
                _ => Req::json(&keys[tenant], tenant, chat(seq, seq % 3 == 0)),
            }
        })
    };
    let load = Load::start(&gw.url(), 6, Duration::from_millis(10), make);
    let mut unhealthy = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match health(&gw.url()).await {
            Some((200, _)) => {}
            other => unhealthy.push(format!("{other:?}")),
        }
    }
    let outcomes = load.stop().await;
    let drained = wait_health(&gw.url(), Duration::from_secs(30), |h| h.drained()).await;

    let tally = Tally::of(&outcomes);
    run.tally(&tally);
    let of_tenant = |t: &str| -> Vec<&Outcome> {
        outcomes
            .iter()
            .filter(|o| o.tag == t || o.tag.starts_with(&format!("{t}/")))
            .collect()
    };
    let hostile: Vec<&Outcome> = outcomes.iter().filter(|o| o.tag.contains('/')).collect();
    run.check(
        !hostile.is_empty() && hostile.iter().all(|o| o.status == 400),
        format!(
            "hostile inputs get 400: {:?}",
            hostile
                .iter()
                .filter(|o| o.status != 400)
                .map(|o| (&o.tag, o.status))
                .next()
        ),
    );
    run.check(
        hostile
            .iter()
            .filter(|o| !o.tag.ends_with("/surrogate"))
            .all(|o| o.error_param.as_deref() == Some("model")),
        format!(
            "control characters and oversized models are refused with param \"model\": {:?}",
            hostile
                .iter()
                .filter(
                    |o| !o.tag.ends_with("/surrogate") && o.error_param.as_deref() != Some("model")
                )
                .map(|o| (&o.tag, &o.error_code, &o.error_param))
                .next()
        ),
    );
    run.check(
        unhealthy.is_empty(),
        format!("/healthz stayed 200: {:?}", unhealthy.first()),
    );
    run.check(drained.is_ok(), format!("the journal drained: {drained:?}"));

    let mut ledger_rows = 0;
    for tenant in ["acme", "beta"] {
        let sent = of_tenant(tenant);
        let rows = wait_rows(&pg_url, tenant, sent.len(), Duration::from_secs(10)).await;
        let owned: Vec<Outcome> = sent.iter().map(|o| (*o).clone()).collect();
        let (answered, served) = ids(&owned);
        let reconciled = Reconciled::of(&rows, &answered, &served);
        run.ledger(&reconciled);
        ledger_rows += rows.len();
        run.check(
            rows.len() == sent.len() && reconciled.duplicates == 0 && reconciled.missing.is_empty(),
            format!(
                "{tenant}: one row per request despite the poison rows: {} rows for {} requests, {} missing, {} duplicates",
                rows.len(),
                sent.len(),
                reconciled.missing.len(),
                reconciled.duplicates
            ),
        );
        let rejected: Vec<&LedgerRow> = rows.iter().filter(|r| r.status == 400).collect();
        let hostile_sent = sent.iter().filter(|o| o.tag.contains('/')).count();
        run.check(
            rejected.len() == hostile_sent && rejected.iter().all(|r| r.outcome == "rejected"),
            format!(
                "{tenant}: each hostile input has one `rejected` row ({} of {hostile_sent})",
                rejected.len()
            ),
        );
        run.check(
            rejected
                .iter()
                .all(|r| r.model.len() <= 256 && !r.model.chars().any(char::is_control)),
            format!(
                "{tenant}: rejected rows store the model sanitized: {:?}",
                rejected
                    .iter()
                    .map(|r| &r.model)
                    .find(|m| m.len() > 256 || m.chars().any(char::is_control))
            ),
        );
    }

    let poison_sent = of_tenant("poison");
    let poison_ids: std::collections::HashSet<&str> = poison_sent
        .iter()
        .filter_map(|o| o.request_id.as_deref())
        .collect();
    let letters = dead_letters(&gw);
    let refused: Vec<&Value> = letters
        .iter()
        .filter(|l| l["row"]["tenant"] == "poison")
        .collect();
    let health_now = health(&gw.url()).await.map(|(_, b)| LedgerHealth::of(&b));
    run.note(format!(
        "6 clients, tenants acme and beta, every 10th request from a tenant whose rows a trigger refuses, every 10th a hostile input (NUL, BEL, lone surrogate, 10 KB model); {} refused rows dead-lettered of {} sent",
        refused.len(),
        poison_sent.len()
    ));
    run.check(
        rows_of(&pg_url, "poison").await.is_empty(),
        "the refused tenant has no rows in the database",
    );
    run.check(
        !poison_sent.is_empty()
            && refused.len() == poison_sent.len()
            && refused
                .iter()
                .all(|l| poison_ids.contains(l["row"]["request_id"].as_str().unwrap_or_default())),
        format!(
            "every refused row is in dead-letters.jsonl ({} of {})",
            refused.len(),
            poison_sent.len()
        ),
    );
    run.check(
        refused.iter().all(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("refused by the test trigger"))
        }),
        format!(
            "dead letters carry the database's error: {:?}",
            refused.first().map(|l| &l["error"])
        ),
    );
    run.check(
        health_now
            .as_ref()
            .is_some_and(|h| h.dead_letters == letters.len() as i64),
        format!(
            "/healthz dead_letters counts them: {health_now:?} vs {} lines",
            letters.len()
        ),
    );

    // The gateway restarts with dead letters on disk.
    gw.restart().await;
    run.check(
        health(&gw.url()).await.is_some_and(|(s, _)| s == 200),
        "restarts healthy with dead letters on disk",
    );

    // A journal segment written by hand before a start: a valid row, a refused one, garbage.
    gw.stop();
    let journal = gw.dir.path().join("tollgate-journal");
    std::fs::create_dir_all(&journal).unwrap();
    let template = rows_of(&pg_url, "acme").await.remove(0);
    let now = chrono::Utc::now().timestamp_millis();
    let valid = LedgerRow {
        request_id: format!("handmade-valid-{now}"),
        created_ms: now,
        ..template.clone()
    };
    let refused_row = LedgerRow {
        request_id: format!("handmade-poison-{now}"),
        created_ms: now,
        tenant: "poison".into(),
        ..template.clone()
    };
    let garbage = "{\"request_id\": \"handmade-garbage\", this is not json";
    let segment = journal.join(next_segment_name(&journal));
    std::fs::write(
        &segment,
        format!(
            "{}\n{}\n{garbage}\n",
            serde_json::to_string(&valid).unwrap(),
            serde_json::to_string(&refused_row).unwrap()
        ),
    )
    .unwrap();
    let letters_before = dead_letters(&gw).len();
    gw.restart().await;
    let landed = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows = rows_of(&pg_url, "acme").await;
            let found = rows
                .iter()
                .filter(|r| r.request_id == valid.request_id)
                .count();
            if found > 0 || Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_letters: Vec<Value> = dead_letters(&gw).into_iter().skip(letters_before).collect();
    run.check(
        landed == 1,
        format!("the hand-written valid row landed once ({landed})"),
    );
    run.check(
        new_letters.iter().any(|l| {
            l["row"]["request_id"] == refused_row.request_id.as_str() && l["error"].is_string()
        }),
        format!("the hand-written refused row was dead-lettered: {new_letters:?}"),
    );
    run.check(
        new_letters.iter().any(|l| {
            l["line"]
                .as_str()
                .is_some_and(|t| t.contains("this is not json"))
        }),
        format!("the garbage line was dead-lettered raw: {new_letters:?}"),
    );
    run.check(
        wait_health(&gw.url(), Duration::from_secs(10), |h| h.drained())
            .await
            .is_ok(),
        "the hand-written segment was consumed",
    );
    run.check(
        !gw.log().contains("panicked"),
        "no panic in the gateway log",
    );
    run.row.ledger_rows = ledger_rows;
    gw.stop();
    drop_postgres(&pg_name).await;
    run.finish();
}

// ---- 3. SIGTERM with streams in flight

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_50_streams_in_flight() {
    let mut run = Run::new("sigterm_with_50_streams_in_flight");
    let redis = RedisServer::start().await;
    let (pg_url, pg_name) = fresh_postgres().await;
    let mock = MockUpstream::start("teller").await;
    // A long answer, slowly: 400 chunks 80 ms apart (32 s), far beyond the drain.
    mock.behaviour.chunk_delay_ms.store(80, Ordering::SeqCst);
    mock.behaviour.stream_chunks.store(400, Ordering::SeqCst);
    let tenant = "drain";
    let yaml = budget_policy(
        &mock,
        &format!("redis_url: {}\n", redis.url()),
        &format!("  - name: {tenant}\n    budgets: [{{ limit_usd: 100, period: monthly, mode: hard }}]\n"),
    );
    let mut gw = Gateway::start(&yaml, Some(pg_url.clone())).await;
    let (drain, timeout) = (1, 5);
    set_config_line(
        &gw,
        "shutdown:",
        &format!("shutdown: {{ drain_secs: {drain}, timeout_secs: {timeout} }}"),
    );
    gw.restart().await;
    let key = gw.create_key(tenant).await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let first = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v1/chat/completions", gw.url());
    let streams: Vec<_> = (0..50)
        .map(|i| {
            let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": format!("story {i}")}]});
            spawn_stream(&client, url.clone(), key.clone(), body, first.clone())
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.load(Ordering::SeqCst) < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.check(
        first.load(Ordering::SeqCst) == 50,
        format!("all 50 streams started ({})", first.load(Ordering::SeqCst)),
    );
    let pid = gw.pid();
    signal(pid, "TERM");
    let exit = wait_exit(pid, Duration::from_secs(drain + timeout + 10)).await;
    let mut results = Vec::new();
    for stream in streams {
        match tokio::time::timeout(Duration::from_secs(10), stream).await {
            Ok(Ok(result)) => results.push(result),
            _ => {
                run.check(false, "a client stream never ended");
            }
        }
    }
    run.check(
        matches!(exit, Some((Exit::Code(0), _))),
        format!("the gateway exited 0 after SIGTERM: {exit:?}"),
    );
    run.check(
        exit.is_some_and(|(_, took)| took <= Duration::from_secs(drain + timeout + 3)),
        format!("... within drain + timeout + 3 s: {exit:?}"),
    );

    let mut cut = 0;
    let mut completed = 0;
    let mut delivered: HashMap<String, String> = HashMap::new();
    for r in &results {
        let last = r.events.last().map(String::as_str);
        let error = r
            .events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find(|v| v.get("error").is_some());
        let shut = error
            .as_ref()
            .is_some_and(|e| e["error"]["code"] == "shutting_down");
        if shut && r.events.len() >= 2 && r.events[r.events.len() - 2].contains("shutting_down") {
            cut += 1;
        } else if error.is_none() && last == Some("[DONE]") {
            completed += 1;
        }
        run.check(
            r.status == 200 && !r.broken && last == Some("[DONE]") && (shut || error.is_none()),
            format!(
                "stream {:?} ends cleanly (status {}, broken {}, last event {:?}, error {:?})",
                r.request_id, r.status, r.broken, last, error
            ),
        );
        if let Some(id) = &r.request_id {
            delivered.insert(id.clone(), delivered_text(&r.events));
        }
    }
    run.check(
        cut + completed == 50,
        format!("{cut} streams cut with `shutting_down` + [DONE], {completed} completed, of 50"),
    );

    let rows = wait_rows(&pg_url, tenant, 50, Duration::from_secs(15)).await;
    let answered: Vec<&str> = delivered.keys().map(String::as_str).collect();
    let reconciled = Reconciled::of(&rows, &answered, &answered);
    run.ledger(&reconciled);
    run.check(
        rows.len() == 50 && reconciled.missing.is_empty() && reconciled.duplicates == 0,
        format!(
            "one row per stream: {} rows, {} missing, {} duplicates",
            rows.len(),
            reconciled.missing.len(),
            reconciled.duplicates
        ),
    );
    let mut misbilled = Vec::new();
    for row in &rows {
        let Some(text) = delivered.get(&row.request_id) else {
            continue;
        };
        let expected = o200k(text);
        let outcome_ok = row.outcome == "shutdown" || row.outcome == "ok";
        if row.completion_tokens != expected || !outcome_ok {
            misbilled.push(format!(
                "{}: outcome {}, billed {} completion tokens, delivered {expected}",
                row.request_id, row.outcome, row.completion_tokens
            ));
        }
    }
    run.check(
        misbilled.is_empty(),
        format!(
            "each stream billed exactly the tokens it delivered ({} off): {:?}",
            misbilled.len(),
            misbilled.first()
        ),
    );
    run.tally(&Tally {
        sent: 50,
        served: results.iter().filter(|r| r.status == 200).count(),
        failed: results
            .iter()
            .filter(|r| r.status != 200)
            .fold(Default::default(), |mut m, r| {
                *m.entry(r.status.to_string()).or_default() += 1;
                m
            }),
    });

    // A new gateway on the same database and Redis: nothing reserved, used == the ledger.
    let respawned = Respawned::start(&gw).await;
    let budget = settled_budget(&gw, tenant, None, Duration::from_secs(15)).await;
    let spent = spend(&rows);
    run.check(
        budget["reserved"] == json!(0) && budget["used"] == json!(spent),
        format!(
            "after restart the budget has reserved 0 and used == ledger spend {spent}: {budget}"
        ),
    );
    run.row.overshoot_micros = Some(0);
    run.note(format!(
        "50 slow streams (400 chunks, 80 ms apart) on a Redis-counted budget, SIGTERM with drain_secs {drain}: exit {exit:?}; {cut} cut with shutting_down, {completed} completed; {} delivered tokens billed",
        rows.iter().map(|r| r.completion_tokens).sum::<i64>()
    ));
    drop(respawned);
    drop(gw);
    drop_postgres(&pg_name).await;
    run.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_short_streams_finish() {
    let mut run = Run::new("sigterm_lets_short_streams_finish");
    let mock = MockUpstream::start("short").await;
    // 20 chunks 100 ms apart: 2 s, well within a 5 s drain.
    mock.behaviour.chunk_delay_ms.store(100, Ordering::SeqCst);
    mock.behaviour.stream_chunks.store(20, Ordering::SeqCst);
    let mut gw = Gateway::start(&policy(&[("short", mock.base_url())], ""), None).await;
    let (drain, timeout) = (5, 5);
    set_config_line(
        &gw,
        "shutdown:",
        &format!("shutdown: {{ drain_secs: {drain}, timeout_secs: {timeout} }}"),
    );
    gw.restart().await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::new();
    let first = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v1/chat/completions", gw.url());
    let streams: Vec<_> = (0..10)
        .map(|i| {
            spawn_stream(
                &client,
                url.clone(),
                key.clone(),
                chat(i, true),
                first.clone(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.load(Ordering::SeqCst) < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = gw.pid();
    signal(pid, "TERM");
    // New requests are no longer accepted while the old ones drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = send(
        &reqwest::Client::new(),
        &url,
        Req::json(&key, "probe", chat(99, false)),
    )
    .await;
    let exit = wait_exit(pid, Duration::from_secs(drain + timeout + 10)).await;
    let mut results = Vec::new();
    for stream in streams {
        if let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(10), stream).await {
            results.push(result);
        }
    }
    let complete: Vec<&StreamResult> = results
        .iter()
        .filter(|r| {
            r.status == 200
                && !r.broken
                && r.events.last().map(String::as_str) == Some("[DONE]")
                && !r.events.iter().any(|e| e.contains("\"error\""))
                && delivered_text(&r.events) == mock.words(20).concat()
        })
        .collect();
    run.check(
        complete.len() == 10,
        format!(
            "all 10 streams completed normally within the drain ({} did)",
            complete.len()
        ),
    );
    run.check(
        probe.status != 200,
        format!(
            "a request after SIGTERM is not served (status {})",
            probe.status
        ),
    );
    run.check(
        matches!(exit, Some((Exit::Code(0), _))),
        format!("exit 0: {exit:?}"),
    );
    run.check(
        exit.is_some_and(|(_, took)| took <= Duration::from_secs(drain + timeout + 3)),
        format!("exit within drain + timeout + 3 s: {exit:?}"),
    );
    let ids: Vec<&str> = results
        .iter()
        .filter_map(|r| r.request_id.as_deref())
        .collect();
    let rows: Vec<LedgerRow> = wait_rows(&gw.database_url, "acme", 10, Duration::from_secs(10))
        .await
        .into_iter()
        .filter(|r| ids.contains(&r.request_id.as_str()))
        .collect();
    let reconciled = Reconciled::of(&rows, &ids, &ids);
    run.ledger(&reconciled);
    run.check(
        rows.len() == 10
            && rows
                .iter()
                .all(|r| r.outcome == "ok" && r.usage_source == "provider"),
        format!(
            "10 rows, billed as complete: {:?}",
            rows.iter()
                .map(|r| (&r.outcome, &r.usage_source))
                .collect::<Vec<_>>()
        ),
    );
    run.tally(&Tally {
        sent: 11,
        served: results.iter().filter(|r| r.status == 200).count()
            + usize::from(probe.status == 200),
        failed: [(probe.status.to_string(), usize::from(probe.status != 200))]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect(),
    });
    run.note(format!(
        "10 streams of 2 s, SIGTERM with drain_secs {drain}: {} completed, exit {exit:?}; a request sent 0.5 s after SIGTERM got status {} ({:?})",
        complete.len(),
        probe.status,
        probe.error_code
    ));
    drop(gw);
    run.finish();
}

// ---- 4. SIGKILL under load, then restart

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_then_restart() {
    let mut run = Run::new("sigkill_under_load_then_restart");
    let (pg_url, pg_name) = fresh_postgres().await;
    let mock = MockUpstream::start("alpha").await;
    let mut gw = Gateway::start(
        &policy(&[("alpha", mock.base_url())], ""),
        Some(pg_url.clone()),
    )
    .await;
    // A longer flush interval than the harness's 50 ms, so the loss window is measurable.
    let text = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("flush_interval_ms: 50", "flush_interval_ms: 200");
    std::fs::write(&gw.config, text).unwrap();
    gw.restart().await;
    let flush = flush_interval(&gw);
    let key = gw.create_key("acme").await;

    // A random moment between 2 and 5 s into the load (the seed is printed for replay).
    let seed = chrono::Utc::now().timestamp_subsec_nanos() as u64;
    let after = Duration::from_millis(2000 + seed % 3000);
    let load = Load::start(&gw.url(), 8, Duration::from_millis(10), mixed(&key, "acme"));
    tokio::time::sleep(after).await;
    let pid = gw.pid();
    let killed_at = Instant::now();
    signal(pid, "KILL");
    load.stop_flag().store(true, Ordering::SeqCst);
    let outcomes = load.stop().await;
    let exit = wait_exit(pid, Duration::from_secs(5)).await;
    run.check(
        matches!(exit, Some((Exit::Signal(9), _))),
        format!("killed by SIGKILL: {exit:?}"),
    );

    let restarted = Instant::now();
    let respawned = Respawned::start(&gw).await;
    let replayed = wait_health(&gw.url(), Duration::from_secs(30), |h| {
        h.drained() && h.database == "ok"
    })
    .await;
    let replay_secs = restarted.elapsed().as_secs_f64();
    run.check(
        replayed.is_ok(),
        format!("the journal replayed after restart: {replayed:?}"),
    );
    let rows = rows_of(&pg_url, "acme").await;
    let (answered, served) = ids(&outcomes);
    let reconciled = Reconciled::of(&rows, &answered, &served);
    let tally = Tally::of(&outcomes);
    run.tally(&tally);
    run.ledger(&reconciled);

    // Rows the journal may lose: requests that completed within the last flush interval (plus
    // 250 ms for the gateway to hand the row to the journal after the client saw the end, and
    // for the fsync itself, on a loaded CI machine).
    let window = flush + Duration::from_millis(250);
    let completed_at: HashMap<&str, Instant> = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .filter_map(|o| Some((o.request_id.as_deref()?, o.finished)))
        .collect();
    let in_window = completed_at
        .values()
        .filter(|t| **t <= killed_at && killed_at.duration_since(**t) <= window)
        .count();
    let missing_outside: Vec<&String> = reconciled
        .missing
        .iter()
        .filter(|id| {
            completed_at
                .get(id.as_str())
                .is_none_or(|t| *t <= killed_at && killed_at.duration_since(*t) > window)
        })
        .collect();
    run.note(format!(
        "8 clients, SIGKILL {:.1} s into the load (seed {seed}), flush interval {} ms: {} answered 200, {} rows after replay ({replay_secs:.1} s), {} missing (bound: {in_window} completed within {} ms of the kill), {} rows for requests in flight at the kill",
        after.as_secs_f64(),
        flush.as_millis(),
        served.len(),
        rows.len(),
        reconciled.missing.len(),
        window.as_millis(),
        reconciled.unseen.len()
    ));
    run.check(
        reconciled.duplicates == 0,
        format!("{} duplicate rows", reconciled.duplicates),
    );
    run.check(
        reconciled.missing.len() <= in_window,
        format!(
            "missing rows ({}) <= requests completed in the last flush interval before the kill ({in_window})",
            reconciled.missing.len()
        ),
    );
    run.check(
        missing_outside.is_empty(),
        format!(
            "no row is missing for a request completed earlier than the window: {:?}",
            missing_outside.first()
        ),
    );
    drop(respawned);
    drop(gw);
    drop_postgres(&pg_name).await;
    run.finish();
}

// ---- 5. Redis dies and comes back empty under budgeted load

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_mid_load() {
    let mut run = Run::new("redis_restart_mid_load");
    let mut redis = RedisServer::start().await;
    let (pg_url, pg_name) = fresh_postgres().await;
    let mock = MockUpstream::start("m").await;
    let limit = 100_000i64; // 0.10 USD, ~190 requests of ~510 micro-dollars
    let tenants = "  - name: closed\n    budgets: [{ limit_usd: 0.10, period: monthly, mode: hard }]\n  - name: open\n    on_redis_down: fail_open\n    budgets: [{ limit_usd: 0.10, period: monthly, mode: hard }]\n";
    let yaml = budget_policy(
        &mock,
        &format!("redis_url: {}\nredis_timeout_ms: 100\n", redis.url()),
        tenants,
    );
    let gw = Gateway::start(&yaml, Some(pg_url.clone())).await;
    let keys = [gw.create_key("closed").await, gw.create_key("open").await];
    let make: MakeReq = Arc::new(move |worker, seq| {
        let (key, tag) = if worker % 2 == 0 {
            (&keys[0], "closed")
        } else {
            (&keys[1], "open")
        };
        let body = json!({"model": "m", "stream": seq % 3 == 0, "max_tokens": 300,
                          "messages": [{"role": "user", "content": " hello".repeat(200)}]});
        Req::json(key, tag, body)
    });
    let load = Load::start(&gw.url(), 4, Duration::from_millis(25), make);

    // Some spend on both tenants first, then Redis dies for 3 s and returns empty.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (load.count("closed", 200) < 20 || load.count("open", 200) < 20)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outage = Instant::now();
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = Instant::now();
    redis.resume().await;
    // Until both budgets bind (or 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while (load.count("closed", 429) < 3 || load.count("open", 429) < 3)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcomes = load.stop().await;
    let tally = Tally::of(&outcomes);
    run.tally(&tally);

    let during = |tag: &str| -> Vec<&Outcome> {
        outcomes
            .iter()
            .filter(|o| {
                o.tag == tag
                    && o.started >= outage + Duration::from_millis(300)
                    && o.finished <= back
            })
            .collect()
    };
    let closed_during = during("closed");
    let open_during = during("open");
    run.check(
        !closed_during.is_empty()
            && closed_during
                .iter()
                .all(|o| o.status == 503 && o.error_code.as_deref() == Some("limits_unavailable")),
        format!(
            "fail_closed tenant gets 503 limits_unavailable while Redis is down: {:?}",
            closed_during
                .iter()
                .map(|o| (o.status, &o.error_code))
                .collect::<Vec<_>>()
        ),
    );
    run.check(
        open_during.iter().any(|o| o.status == 200),
        format!(
            "fail_open tenant is served while Redis is down: {:?}",
            open_during.iter().map(|o| o.status).collect::<Vec<_>>()
        ),
    );
    run.check(
        load_bound(&outcomes, "closed") && load_bound(&outcomes, "open"),
        "the budgets bound (429s) after Redis returned",
    );
    let drained = wait_health(&gw.url(), Duration::from_secs(30), |h| h.drained()).await;
    run.check(drained.is_ok(), format!("the journal drained: {drained:?}"));

    let mut notes = Vec::new();
    for tenant in ["closed", "open"] {
        let sent: Vec<Outcome> = outcomes
            .iter()
            .filter(|o| o.tag == tenant)
            .cloned()
            .collect();
        let rows = wait_rows(&pg_url, tenant, sent.len(), Duration::from_secs(10)).await;
        let (answered, served) = ids(&sent);
        let reconciled = Reconciled::of(&rows, &answered, &served);
        run.ledger(&reconciled);
        run.check(
            rows.len() == sent.len() && reconciled.duplicates == 0 && reconciled.missing.is_empty(),
            format!(
                "{tenant}: one row per request ({} rows, {} requests, {} duplicates, {} missing)",
                rows.len(),
                sent.len(),
                reconciled.duplicates,
                reconciled.missing.len()
            ),
        );
        let spent = spend(&rows);
        let overshoot = (spent - limit).max(0);
        // What was served while Redis was away (started between the kill and its return).
        let by_id: HashMap<&str, i64> = rows
            .iter()
            .map(|r| (r.request_id.as_str(), r.cost_micros))
            .collect();
        let spent_blind: i64 = sent
            .iter()
            .filter(|o| o.status == 200 && o.started >= outage && o.started < back)
            .filter_map(|o| by_id.get(o.request_id.as_deref()?))
            .sum();
        if tenant == "closed" {
            run.row.overshoot_micros = Some(overshoot);
            run.check(
                spent <= limit,
                format!("fail_closed: spent {spent} of {limit} micro-dollars (hard budget)"),
            );
        } else {
            // fail_open allows overshoot only for what it served blind, never a fresh budget.
            run.check(
                overshoot <= spent_blind,
                format!("fail_open: overshoot {overshoot} <= what was served while Redis was down ({spent_blind}); spent {spent} of {limit}"),
            );
        }
        let budget = settled_budget(&gw, tenant, Some(spent), Duration::from_secs(30)).await;
        run.check(
            budget["reserved"] == json!(0) && budget["used"] == json!(spent),
            format!(
                "{tenant}: after recovery /admin/budgets used == ledger spend {spent}: {budget}"
            ),
        );
        notes.push(format!(
            "{tenant}: {} served ({} during the outage, {spent_blind} micro-dollars), spent {spent} of {limit} (overshoot {overshoot})",
            sent.iter().filter(|o| o.status == 200).count(),
            during(tenant).iter().filter(|o| o.status == 200).count()
        ));
    }
    run.note(format!(
        "4 clients on two 0.10 USD hard budgets; Redis SIGKILLed for 3 s and restarted empty; {}",
        notes.join("; ")
    ));
    drop(gw);
    drop(redis);
    drop_postgres(&pg_name).await;
    run.finish();
}

/// The tenant's budget refused something (429) at some point.
fn load_bound(outcomes: &[Outcome], tag: &str) -> bool {
    outcomes.iter().any(|o| o.tag == tag && o.status == 429)
}

// ---- 6. The provider misbehaves

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_faults() {
    let mut run = Run::new("upstream_faults");
    let faulty = FaultUpstream::start().await;
    let good = MockUpstream::start("good").await;
    let model = |name: &str, fault: &str, fallback: bool| {
        let mut targets = format!("{{ backend: faulty, model: {fault} }}");
        if fallback {
            targets.push_str(", { backend: good, model: up }");
        }
        format!("  - name: {name}\n    tokenizer: o200k_base\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{targets}]\n")
    };
    let yaml = format!(
        "backends:\n  - {{ name: faulty, base_url: \"{}\", connect_timeout_ms: 1000, read_timeout_ms: 1000 }}\n  - {{ name: good, base_url: \"{}\" }}\nmodels:\n{}{}{}{}{}{}{}{}{}tenants:\n  - name: acme\n",
        faulty.base_url(),
        good.base_url(),
        model("hang", "hang", false),
        model("hang-fallback", "hang", true),
        model("reset-early", "reset-early", true),
        model("reset", "reset", true),
        model("stall", "stall", false),
        model("bad-sse", "bad-sse", false),
        model("bad-json", "bad-json", false),
        model("slow", "slow", false),
        model("trickle", "trickle", false),
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let ask = |model: &str, stream: bool| {
        Req::json(
            &key,
            model,
            json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    // Streams read in full, for what was delivered.
    let mut delivered: HashMap<String, String> = HashMap::new();
    async fn stream_text(
        client: &reqwest::Client,
        url: &str,
        req: Req,
    ) -> (u16, Option<String>, Vec<String>) {
        let r = client
            .post(url)
            .bearer_auth(&req.key)
            .header("content-type", "application/json")
            .body(req.body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let id = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = r.text().await.unwrap_or_default();
        (status, id, sse_events(&text))
    }

    // Hang, no fallback: bounded by the read timeout, 504.
    let t = Instant::now();
    let o = send(&client, &url, ask("hang", false)).await;
    run.check(
        o.status == 504
            && o.error_code.as_deref() == Some("gateway_timeout")
            && t.elapsed() < Duration::from_secs(5),
        format!(
            "a hanging provider ends in 504 within the read timeout ({} {:?} after {:?})",
            o.status,
            o.error_code,
            t.elapsed()
        ),
    );
    outcomes.push(o);

    // Hang with a second backend: nothing reached the client, so it falls back.
    let o = send(&client, &url, ask("hang-fallback", false)).await;
    run.check(
        o.status == 200,
        format!("a hanging provider falls back ({})", o.status),
    );
    outcomes.push(o);

    // Reset before any byte, then fallback (streamed).
    let (status, id, events) = stream_text(&client, &url, ask("reset-early", true)).await;
    run.check(
        status == 200 && delivered_text(&events) == good.words(5).concat(),
        format!("a reset before any byte falls back ({status}: {events:?})"),
    );
    if let Some(id) = &id {
        delivered.insert(id.clone(), delivered_text(&events));
    }
    outcomes.push(outcome_of("reset-early", status, id));

    // Reset mid-stream: an error event, billed what was delivered, never retried elsewhere.
    let good_before = good.received().len();
    let (status, id, events) = stream_text(&client, &url, ask("reset", true)).await;
    let text = delivered_text(&events);
    run.check(
        status == 200
            && text == (0..3).map(FaultUpstream::word).collect::<String>()
            && events.iter().any(|e| e.contains("\"error\"")),
        format!(
            "a reset mid-stream ends with an error event after the 3 chunks ({status}: {events:?})"
        ),
    );
    run.check(
        good.received().len() == good_before && faulty.received("reset") == 1,
        "no fallback (nor retry) once bytes reached the client",
    );
    if let Some(id) = &id {
        delivered.insert(id.clone(), text);
    }
    outcomes.push(outcome_of("reset", status, id));

    // Stall mid-stream: the read timeout ends it with an error event.
    let t = Instant::now();
    let (status, id, events) = stream_text(&client, &url, ask("stall", true)).await;
    run.check(
        status == 200
            && delivered_text(&events) == (0..2).map(FaultUpstream::word).collect::<String>()
            && events.iter().any(|e| e.contains("\"error\""))
            && t.elapsed() < Duration::from_secs(5),
        format!("a stalled stream ends with an error event within the read timeout ({status}, {:?}: {events:?})", t.elapsed()),
    );
    if let Some(id) = &id {
        delivered.insert(id.clone(), delivered_text(&events));
    }
    outcomes.push(outcome_of("stall", status, id));

    // Malformed SSE: the stream still ends, billed for the content the client could read.
    let (status, id, events) = stream_text(&client, &url, ask("bad-sse", true)).await;
    let readable = delivered_text(&events);
    run.check(
        status == 200
            && readable.contains(&FaultUpstream::word(0))
            && (events.last().map(String::as_str) == Some("[DONE]")
                || events.iter().any(|e| e.contains("\"error\""))),
        format!("a stream with a malformed event ends cleanly ({status}: {events:?})"),
    );
    run.note(format!(
        "malformed SSE: the client got {} events ({})",
        events.len(),
        if events.iter().any(|e| e.contains("broken")) {
            "the malformed one forwarded"
        } else {
            "the malformed one dropped"
        }
    ));
    if let Some(id) = &id {
        delivered.insert(id.clone(), readable);
    }
    outcomes.push(outcome_of("bad-sse", status, id));

    // Malformed JSON in a 200: a clear error, not a truncated body passed on.
    let o = send(&client, &url, ask("bad-json", false)).await;
    run.check(
        o.status >= 500 && o.error_code.is_some(),
        format!(
            "a truncated JSON answer becomes a clear error ({} {:?})",
            o.status, o.error_code
        ),
    );
    let bad_json_id = o.request_id.clone();
    outcomes.push(o);

    // Slow but within the read timeout: served, whole and streamed.
    let o = send(&client, &url, ask("slow", false)).await;
    run.check(
        o.status == 200 && o.complete,
        format!("a slow answer within the timeout is served ({})", o.status),
    );
    outcomes.push(o);
    let (status, id, events) = stream_text(&client, &url, ask("slow", true)).await;
    let text = delivered_text(&events);
    run.check(
        status == 200
            && text == (0..4).map(FaultUpstream::word).collect::<String>()
            && events.last().map(String::as_str) == Some("[DONE]"),
        format!("a slow stream (500 ms gaps) is served in full ({status}: {events:?})"),
    );
    if let Some(id) = &id {
        delivered.insert(id.clone(), text);
    }
    outcomes.push(outcome_of("slow", status, id));

    // A client that leaves mid-stream: the provider sees the connection go.
    let response = client
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"model": "trickle", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let trickle_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = response.bytes_stream();
    let mut got = String::new();
    while !got.contains(&FaultUpstream::word(1)) {
        match body.next().await {
            Some(Ok(bytes)) => got.push_str(&String::from_utf8_lossy(&bytes)),
            _ => break,
        }
    }
    drop(body);
    let left = Instant::now();
    while faulty.disconnects.load(Ordering::SeqCst) == 0 && left.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.check(
        faulty.disconnects.load(Ordering::SeqCst) == 1,
        format!(
            "the provider saw the connection closed after the client left ({:?})",
            left.elapsed()
        ),
    );
    let trickled = faulty.trickled.load(Ordering::SeqCst);
    run.check(
        trickled < 50,
        format!("the provider stopped sending ({trickled} chunks)"),
    );
    outcomes.push(outcome_of("trickle", 200, trickle_id.clone()));

    // The ledger: one row per request, each billed what its client received.
    let rows = wait_rows(
        &gw.database_url,
        "acme",
        outcomes.len(),
        Duration::from_secs(10),
    )
    .await;
    let (answered, served) = ids(&outcomes);
    let reconciled = Reconciled::of(&rows, &answered, &served);
    run.tally(&Tally::of(&outcomes));
    run.ledger(&reconciled);
    run.check(
        rows.len() == outcomes.len() && reconciled.duplicates == 0 && reconciled.missing.is_empty(),
        format!(
            "one row per request: {} rows for {} requests ({} duplicates, {} missing)",
            rows.len(),
            outcomes.len(),
            reconciled.duplicates,
            reconciled.missing.len()
        ),
    );
    let by_id: HashMap<&str, &LedgerRow> =
        rows.iter().map(|r| (r.request_id.as_str(), r)).collect();
    for (id, text) in &delivered {
        if let Some(row) = by_id.get(id.as_str()) {
            run.check(
                row.completion_tokens == o200k(text),
                format!(
                    "{} ({}): billed {} completion tokens for {} delivered",
                    row.model,
                    row.outcome,
                    row.completion_tokens,
                    o200k(text)
                ),
            );
        }
    }
    let hang_row = rows.iter().find(|r| r.model == "hang");
    run.check(
        hang_row.is_some_and(|r| r.outcome == "upstream_error" && r.cost_micros == 0),
        format!("the 504 is not billed: {hang_row:?}"),
    );
    let fallback = rows.iter().find(|r| r.model == "hang-fallback");
    run.check(
        fallback.is_some_and(|r| r.attempts == 2 && r.backend.as_deref() == Some("good")),
        format!(
            "the fallback row names the backend that answered: {:?}",
            fallback.map(|r| (r.attempts, &r.backend))
        ),
    );
    let reset_row = rows.iter().find(|r| r.model == "reset");
    run.check(
        reset_row.is_some_and(|r| r.attempts == 1 && r.outcome == "upstream_closed"),
        format!(
            "the reset stream is one attempt, upstream_closed: {:?}",
            reset_row.map(|r| (r.attempts, &r.outcome))
        ),
    );
    let bad_json_row = bad_json_id.and_then(|id| by_id.get(id.as_str()).copied());
    // The provider did the work and bills it: the row bills the counted prompt and the most
    // output the request could have made, and nothing was retried elsewhere.
    run.check(
        bad_json_row.is_some_and(|r| {
            r.usage_source == "upper_bound"
                && r.status == 502
                && r.completion_tokens > 0
                && r.cost_micros > 0
        }),
        format!(
            "the truncated answer is billed as the provider bills it: {:?}",
            bad_json_row.map(|r| (&r.outcome, &r.usage_source, r.completion_tokens))
        ),
    );
    let trickle_row = trickle_id.and_then(|id| by_id.get(id.as_str()).copied());
    run.check(
        trickle_row.is_some_and(|r| r.outcome == "client_closed"),
        format!(
            "the departed client's row: {:?}",
            trickle_row.map(|r| &r.outcome)
        ),
    );
    run.check(
        health(&gw.url()).await.is_some_and(|(s, _)| s == 200) && !gw.log().contains("panicked"),
        "the gateway stays healthy",
    );
    run.note("hang (504 and fallback), reset before and after the first byte, stall mid-stream, malformed SSE, truncated JSON, slow within the timeout, client leaving mid-stream; read timeout 1 s");
    drop(gw);
    run.finish();
}

fn outcome_of(tag: &str, status: u16, request_id: Option<String>) -> Outcome {
    let now = Instant::now();
    Outcome {
        tag: tag.to_string(),
        stream: true,
        status,
        request_id,
        complete: true,
        error_code: None,
        error_param: None,
        started: now,
        finished: now,
    }
}
