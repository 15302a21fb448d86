//! Security: failed admin authentications limited before they reach the audit log, audit log
//! retention, made-up model names bounded in reports, tenants kept apart on every surface,
//! tenant-facing errors without backend addresses or provider keys, and no secret in any log or
//! table.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_billing::store::AuditEntry;

use crate::harness::gateway::{free_port, tollgate, ADMIN_TOKEN, ALERT_SECRET, PROVIDER_KEY};
use crate::harness::process::set_config_line;
use crate::harness::{policy, secrets, Gateway, MockUpstream};

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A call on the admin port: status, `retry-after` and body.
async fn admin_call(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Option<String>, String) {
    let url = format!("{}{path}", gw.admin_url());
    let client = reqwest::Client::new();
    let mut request = match method {
        "POST" => client.post(url).json(&json!({"tenant": "bravo-corp"})),
        _ => client.get(url),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.text().await.unwrap())
}

fn range() -> (String, String) {
    let today = chrono::Utc::now().date_naive();
    (
        (today - chrono::Days::new(2)).to_string(),
        (today + chrono::Days::new(2)).to_string(),
    )
}

#[tokio::test]
async fn failed_admin_authentications_are_limited_before_the_audit_log() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let tenant_key = gw.create_key("acme").await;
    let wrong = "wrong-admin-token-0123";
    secrets::register(wrong);
    let mut statuses = Vec::new();
    for i in 0..16 {
        // No token, a wrong one, and a tenant key (never an admin credential) in turn.
        let token = [None, Some(wrong), Some(tenant_key.as_str())][i % 3];
        let (status, retry, body) = admin_call(&gw, "GET", "/admin/usage", token).await;
        if status == 429 {
            let retry: u64 = retry.expect("retry-after").parse().unwrap();
            assert!((1..=60).contains(&retry), "{retry}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["code"], "too_many_failed_authentications");
        }
        statuses.push(status);
    }
    assert_eq!(statuses[..10], [401; 10], "{statuses:?}");
    assert_eq!(statuses[10..], [429; 6], "{statuses:?}");
    // The admin token still works from the same address.
    let (status, _) = gw.admin_get("/admin/tenants").await;
    assert_eq!(status, 200);

    let store = gw.store().await;
    let entries = store.audit_log(1000, None).await.unwrap();
    store.close().await;
    let anonymous: Vec<&AuditEntry> = entries.iter().filter(|e| e.actor == "anonymous").collect();
    assert_eq!(
        anonymous.len(),
        10,
        "only the first 10 failures are audited"
    );
    assert!(anonymous.iter().all(|e| e.status == 401));
    assert!(entries.iter().all(|e| e.status != 429));
    assert!(entries
        .iter()
        .any(|e| e.action == "GET /admin/tenants" && e.status == 200));
    let log = gw.log();
    assert_eq!(
        log.matches("too many failed authentications").count(),
        1,
        "one summary line:\n{log}"
    );
}

#[tokio::test]
async fn the_audit_log_keeps_entries_for_its_retention_days() {
    let mock = MockUpstream::start("alpha").await;
    let mut gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let store = gw.store().await;
    let now = chrono::Utc::now().timestamp_millis();
    for (days, path) in [(400, "/old"), (2, "/older-than-a-day"), (0, "/recent")] {
        let entry = AuditEntry {
            id: 0,
            at_ms: now - days * 86_400_000 - 60_000,
            actor: "test".into(),
            remote: None,
            method: "GET".into(),
            path: path.into(),
            action: "GET /admin/tenants".into(),
            target: None,
            status: 200,
            detail: None,
        };
        store.audit(&entry).await.unwrap();
    }
    let paths = |entries: Vec<AuditEntry>| -> BTreeSet<String> {
        entries.into_iter().map(|e| e.path).collect()
    };
    assert_eq!(paths(store.audit_log(100, None).await.unwrap()).len(), 3);

    // A retention of 0 days is refused; 1 day deletes the two old entries at the next start.
    let admin = |days: u32| {
        format!(
            "admin: {{ listen: \"127.0.0.1:{}\", audit_retention_days: {days} }}",
            gw.admin_port
        )
    };
    set_config_line(&gw, "admin:", &admin(0));
    let check = tollgate(
        &gw.config,
        &["config", "check", gw.config.to_str().unwrap()],
    );
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("admin.audit_retention_days"));
    set_config_line(&gw, "admin:", &admin(1));
    gw.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = paths(store.audit_log(100, None).await.unwrap());
        if !left.contains("/old") || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        left,
        BTreeSet::from(["/recent".to_string()]),
        "{}",
        gw.log()
    );
    assert!(gw
        .log()
        .contains("audit log entries past retention deleted"));
    store.close().await;
}

