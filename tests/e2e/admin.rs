//! The admin API, its CLI mirrors and the dashboard, against the real binary: keys (idempotent
//! creation, rotation with grace, revocation), usage/routing/chargeback reports that equal the
//! ledger, live budgets, the audit log, the OpenAPI document; the rollups and monthly
//! partitions underneath; and the dashboard in headless Chromium.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_billing::ledger::LedgerRow;
use tollgate_billing::report::{Dimension, UsageQuery};
use tollgate_billing::store::Store;
use tollgate_router::Scorer;

use crate::harness::gateway::{drop_postgres, fresh_postgres, ADMIN_TOKEN};
use crate::harness::{Gateway, MockUpstream};

const EASY: &str = "Hi there! What's the capital of France?";
const HARD: &str = "Janet has 3 times as many marbles as Tom. Tom gives away 40% of his marbles and then buys 12 more. \
    If Janet now has 5 times as many marbles as Tom and together they have 144, how many marbles did Tom have at first? \
    Calculate the answer step by step, and explain each step.";

fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

async fn admin_policy() -> (String, Vec<std::sync::Arc<MockUpstream>>) {
    let scorer = Scorer::shipped();
    let threshold = (scorer.score(&chat("auto", EASY)) + scorer.score(&chat("auto", HARD))) / 2.0;
    let cheap = MockUpstream::start("cheap").await;
    let premium = MockUpstream::start("premium").await;
    let yaml = format!(
        "backends:\n  - {{ name: cheapb, base_url: \"{}\" }}\n  - {{ name: premiumb, base_url: \"{}\" }}\n\
         models:\n  - name: small\n    price: {{ input: 0.6, output: 2.4 }}\n    targets: [{{ backend: cheapb, model: small-up }}]\n\
         \x20 - name: large\n    price: {{ input: 10, output: 30 }}\n    targets: [{{ backend: premiumb, model: large-up }}]\n\
         routes:\n  - {{ name: auto, cheap: small, premium: large, threshold: {threshold} }}\n\
         tenants:\n\
         \x20 - name: acme\n    time_zone: Europe/Paris\n    tags: {{ team: platform, cost_center: cc-42 }}\n\
         \x20   budgets:\n      - {{ limit_usd: 100, period: monthly }}\n      - {{ limit_tokens: 1000000, period: daily, model: large }}\n\
         \x20 - name: beta\n    time_zone: America/New_York\n    tags: {{ team: research }}\n\
         \x20   budgets:\n      - {{ limit_usd: 0.5, period: daily }}\n",
        cheap.base_url(),
        premium.base_url()
    );
    (yaml, vec![cheap, premium])
}

/// acme: 3 easy + 2 hard routed requests and 1 direct to `large`; beta: 2 easy routed.
async fn traffic(gw: &Gateway, acme: &str, beta: &str) {
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(gw.chat(acme, &chat("auto", EASY)).await);
    }
    for _ in 0..2 {
        sent.push(gw.chat(acme, &chat("auto", HARD)).await);
    }
    sent.push(gw.chat(acme, &chat("large", EASY)).await);
    for _ in 0..2 {
        sent.push(gw.chat(beta, &chat("auto", EASY)).await);
    }
    for r in sent {
        assert_eq!(r.status(), 200);
    }
}

fn range() -> (String, String) {
    let today = chrono::Utc::now().date_naive();
    (
        (today - chrono::Days::new(2)).to_string(),
        (today + chrono::Days::new(2)).to_string(),
    )
}

fn micros_of_usd(text: &str) -> i64 {
    let (whole, frac) = text.split_once('.').unwrap();
    whole.parse::<i64>().unwrap() * 1_000_000 + frac.parse::<i64>().unwrap()
}

/// A key made through the admin API, once the data plane accepts it.
async fn api_key(gw: &Gateway, tenant: &str) -> String {
    let (status, body) = gw
        .admin_post("/admin/keys", json!({"tenant": tenant}))
        .await;
    assert_eq!(status, 201, "{body}");
    let secret = body["secret"].as_str().unwrap().to_string();
    assert_eq!(
        models_status(gw, &secret).await,
        200,
        "a key made through the admin API works on this replica at once"
    );
    secret
}