#[tokio::test]
async fn made_up_model_names_are_one_group_in_reports() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    for i in 0..5 {
        let r = gw.chat(&key, &ask(&format!("made-up-{i}"))).await;
        assert_eq!(r.status(), 404);
    }
    assert_eq!(gw.chat(&key, &ask("gpt-test")).await.status(), 200);
    let rows = gw.ledger("acme", 6).await;
    let refused: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.status == 404)
        .map(|r| r.model.as_str())
        .collect();
    assert_eq!(refused.len(), 5, "the ledger keeps what the client sent");

    let (from, to) = range();
    let (status, usage) = gw
        .admin_get(&format!("/admin/usage?from={from}&to={to}&group_by=model"))
        .await;
    assert_eq!(status, 200, "{usage}");
    let groups: Vec<(&str, i64)> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap(),
                r["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups.len(),
        2,
        "one group for every unknown name: {groups:?}"
    );
    assert!(groups.contains(&("(unknown model)", 5)), "{groups:?}");
    assert!(groups.contains(&("gpt-test", 1)), "{groups:?}");
    let (_, _, csv) = admin_call(
        &gw,
        "GET",
        &format!("/admin/export/chargeback?from={from}&to={to}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert!(
        csv.contains(",(unknown model),5,") && !csv.contains("made-up"),
        "{csv}"
    );
}

fn two_tenants(mock: &MockUpstream) -> String {
    format!(
        "backends:\n  - {{ name: alpha, base_url: \"{}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY }}\n\
         models:\n  - {{ name: gpt-test, price: {{ input: 2.5, output: 10 }}, targets: [{{ backend: alpha, model: up }}] }}\n\
         \x20 - {{ name: bravo-only, price: {{ input: 2.5, output: 10 }}, targets: [{{ backend: alpha, model: up2 }}] }}\n\
         tenants:\n\
         \x20 - name: acme\n    models: [gpt-test]\n    budgets: [{{ limit_usd: 100, period: monthly }}]\n\
         \x20 - name: bravo-corp\n    models: [gpt-test, bravo-only]\n    allow_tier_header: true\n    budgets: [{{ limit_usd: 100, period: monthly }}]\n",
        mock.base_url()
    )
}

/// A key of tenant A never reads, spends or exports B's data: not through the proxy (whatever
/// headers or body fields it sends), not through the admin API or the dashboard (a tenant key
/// is no admin credential), and tenant filters of the admin API and CLI never include another
/// tenant's rows. (There are no tenant-scoped admin tokens: the admin token and the CLI, which
/// needs the policy file and the database, are the operator's.)
#[tokio::test]
async fn a_tenant_key_reaches_only_its_own_tenant() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&two_tenants(&mock), None).await;
    let acme = gw.create_key("acme").await;
    let bravo = gw.create_key("bravo-corp").await;
    let (_, keys) = gw.admin_get("/admin/keys?tenant=bravo-corp").await;
    let bravo_id = keys["data"][0]["id"].as_str().unwrap().to_string();

    // Proxy: A's key, dressed up as B in every way a client could try.
    let mut spoof = ask("gpt-test");
    spoof["user"] = json!("bravo-corp");
    spoof["safety_identifier"] = json!("bravo-corp");
    spoof["metadata"] = json!({"tenant": "bravo-corp", "key_id": bravo_id});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(&acme)
        .header("x-tollgate-tenant", "bravo-corp")
        .header("x-tollgate-key", &bravo_id)
        .header("x-tollgate-key-id", &bravo_id)
        .header("x-tollgate-tier", "premium")
        .header("x-api-key", &bravo)
        .json(&spoof)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(
        !mock.received()[0]
            .headers
            .iter()
            .any(|(_, v)| v.as_bytes() == bravo.as_bytes()),
        "B's key is never forwarded"
    );
    // B's model is not A's, even asked for by name.
    assert_eq!(gw.chat(&acme, &ask("bravo-only")).await.status(), 404);
    let models: Value = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!models.to_string().contains("bravo-only"), "{models}");
    let rows = gw.ledger("acme", 2).await;
    assert!(rows.iter().all(|r| r.key_id != bravo_id));
    // B's one request, so that B has data to leak.
    assert_eq!(gw.chat(&bravo, &ask("bravo-only")).await.status(), 200);
    gw.ledger("bravo-corp", 1).await;

    // Budgets: A's spend is A's, B's budget holds only B's request.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (acme_used, bravo_used) = loop {
        let (_, budgets) = gw.admin_get("/admin/budgets").await;
        let used = |tenant: &str| {
            budgets["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["tenant"] == tenant)
                .unwrap()["used"]
                .as_i64()
                .unwrap()
        };
        let bravo_cost = gw.ledger("bravo-corp", 1).await[0].cost_micros;
        if (used("bravo-corp") == bravo_cost && used("acme") > 0) || Instant::now() > deadline {
            break (used("acme"), used("bravo-corp"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let acme_cost: i64 = rows.iter().map(|r| r.cost_micros).sum();
    assert_eq!(acme_used, acme_cost);
    assert_eq!(bravo_used, gw.ledger("bravo-corp", 1).await[0].cost_micros);

    // Admin API and dashboard data: A's key opens nothing.
    let (from, to) = range();
    for (method, path) in [
        ("GET", "/admin/tenants".to_string()),
        ("GET", "/admin/tenants/bravo-corp".to_string()),
        ("GET", "/admin/keys?tenant=bravo-corp".to_string()),
        ("GET", format!("/admin/keys/{bravo_id}")),
        ("POST", "/admin/keys".to_string()),
        ("POST", format!("/admin/keys/{bravo_id}/rotate")),
        ("POST", format!("/admin/keys/{bravo_id}/revoke")),
        ("GET", "/admin/budgets?tenant=bravo-corp".to_string()),
        (
            "GET",
            format!("/admin/usage?from={from}&to={to}&tenant=bravo-corp"),
        ),
        ("GET", "/admin/routing".to_string()),
        (
            "GET",
            format!("/admin/export/chargeback?from={from}&to={to}"),
        ),
        ("GET", "/admin/audit".to_string()),
    ] {
        let (status, _, body) = admin_call(&gw, method, &path, Some(acme.as_str())).await;
        // 429 once this address has failed too often (see the test above).
        assert!(
            status == 401 || status == 429,
            "{method} {path}: {status} {body}"
        );
        assert!(!body.contains("bravo"), "{method} {path}: {body}");
    }
    let (_, _, page) = admin_call(&gw, "GET", "/", Some(acme.as_str())).await;
    assert!(
        !page.contains("bravo-corp"),
        "the dashboard page carries no data"
    );
    assert_eq!(models_status(&gw, &bravo).await, 200, "B's key untouched");
    let (_, keys) = gw.admin_get("/admin/keys?tenant=bravo-corp").await;
    assert_eq!(
        keys["data"].as_array().unwrap().len(),
        1,
        "no key made for B"
    );

    // The operator's tenant filters never include another tenant's rows.
    let (_, usage) = gw
        .admin_get(&format!(
            "/admin/usage?from={from}&to={to}&tenant=acme&group_by=tenant,key,model"
        ))
        .await;
    assert!(usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant"] == "acme" && r["key"] != bravo_id.as_str()));
    assert_eq!(usage["totals"]["cost_micros"], acme_cost);
    let (_, _, csv) = admin_call(
        &gw,
        "GET",
        &format!("/admin/export/chargeback?from={from}&to={to}&tenant=acme"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert!(csv.lines().count() >= 2 && !csv.contains("bravo"), "{csv}");
    let cli = gw.cli(&["export", "--from", &from, "--to", &to, "--tenant", "acme"]);
    assert_eq!(String::from_utf8(cli.stdout).unwrap(), csv);
    let cli = gw.cli(&["keys", "list", "--tenant", "acme", "--json"]);
    let listed: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert!(listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["tenant"] == "acme"));
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

#[tokio::test]
async fn errors_name_backends_but_never_addresses_or_provider_keys() {
    let down_port = free_port();
    let down = format!("http://127.0.0.1:{down_port}/v1");
    let slow = MockUpstream::start("slow").await;
    slow.behaviour
        .header_delay_ms
        .store(2_000, Ordering::SeqCst);
    let echo = MockUpstream::start("echo").await;
    echo.behaviour.echo_key.store(true, Ordering::SeqCst);
    let yaml = format!(
        "backends:\n  - {{ name: down, base_url: \"{down}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY, connect_timeout_ms: 500 }}\n\
         \x20 - {{ name: slow, base_url: \"{}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY, read_timeout_ms: 300 }}\n\
         \x20 - {{ name: echo, base_url: \"{}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY }}\n\
         models:\n  - {{ name: gone, targets: [{{ backend: down, model: d }}] }}\n\
         \x20 - {{ name: slowpoke, targets: [{{ backend: slow, model: s }}] }}\n\
         \x20 - {{ name: careless, targets: [{{ backend: echo, model: e }}] }}\n\
         tenants:\n  - name: acme\n    allow_unpriced: true\n",
        slow.base_url(),
        echo.base_url()
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let mut bodies = Vec::new();
    for (model, status, backend) in [("gone", 502, "down"), ("slowpoke", 504, "slow")] {
        let r = gw.chat(&key, &ask(model)).await;
        assert_eq!(r.status(), status);
        let body = r.text().await.unwrap();
        assert!(body.contains(&format!("`{backend}`")), "{body}");
        bodies.push(body);
    }
    let slow_port = slow.addr.port().to_string();
    for body in &bodies {
        for detail in [
            "127.0.0.1",
            down_port.to_string().as_str(),
            slow_port.as_str(),
            "refused",
            "os error",
        ] {
            assert!(!body.contains(detail), "{detail} in {body}");
        }
    }
    // The log has what the tenant was not told.
    let log = gw.log();
    assert!(log.contains("no backend could serve the request"), "{log}");
    assert!(
        log.contains(&format!("127.0.0.1:{down_port}")),
        "the operator gets the address: {log}"
    );

    // A provider that echoes the key it was sent: its 401 reaches the client without it.
    let r = gw.chat(&key, &ask("careless")).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    let text = body.to_string();
    assert_eq!(
        echo.received()[0].headers["authorization"],
        format!("Bearer {PROVIDER_KEY}").as_str(),
        "the provider did get the key"
    );
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Incorrect API key provided: [redacted]."),
        "{message}"
    );
    for part in [
        PROVIDER_KEY,
        &PROVIDER_KEY[..8],
        &PROVIDER_KEY[PROVIDER_KEY.len() - 4..],
    ] {
        assert!(!text.contains(part), "{part} in {text}");
    }
    assert!(!gw.log().contains(PROVIDER_KEY));
}

/// A representative run (keys made by the CLI and the API, rotated, good and failing requests,
/// a provider that echoes its key, wrong admin tokens, a signed budget alert), then every log
/// and the ledger, audit and key tables searched for every secret the tests gave out.
#[tokio::test]
async fn no_secret_reaches_logs_or_tables() {
    let alerts: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let sink = alerts.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let alpha = MockUpstream::start("alpha").await;
    let echo = MockUpstream::start("echo").await;
    echo.behaviour.echo_key.store(true, Ordering::SeqCst);
    let down = format!("http://127.0.0.1:{}/v1", free_port());
    let yaml = format!(
        "backends:\n  - {{ name: alpha, base_url: \"{}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY }}\n\
         \x20 - {{ name: echo, base_url: \"{}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY }}\n\
         \x20 - {{ name: down, base_url: \"{down}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY, connect_timeout_ms: 300 }}\n\
         models:\n  - {{ name: gpt-test, price: {{ input: 1000, output: 1000 }}, targets: [{{ backend: alpha, model: up }}] }}\n\
         \x20 - {{ name: careless, price: {{ input: 1, output: 1 }}, targets: [{{ backend: echo, model: e }}] }}\n\
         \x20 - {{ name: gone, price: {{ input: 1, output: 1 }}, targets: [{{ backend: down, model: d }}] }}\n\
         tenants:\n  - name: acme\n    budgets: [{{ limit_usd: 0.01, period: daily, mode: soft }}]\n\
         \x20   alerts: {{ webhook_url: \"{hook}\", secret_env: TOLLGATE_TEST_ALERT_SECRET, thresholds: [50] }}\n\
         \x20 - name: bravo-corp\n",
        alpha.base_url(),
        echo.base_url()
    );
    let gw = Gateway::start(&yaml, None).await;
    let cli_key = gw.create_key("acme").await;
    let (status, made) = gw
        .admin_post(
            "/admin/keys",
            json!({"tenant": "bravo-corp", "name": "api"}),
        )
        .await;
    assert_eq!(status, 201);
    let api_key = made["secret"].as_str().unwrap().to_string();
    let api_id = made["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(gw.chat(&api_key, &ask("gpt-test")).await.status(), 200);
    let (_, rotated) = gw
        .admin_post(
            &format!("/admin/keys/{api_id}/rotate"),
            json!({"grace_seconds": 60}),
        )
        .await;
    let rotated_key = rotated["secret"].as_str().unwrap().to_string();
    assert_eq!(gw.chat(&rotated_key, &ask("gpt-test")).await.status(), 200);
    let out = gw.cli(&["keys", "rotate", &api_id, "--grace-seconds", "60"]);
    assert!(out.status.success());
    let cli_rotated = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while models_status(&gw, &cli_rotated).await != 200 {
        assert!(Instant::now() < deadline, "the rotated key is picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.chat(&cli_rotated, &ask("gpt-test")).await.status(), 200);
    let fake_key = format!("tg-{}", "0f".repeat(24));
    let wrong_token = "wrong-admin-token-4567";
    secrets::register(&fake_key);
    secrets::register(wrong_token);

    let mut stream = ask("gpt-test");
    stream["stream"] = json!(true);
    for (key, body, status) in [
        (&cli_key, ask("gpt-test"), 200),
        (&cli_key, stream, 200),
        (&cli_key, ask("careless"), 401),
        (&cli_key, ask("gone"), 502),
        (&cli_key, ask("no-such-model"), 404),
        (&api_key, ask("gpt-test"), 401),
        (&fake_key, ask("gpt-test"), 401),
    ] {
        let r = gw.chat(key, &body).await;
        assert_eq!(r.status(), status, "{body}");
        let text = r.text().await.unwrap();
        secrets::assert_no_secret("a response", &text);
    }
    for token in [Some(wrong_token), Some(cli_key.as_str()), None] {
        let (status, _, body) = admin_call(&gw, "GET", "/admin/keys", token).await;
        assert_eq!(status, 401);
        secrets::assert_no_secret("an admin error", &body);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while alerts.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alerts = alerts.lock().unwrap().clone();
    assert!(
        !alerts.is_empty(),
        "the budget alert was sent, signed with its secret"
    );

    let acme_rows = gw.ledger("acme", 5).await;
    let bravo_rows = gw.ledger("bravo-corp", 3).await;
    let store = gw.store().await;
    let audit = store.audit_log(10_000, None).await.unwrap();
    let keys = store.keys_changed_since(0).await.unwrap();
    store.close().await;
    assert!(audit.iter().any(|e| e.actor == "anonymous"));

    // The check is not empty: every secret of this run is in the registry.
    let registered = secrets::registered();
    for secret in [
        ADMIN_TOKEN,
        PROVIDER_KEY,
        ALERT_SECRET,
        cli_key.as_str(),
        api_key.as_str(),
        rotated_key.as_str(),
        cli_rotated.as_str(),
        fake_key.as_str(),
        wrong_token,
    ] {
        assert!(
            registered.iter().any(|s| s == secret),
            "unregistered secret"
        );
    }
    secrets::assert_no_secret("the ledger", &format!("{acme_rows:?}{bravo_rows:?}"));
    secrets::assert_no_secret("the audit log", &format!("{audit:?}"));
    secrets::assert_no_secret("the key table", &format!("{keys:?}"));
    secrets::assert_no_secret("the alerts", &format!("{alerts:?}"));
    secrets::assert_no_secret("the gateway log", &gw.log());
}