async fn models_status(gw: &Gateway, secret: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn get_text(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn admin_api_on_sqlite_and_the_dashboard_in_chromium() {
    let (yaml, _mocks) = admin_policy().await;
    let gw = Gateway::start(&yaml, None).await;
    reports_equal_the_ledger(&gw).await;
    dashboard_in_headless_chromium(&gw);
}

#[tokio::test]
async fn admin_api_on_partitioned_postgres() {
    let (yaml, _mocks) = admin_policy().await;
    let (url, name) = fresh_postgres().await;
    let gw = Gateway::start(&yaml, Some(url.clone())).await;
    reports_equal_the_ledger(&gw).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let partitions: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tableoid::regclass::text FROM ledger")
            .fetch_all(&pool)
            .await
            .unwrap();
    let month = chrono::Utc::now().format("ledger_%Y_%m").to_string();
    assert_eq!(
        partitions,
        vec![month],
        "rows land in this month's partition"
    );
    pool.close().await;
    drop(gw);
    drop_postgres(&name).await;
}

async fn reports_equal_the_ledger(gw: &Gateway) {
    // Unauthenticated calls are refused in OpenAI's error shape, and audited.
    let (status, body) = get_text(&format!("{}/admin/tenants", gw.admin_url()), None).await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_admin_token");
    let (status, _) = get_text(&format!("{}/admin/tenants", gw.admin_url()), Some("wrong")).await;
    assert_eq!(status, 401);

    let acme = api_key(gw, "acme").await;
    let beta = api_key(gw, "beta").await;
    traffic(gw, &acme, &beta).await;
    let acme_rows = gw.ledger("acme", 6).await;
    let beta_rows = gw.ledger("beta", 2).await;
    let all: Vec<&LedgerRow> = acme_rows.iter().chain(&beta_rows).collect();
    let total_cost: i64 = all.iter().map(|r| r.cost_micros).sum();
    assert!(total_cost > 0);
    let (from, to) = range();
    let window = format!("from={from}&to={to}");

    // Usage by tenant equals the ledger's sums.
    let (status, usage) = gw
        .admin_get(&format!("/admin/usage?{window}&group_by=tenant"))
        .await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["totals"]["cost_micros"], total_cost);
    assert_eq!(usage["totals"]["requests"], 8);
    for (tenant, rows) in [("acme", &acme_rows), ("beta", &beta_rows)] {
        let row = usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["tenant"] == tenant)
            .unwrap();
        assert_eq!(
            row["cost_micros"],
            rows.iter().map(|r| r.cost_micros).sum::<i64>()
        );
        assert_eq!(
            row["prompt_tokens"],
            rows.iter().map(|r| r.prompt_tokens).sum::<i64>()
        );
        assert_eq!(row["requests"], rows.len());
    }

    // Every grouping adds up to the same totals; tags and tiers come out by name.
    let (_, fine) = gw
        .admin_get(&format!(
            "/admin/usage?{window}&group_by=day,tenant,key,model,backend,tier,tag:team"
        ))
        .await;
    assert_eq!(fine["totals"], usage["totals"]);
    let teams: HashSet<&str> = fine["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["tag:team"].as_str())
        .collect();
    assert_eq!(teams, HashSet::from(["platform", "research"]));
    let by_tier = |tier: &str| -> i64 {
        all.iter()
            .filter(|r| r.routing.as_ref().is_some_and(|x| x.tier == tier))
            .count() as i64
    };
    let tier_requests = |tier: Value| -> i64 {
        fine["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["tier"] == tier)
            .map(|r| r["requests"].as_i64().unwrap())
            .sum()
    };
    assert_eq!(tier_requests(json!("cheap")), by_tier("cheap"));
    assert_eq!(tier_requests(json!("premium")), by_tier("premium"));
    assert_eq!(
        tier_requests(Value::Null),
        1,
        "the direct request has no tier"
    );
    // acme's days are Paris days.
    let paris_days: HashSet<String> = acme_rows
        .iter()
        .map(|r| {
            chrono::DateTime::from_timestamp_millis(r.created_ms)
                .unwrap()
                .with_timezone(&chrono_tz::Europe::Paris)
                .date_naive()
                .to_string()
        })
        .collect();
    let api_days: HashSet<String> = fine["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["tenant"] == "acme")
        .map(|r| r["day"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(api_days, paris_days);

    // Hourly, one tenant: same totals.
    let (status, hourly) = gw
        .admin_get(&format!("/admin/usage?{window}&tenant=beta&group_by=hour"))
        .await;
    assert_eq!(status, 200, "{hourly}");
    assert_eq!(
        hourly["totals"]["cost_micros"],
        beta_rows.iter().map(|r| r.cost_micros).sum::<i64>()
    );
    let (status, bad) = gw.admin_get("/admin/usage?group_by=week").await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["param"], "group_by");
    let (status, _) = gw.admin_get("/admin/usage?from=2026-13-01").await;
    assert_eq!(status, 400);
    let (status, bad) = gw.admin_get("/admin/usage?tennant=acme").await;
    assert_eq!(status, 400, "a misspelt filter is refused, not ignored");
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tennant"));

    // Routing report: savings are premium-equivalent minus cost over routed requests.
    let (_, routing) = gw.admin_get(&format!("/admin/routing?{window}")).await;
    let routed: Vec<&&LedgerRow> = all.iter().filter(|r| r.routing.is_some()).collect();
    assert_eq!(routing["routed_requests"], routed.len());
    assert_eq!(routing["unrouted_requests"], 1);
    let savings: i64 = routed
        .iter()
        .map(|r| r.routing.as_ref().unwrap().premium_equivalent_micros - r.cost_micros)
        .sum();
    assert_eq!(routing["savings_micros"], savings);
    assert!(savings > 0, "easy prompts went cheap");

    // Chargeback CSV: one line per tenant x model x day, summing to the ledger.
    let export = format!("{}/admin/export/chargeback?{window}", gw.admin_url());
    let (status, csv) = get_text(&export, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "day,tenant,model,requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd"
    );
    let mut groups = HashSet::new();
    let mut csv_total = 0;
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        assert!(
            groups.insert((fields[0], fields[1], fields[2])),
            "one line per group"
        );
        csv_total += micros_of_usd(fields[7]);
    }
    assert_eq!(csv_total, total_cost);
    let (status, focus) = get_text(&format!("{export}&format=focus"), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(focus.starts_with("BillingAccountId,BilledCost,BillingCurrency,"));
    assert_eq!(focus.lines().count(), lines.len());
    assert!(
        focus.contains(r#""{""team"":""platform"",""cost_center"":""cc-42""}""#)
            || focus.contains("cc-42")
    );

    // Budgets: live state equals what the ledger says was spent.
    let acme_cost: i64 = acme_rows.iter().map(|r| r.cost_micros).sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    let budgets = loop {
        let (status, budgets) = gw.admin_get("/admin/budgets?tenant=acme").await;
        assert_eq!(status, 200, "{budgets}");
        if budgets["data"][0]["used"] == acme_cost || Instant::now() > deadline {
            break budgets;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let monthly = &budgets["data"][0];
    assert_eq!(monthly["id"], "usd.monthly.k=*.m=*");
    assert_eq!(monthly["used"], acme_cost, "{budgets}");
    assert_eq!(monthly["reserved"], 0);
    assert_eq!(monthly["limit"], 100_000_000);
    assert_eq!(monthly["remaining"], 100_000_000 - acme_cost);
    assert!(monthly["period_end"].as_str().unwrap().contains("+00:00"));
    let large_tokens: i64 = acme_rows
        .iter()
        .filter(|r| r.model == "large" || r.routing.as_ref().is_some_and(|x| x.tier == "premium"))
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    assert_eq!(budgets["data"][1]["unit"], "tokens");
    assert!(budgets["data"][1]["used"].as_i64().unwrap() <= large_tokens);

    // The CLI answers as the API does.
    let cli_usage = gw.cli(&[
        "usage",
        "--from",
        &from,
        "--to",
        &to,
        "--group-by",
        "tenant",
        "--json",
    ]);
    assert!(
        cli_usage.status.success(),
        "{}",
        String::from_utf8_lossy(&cli_usage.stderr)
    );
    let cli_usage: Value = serde_json::from_slice(&cli_usage.stdout).unwrap();
    assert_eq!(cli_usage, usage);
    let cli_csv = gw.cli(&["export", "--from", &from, "--to", &to]);
    assert_eq!(String::from_utf8(cli_csv.stdout).unwrap(), csv);
    let cli_tenants: Value =
        serde_json::from_slice(&gw.cli(&["tenants", "--json"]).stdout).unwrap();
    assert_eq!(cli_tenants, gw.admin_get("/admin/tenants").await.1);
    let table = String::from_utf8(gw.cli(&["usage", "--from", &from, "--to", &to]).stdout).unwrap();
    assert!(
        table.lines().last().unwrap().starts_with("TOTAL"),
        "{table}"
    );

    keys_rotate_and_revoke(gw).await;
    openapi_documents_every_route(gw).await;

    // The audit log has every call, by token fingerprint, never a secret.
    let (status, audit) = gw.admin_get("/admin/audit?limit=1000").await;
    assert_eq!(status, 200);
    let entries = audit["data"].as_array().unwrap();
    let text = audit.to_string();
    assert!(!text.contains(ADMIN_TOKEN) && !text.contains(&acme) && !text.contains("tg-"));
    assert!(entries
        .iter()
        .any(|e| e["actor"] == "anonymous" && e["status"] == 401));
    let creates: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "POST /admin/keys" && e["status"] == 201)
        .collect();
    assert!(creates.len() >= 2);
    assert!(creates
        .iter()
        .all(|e| e["actor"].as_str().unwrap().starts_with("admin-token:")));
    assert!(entries
        .iter()
        .any(|e| e["action"] == "POST /admin/keys/{id}/rotate"
            && e["target"].as_str().unwrap().starts_with("key_")));
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "keys rotate"
                && e["actor"].as_str().unwrap().starts_with("cli:")),
        "key changes from the CLI are audited too"
    );
}

async fn keys_rotate_and_revoke(gw: &Gateway) {
    // Idempotent creation: the retry returns the same key, without a secret.
    let create = json!({"tenant": "acme", "name": "ci", "idempotency_key": "deploy-42"});
    let (status, first) = gw.admin_post("/admin/keys", create.clone()).await;
    assert_eq!(status, 201, "{first}");
    let secret = first["secret"].as_str().unwrap().to_string();
    let id = first["key"]["id"].as_str().unwrap().to_string();
    let (status, again) = gw.admin_post("/admin/keys", create).await;
    assert_eq!(status, 200);
    assert_eq!(again["key"]["id"], id.as_str());
    assert_eq!(again["secret"], Value::Null);
    assert_eq!(again["replayed"], true);
    let (status, clash) = gw
        .admin_post(
            "/admin/keys",
            json!({"tenant": "beta", "idempotency_key": "deploy-42"}),
        )
        .await;
    assert_eq!(status, 409, "{clash}");
    let (status, unknown) = gw
        .admin_post("/admin/keys", json!({"tenant": "nobody"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(unknown["error"]["param"], "tenant");
    let (status, _) = gw
        .admin_post("/admin/keys", json!({"tenant": "acme", "colour": 1}))
        .await;
    assert_eq!(status, 400, "unknown fields are refused");

    // Listing never shows a secret.
    let (_, list) = gw.admin_get("/admin/keys?tenant=acme").await;
    assert!(!list.to_string().contains(&secret));
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == id.as_str()));

    // Rotation: same id, both secrets work during the grace period, then only the new one.
    let rotate = json!({"grace_seconds": 2, "idempotency_key": "rotate-1"});
    let (status, rotated) = gw
        .admin_post(&format!("/admin/keys/{id}/rotate"), rotate.clone())
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["key"]["id"], id.as_str());
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    assert_eq!(models_status(gw, &new_secret).await, 200);
    assert_eq!(models_status(gw, &secret).await, 200, "old secret in grace");
    let (_, replay) = gw
        .admin_post(&format!("/admin/keys/{id}/rotate"), rotate)
        .await;
    assert_eq!(replay["replayed"], true, "{replay}");
    assert_eq!(
        models_status(gw, &new_secret).await,
        200,
        "a replay rotates nothing"
    );
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(models_status(gw, &secret).await, 401, "grace over");
    assert_eq!(models_status(gw, &new_secret).await, 200);

    // The CLI rotates too (no grace), then revocation stops the key everywhere.
    let out = gw.cli(&["keys", "rotate", &id, "--grace-seconds", "0", "--json"]);
    assert!(out.status.success());
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cli_secret = cli["secret"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while models_status(gw, &cli_secret).await != 200 {
        assert!(
            Instant::now() < deadline,
            "rotated key picked up by the key refresh"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(models_status(gw, &new_secret).await, 401, "no grace asked");
    let (status, revoked) = gw
        .admin_post(&format!("/admin/keys/{id}/revoke"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(models_status(gw, &cli_secret).await, 401);
    let (status, gone) = gw
        .admin_post(&format!("/admin/keys/{id}/rotate"), json!({}))
        .await;
    assert_eq!(status, 409, "{gone}");
    let (status, _) = gw.admin_get("/admin/keys/key_nope").await;
    assert_eq!(status, 404);
}

async fn openapi_documents_every_route(gw: &Gateway) {
    let (status, text) = get_text(&format!("{}/admin/openapi.json", gw.admin_url()), None).await;
    assert_eq!(status, 200, "the document needs no token");
    let doc: Value = serde_json::from_str(&text).unwrap();
    // A valid OpenAPI 3.1 document, by the reference validator.
    let mut check = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys; from openapi_spec_validator import validate; validate(json.load(sys.stdin))",
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "openapi.json is not valid OpenAPI: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(paths.len(), 12);
    // Each documented GET answers (no route is documented but missing).
    for (path, item) in doc["paths"].as_object().unwrap() {
        if item.get("get").is_none() {
            continue;
        }
        let concrete = path.replace("{name}", "acme").replace("{id}", "key_nope");
        let (status, body) = gw.admin_get(&concrete).await;
        assert!(
            status == 200 || body["error"]["code"] == "not_found",
            "{path}: {status} {body}"
        );
        assert_ne!(body["error"]["code"], "unknown_url", "{path}");
    }
    let (status, body) = gw.admin_get("/admin/nothing-here").await;
    assert_eq!(status, 404, "{body}");
}

fn dashboard_in_headless_chromium(gw: &Gateway) {
    let (from, to) = range();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .arg(root.join("tests/browser/dashboard_test.py"))
        .args(["--url", &gw.admin_url(), "--token", ADMIN_TOKEN])
        .args(["--from", &from, "--to", &to])
        .arg("--screenshot")
        .arg(root.join("docs/dashboard.png"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "dashboard test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rollups never count a row twice, whatever the retries; on Postgres, retention drops whole
/// monthly partitions and the rollups keep the history.
#[tokio::test]
async fn rollups_survive_retries_and_retention_drops_partitions() {
    let (url, name) = fresh_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("t.db").display());
    for url in [sqlite.as_str(), url.as_str()] {
        let store = Store::open(url).await.unwrap();
        let old_ms = chrono::DateTime::parse_from_rfc3339("2023-03-10T12:00:00Z")
            .unwrap()
            .timestamp_millis();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let rows: Vec<LedgerRow> = [("old", old_ms, 700), ("new", now_ms, 300)]
            .iter()
            .map(|(id, at, cost)| sample_row(id, *at, *cost))
            .collect();
        if url.starts_with("postgres") {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query("SELECT tollgate_ledger_partition('2023-03-01')")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        store.insert_ledger_rows(&rows).await.unwrap();
        store.insert_ledger_rows(&rows).await.unwrap(); // a retried batch
        let query = UsageQuery {
            from: chrono::NaiveDate::from_ymd_opt(2023, 1, 1).unwrap(),
            to: chrono::Utc::now().date_naive() + chrono::Days::new(1),
            tenant: None,
            key: None,
            model: None,
            group_by: vec![Dimension::Day],
            hour_zone: chrono_tz::UTC,
        };
        let report = store.usage(&query, false).await.unwrap();
        assert_eq!(report.totals.cost_micros, 1_000, "{url}");
        assert_eq!(report.totals.requests, 2);
        let days: BTreeMap<_, _> = report
            .rows
            .iter()
            .map(|r| (r.group[0].clone().unwrap(), r.sums.cost_micros))
            .collect();
        assert_eq!(days["2023-03-10"], 700);

        let dropped = store.maintain_partitions(Some(12)).await.unwrap();
        if url.starts_with("postgres") {
            assert_eq!(dropped, vec!["ledger_2023_03".to_string()]);
            assert_eq!(store.ledger_rows("acme").await.unwrap().len(), 1);
            let after = store.usage(&query, false).await.unwrap();
            assert_eq!(after.totals.cost_micros, 1_000, "rollups keep the history");
            // Partitions ahead exist, so next month's rows have a home.
            let next = sample_row("next", now_ms + 31 * 86_400_000, 1);
            store.insert_ledger_rows(&[next]).await.unwrap();
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let default_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_default")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(default_rows, 0);
            pool.close().await;
        } else {
            assert!(dropped.is_empty(), "SQLite has no partitions");
        }
        store.close().await;
    }
    drop_postgres(&name).await;
}

fn sample_row(id: &str, created_ms: i64, cost: i64) -> LedgerRow {
    LedgerRow {
        request_id: id.into(),
        created_ms,
        tenant: "acme".into(),
        key_id: "key_1".into(),
        endpoint: "chat.completions".into(),
        model: "small".into(),
        backend: Some("cheapb".into()),
        upstream_model: Some("small-up".into()),
        stream: false,
        status: 200,
        outcome: "ok".into(),
        attempts: 1,
        prompt_tokens: 10,
        cached_tokens: 0,
        completion_tokens: 5,
        counted_prompt_tokens: 10,
        counted_completion_tokens: 5,
        provider_prompt_tokens: Some(10),
        provider_cached_tokens: None,
        provider_completion_tokens: Some(5),
        usage_source: "provider".into(),
        cost_micros: cost,
        latency_ms: 3,
        ttft_ms: None,
        tags: Some(r#"{"team":"platform"}"#.into()),
        routing: None,
        speculation: None,
        time_zone: Some("UTC".into()),
    }
}
