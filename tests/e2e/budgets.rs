//! Budgets and rate limits across three gateway replicas on one Postgres and one Redis.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tollgate_billing::budget::{Counters, RedisCounters};

use crate::harness::gateway::{drop_postgres, fresh_postgres};
use crate::harness::{Gateway, MockUpstream};

fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A tenant name no earlier run used (Redis keeps counters between test runs).
fn unique(name: &str) -> String {
    format!(
        "{name}-{}",
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    )
}

/// A policy with one model `m` on `mock`, priced `input`/`output` USD per 1M tokens. `head`
/// comes first (e.g. [`shared_counters`]); `tenants` is the list under `tenants:`.
fn policy(mock: &MockUpstream, head: &str, (input, output): (f64, f64), tenants: &str) -> String {
    format!(
        "{head}backends:\n  - {{ name: mock, base_url: \"{}\" }}\nmodels:\n  - name: m\n    price: {{ input: {input:?}, output: {output:?} }}\n    targets: [{{ backend: mock, model: up }}]\ntenants:\n{tenants}",
        mock.base_url()
    )
}

/// Counters in the test Redis.
fn shared_counters() -> String {
    format!("redis_url: {}\n", redis_url())
}

async fn replicas(policy: &str, n: usize) -> (Vec<Gateway>, String) {
    let (pg_url, pg_name) = fresh_postgres().await;
    let mut gateways = Vec::new();
    for _ in 0..n {
        gateways.push(Gateway::start(policy, Some(pg_url.clone())).await);
    }
    (gateways, pg_name)
}

/// Creates a key on the shared database and waits until every replica accepts it.
async fn shared_key(gateways: &[Gateway], tenant: &str) -> String {
    let key = gateways[0].create_key(tenant).await;
    let client = reqwest::Client::new();
    for gw in gateways {
        for _ in 0..200 {
            if client
                .get(format!("{}/v1/models", gw.url()))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status()
                == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    key
}

/// Deterministic pseudo-random numbers (xorshift), so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Sends `requests` (body, replica) all at once; returns each status.
async fn fire(gateways: &[Gateway], key: &str, requests: Vec<(Value, usize)>) -> Vec<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let urls: Vec<String> = gateways
        .iter()
        .map(|g| format!("{}/v1/chat/completions", g.url()))
        .collect();
    futures_util::stream::iter(requests)
        .map(|(body, replica)| {
            let client = client.clone();
            let url = urls[replica].clone();
            let key = key.to_string();
            async move {
                let response = client
                    .post(url)
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                if status == 429 {
                    assert!(response.headers().contains_key("retry-after"));
                }
                let body = response.bytes().await.unwrap();
                assert!(
                    status == 200 || status == 429,
                    "{status}: {}",
                    String::from_utf8_lossy(&body)
                );
                status
            }
        })
        .buffer_unordered(256)
        .collect()
        .await
}

/// Waits until all of a counter's holds are settled; returns what it counted.
async fn settled(counter: &str) -> i64 {
    let redis = RedisCounters::new(&redis_url(), Duration::from_secs(2)).unwrap();
    for _ in 0..200 {
        let (used, reserved) = redis.read(counter).await.unwrap();
        if reserved == 0 {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("holds never settled on {counter}");
}

/// Per-minute limits reset with the minute: start a test early enough in one.
async fn stay_inside_one_minute() {
    let second = chrono::Utc::now().timestamp() % 60;
    if second > 40 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
}

fn month() -> String {
    chrono::Utc::now().format("%Y-%m").to_string()
}

#[tokio::test]
async fn a_one_dollar_budget_holds_across_three_replicas() {
    let mock = MockUpstream::start("m").await;
    let tenant = unique("dollar");
    let yaml = policy(&mock, &shared_counters(), (1.0, 2.0), &format!("  - name: {tenant}\n    budgets: [{{ limit_usd: 1.00, period: monthly, mode: hard }}]\n"));
    let (mut gateways, pg_name) = replicas(&yaml, 3).await;
    let key = shared_key(&gateways, &tenant).await;

    // 1,000 requests of random sizes, streamed or not, spread over the replicas. At $1/$2 per
    // 1M tokens the budget fits a few hundred of them.
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut worst_case_max = 0i64;
    let mut requests = Vec::new();
    for i in 0..1000 {
        let prompt_words = 50 + rng.below(2500) as usize;
        let max_tokens = 10 + rng.below(2000);
        let body = json!({"model": "m", "stream": i % 3 == 0, "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": " hello".repeat(prompt_words)}]});
        // Worst case in micro-dollars: ~prompt tokens at $1/1M + max_tokens at $2/1M (+framing).
        worst_case_max = worst_case_max.max((prompt_words as i64 + 10) + 2 * max_tokens as i64);
        requests.push((body, i % 3));
    }
    let statuses = fire(&gateways, &key, requests).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok > 100 && ok < 1000, "the budget must bind: {ok} admitted");

    for gw in &mut gateways {
        gw.stop();
    }
    let rows = gateways[0].ledger(&tenant, 1000).await;
    let spent: i64 = rows.iter().map(|r| r.cost_micros).sum();
    eprintln!(
        "admitted {ok} of 1000; spent {spent} micro-dollars; largest worst case {worst_case_max}"
    );
    assert!(
        spent <= 1_000_000,
        "overshoot: spent {spent} micro-dollars of 1,000,000"
    );
    assert!(
        spent >= 1_000_000 - worst_case_max,
        "undershoot: spent {spent}, largest worst case {worst_case_max}"
    );
    assert_eq!(rows.iter().filter(|r| r.outcome == "ok").count(), ok);
    assert!(rows
        .iter()
        .filter(|r| r.status == 429)
        .all(|r| r.cost_micros == 0));

    // Ledger, Redis and the provider agree.
    let counter = format!("tg:{{{tenant}}}:b:usd.monthly.k=*.m=*:{}", month());
    assert_eq!(settled(&counter).await, spent);
    let completion: i64 = rows.iter().map(|r| r.completion_tokens).sum();
    assert_eq!(
        completion as u64,
        mock.completion_tokens_served.load(Ordering::SeqCst)
    );
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn rpm_and_tpm_hold_across_three_replicas() {
    stay_inside_one_minute().await;
    let mock = MockUpstream::start("m").await;
    let by_requests = unique("rpm");
    let by_tokens = unique("tpm");
    let tenants =
        format!("  - name: {by_requests}\n    rpm: 40\n  - name: {by_tokens}\n    tpm: 20000\n");
    let yaml = policy(&mock, &shared_counters(), (1.0, 2.0), &tenants);
    let (mut gateways, pg_name) = replicas(&yaml, 3).await;
    let rpm_key = shared_key(&gateways, &by_requests).await;
    let tpm_key = shared_key(&gateways, &by_tokens).await;

    let small = |i: usize| {
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            i % 3,
        )
    };
    let statuses = fire(&gateways, &rpm_key, (0..150).map(small).collect()).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        40,
        "exactly the RPM limit is admitted"
    );

    let mut rng = Rng(42);
    let mut worst_max = 0;
    let requests: Vec<(Value, usize)> = (0..150)
        .map(|i| {
            let words = 20 + rng.below(400) as usize;
            let max_tokens = 10 + rng.below(300);
            worst_max = worst_max.max(words as i64 + 10 + max_tokens as i64);
            (json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": " hello".repeat(words)}]}), i % 3)
        })
        .collect();
    let statuses = fire(&gateways, &tpm_key, requests).await;
    assert!(statuses.contains(&429));

    for gw in &mut gateways {
        gw.stop();
    }
    let rows = gateways[0].ledger(&by_tokens, 150).await;
    let tokens: i64 = rows
        .iter()
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    assert!(tokens <= 20_000, "TPM overshoot: {tokens}");
    assert!(tokens >= 20_000 - worst_max, "TPM undershoot: {tokens}");
    let rpm_rows = gateways[0].ledger(&by_requests, 150).await;
    assert_eq!(rpm_rows.iter().filter(|r| r.outcome == "ok").count(), 40);
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn a_stream_is_cut_at_its_budget_and_billed_what_was_delivered() {
    let mock = MockUpstream::start("storyteller").await;
    mock.behaviour.stream_chunks.store(120, Ordering::SeqCst);
    let tenant = unique("cut");
    // $1 per 1M tokens both ways: one micro-dollar per token. Room for ~200 tokens in all;
    // the reservation starts at the prompt plus 40 output tokens.
    let yaml = policy(
        &mock,
        "",
        (1.0, 1.0),
        &format!("  - name: {tenant}\n    default_output_tokens: 40\n    budgets: [{{ limit_usd: 0.0002, period: total }}]\n"),
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key(&tenant).await;
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "Tell me a long story."}]});
    let response = gw.chat(&key, &body).await;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .contains_key("x-tollgate-budget-remaining"));
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let error: Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "budget_exceeded", "{text}");
    let delivered: String = events[..events.len() - 2]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).unwrap())
        .map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(!delivered.is_empty() && delivered.len() < mock.words(120).concat().len());

    let row = &gw.ledger(&tenant, 1).await[0];
    assert_eq!(row.outcome, "budget_cut");
    let delivered_tokens = tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(&delivered)
        .len() as i64;
    assert_eq!(
        row.completion_tokens, delivered_tokens,
        "billed exactly what was delivered"
    );
    assert_eq!(row.usage_source, "gateway");
    assert!(row.cost_micros <= 200, "within the budget: {row:?}");
    assert!(
        row.cost_micros >= 150,
        "the budget was used, not abandoned early: {row:?}"
    );

    // The budget is spent: the next request is refused before reaching the provider.
    let before = mock.received().len();
    let r = gw.chat(&key, &body).await;
    assert_eq!(r.status(), 429);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "budget_exceeded");
    assert_eq!(mock.received().len(), before);
}

#[tokio::test]
async fn an_unreachable_redis_fails_closed_or_open_per_tenant() {
    let mock = MockUpstream::start("m").await;
    let closed = unique("closed");
    let open = unique("open");
    let dead_redis = format!("redis://127.0.0.1:{}", crate::harness::gateway::free_port());
    let yaml = policy(
        &mock,
        &format!("redis_url: {dead_redis}\nredis_timeout_ms: 100\n"),
        (1.0, 2.0),
        &format!("  - name: {closed}\n    rpm: 100\n  - name: {open}\n    rpm: 2\n    on_redis_down: fail_open\n  - name: free\n"),
    );
    let gw = Gateway::start(&yaml, None).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});

    let key = gw.create_key(&closed).await;
    let r = gw.chat(&key, &body).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "limits_unavailable"
    );

    // fail_open: this replica's own counters still enforce the limit.
    let key = gw.create_key(&open).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(gw.chat(&key, &body).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);

    // A tenant without limits never needs Redis.
    let key = gw.create_key("free").await;
    assert_eq!(gw.chat(&key, &body).await.status(), 200);
    let rows = gw.ledger(&open, 3).await;
    assert_eq!(rows.iter().filter(|r| r.outcome == "ok").count(), 2);
}

fn spend_request(words: usize, max_tokens: u64) -> Value {
    json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": " hello".repeat(words)}]})
}

#[tokio::test]
async fn lost_counters_are_rebuilt_from_the_ledger_without_overshoot() {
    let mock = MockUpstream::start("m").await;
    let tenant = unique("rebuilt");
    let yaml = policy(
        &mock,
        &shared_counters(),
        (1.0, 1.0),
        &format!("  - name: {tenant}\n    budgets: [{{ limit_usd: 0.01, period: monthly }}]\n"),
    );
    let (mut gateways, pg_name) = replicas(&yaml, 2).await;
    let key = shared_key(&gateways, &tenant).await;
    let client = reqwest::Client::new();
    let url = |i: usize| format!("{}/v1/chat/completions", gateways[i % 2].url());
    let mut sent = 0;
    for i in 0..8 {
        let r = client
            .post(url(i))
            .bearer_auth(&key)
            .json(&spend_request(200, 300))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        sent += 1;
    }

    // Redis loses the tenant's counters, as a restart without persistence would.
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("tg:{{{tenant}}}*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut connection)
        .await
        .unwrap();

    // Until a replica has rebuilt them, requests are refused (fail_closed), never admitted blind.
    let mut refused = 0;
    loop {
        let r = client
            .post(url(sent))
            .bearer_auth(&key)
            .json(&spend_request(200, 300))
            .send()
            .await
            .unwrap();
        sent += 1;
        match r.status().as_u16() {
            200 => break,
            503 => refused += 1,
            other => panic!("unexpected {other}"),
        }
        assert!(refused < 200, "counters never rebuilt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses = fire(
        &gateways,
        &key,
        (0..30).map(|i| (spend_request(200, 300), i % 2)).collect(),
    )
    .await;
    sent += statuses.len();
    assert!(statuses.contains(&429), "the rebuilt counters still bind");

    for gw in &mut gateways {
        gw.stop();
    }
    let rows = gateways[0].ledger(&tenant, sent).await;
    let spent: i64 = rows.iter().map(|r| r.cost_micros).sum();
    eprintln!("refused while cold: {refused}; spent {spent} of 10000");
    assert!(spent <= 10_000, "overshoot after the rebuild: {spent}");
    assert!(spent >= 10_000 - 520, "undershoot: {spent}");
    let counter = format!("tg:{{{tenant}}}:b:usd.monthly.k=*.m=*:{}", month());
    assert_eq!(
        settled(&counter).await,
        spent,
        "rebuilt counter agrees with the ledger (nothing counted twice)"
    );
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn the_embedded_default_keeps_its_budget_across_restarts() {
    let mock = MockUpstream::start("m").await;
    let tenant = unique("embedded");
    let yaml = policy(
        &mock,
        "",
        (1.0, 1.0),
        &format!("  - name: {tenant}\n    budgets: [{{ limit_usd: 0.002, period: daily }}]\n"),
    );
    let mut gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key(&tenant).await;
    for _ in 0..3 {
        let r = gw.chat(&key, &spend_request(200, 300)).await;
        assert_eq!(r.status(), 200);
    }
    gw.restart().await;
    // ~1,520 of 2,000 micro-dollars spent before the restart: a ~507 worst case no longer fits.
    let r = gw.chat(&key, &spend_request(200, 300)).await;
    assert_eq!(r.status(), 429);
    let r = gw.chat(&key, &spend_request(100, 100)).await;
    assert_eq!(r.status(), 200, "a request that fits still passes");
}

#[tokio::test]
async fn budget_alerts_reach_the_webhook_once_per_threshold_signed() {
    use hmac::{Hmac, Mac};
    use std::sync::{Arc, Mutex};

    // A webhook receiver that records each body with its signature.
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let signature = headers["x-tollgate-signature"]
                    .to_str()
                    .unwrap()
                    .to_string();
                sink.lock().unwrap().push((body, signature));
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mock = MockUpstream::start("m").await;
    let tenant = unique("alerts");
    let tenants = format!(
        "  - name: {tenant}\n    budgets: [{{ limit_usd: 0.001, period: daily, mode: soft }}]\n    alerts: {{ webhook_url: \"{hook}\", secret_env: TOLLGATE_TEST_PROVIDER_KEY, thresholds: [100, 50] }}\n"
    );
    let yaml = policy(&mock, &shared_counters(), (1.0, 1.0), &tenants);
    let (mut gateways, pg_name) = replicas(&yaml, 2).await;
    let key = shared_key(&gateways, &tenant).await;
    let client = reqwest::Client::new();
    // ~300 micro-dollars each, alternating replicas: 50% is crossed on the 2nd, 100% on the 4th;
    // a soft budget keeps serving past it.
    for i in 0..7 {
        let url = format!("{}/v1/chat/completions", gateways[i % 2].url());
        let r = client
            .post(url)
            .bearer_auth(&key)
            .json(&spend_request(100, 190))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..100 {
        if received.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts = received.lock().unwrap().clone();
    assert_eq!(alerts.len(), 2, "one alert per threshold: {alerts:#?}");
    let mut thresholds = Vec::new();
    for (body, signature) in &alerts {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"sk-provider-secret").unwrap();
        mac.update(body.as_bytes());
        assert_eq!(
            signature,
            &format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
            "signed"
        );
        let alert: Value = serde_json::from_str(body).unwrap();
        assert_eq!(alert["tenant"], tenant.as_str());
        assert_eq!(alert["type"], "budget.threshold");
        assert!(
            alert["used"].as_i64().unwrap() * 100
                >= alert["limit"].as_i64().unwrap() * alert["threshold_percent"].as_i64().unwrap()
        );
        thresholds.push(alert["threshold_percent"].as_i64().unwrap());
    }
    thresholds.sort();
    assert_eq!(thresholds, [50, 100]);
    for gw in &mut gateways {
        gw.stop();
    }
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn limit_headers_retry_after_and_unpriced_models() {
    stay_inside_one_minute().await;
    let mock = MockUpstream::start("m").await;
    let tenant = unique("headers");
    let yaml = format!(
        "backends:\n  - {{ name: mock, base_url: \"{}\" }}\nmodels:\n  - name: m\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: mock, model: up }}]\n  - name: free\n    targets: [{{ backend: mock, model: up }}]\ntenants:\n  - name: {tenant}\n    rpm: 2\n    tpm: 100000\n    budgets: [{{ limit_usd: 3, period: monthly }}]\n",
        mock.base_url()
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key(&tenant).await;
    let r = gw.chat(&key, &spend_request(10, 20)).await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-limit-tokens"], "100000");
    assert!(h["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .ends_with('s'));
    let remaining: f64 = h["x-tollgate-budget-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 3.0 && remaining > 2.99, "{remaining}");

    // Unpriced models are refused unless the tenant allows them (and cost no RPM).
    let r = gw
        .chat(
            &key,
            &json!({"model": "free", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "model_unpriced"
    );

    let r = gw.chat(&key, &spend_request(10, 20)).await;
    assert_eq!(r.status(), 200);
    let r = gw.chat(&key, &spend_request(10, 20)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "requests");
}

/// Replaces `from` by `to` in a gateway's policy file, atomically (the watcher reloads it).
fn rewrite_policy(gw: &Gateway, from: &str, to: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    assert!(text.contains(from), "{from:?} not in the policy");
    let tmp = gw.config.with_extension("new");
    std::fs::write(&tmp, text.replace(from, to)).unwrap();
    std::fs::rename(&tmp, &gw.config).unwrap();
}

async fn wait_for_log(gw: &Gateway, needle: &str) {
    for _ in 0..400 {
        if gw.log().contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {needle:?} in the log:\n{}", gw.log());
}

/// Sends `body` until it is served (a cold Redis refuses fail_closed tenants until rebuilt).
async fn served(gw: &Gateway, key: &str, body: &Value) {
    for _ in 0..200 {
        match gw.chat(key, body).await.status().as_u16() {
            200 => return,
            503 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("unexpected {other}"),
        }
    }
    panic!("never served");
}

#[tokio::test]
async fn a_budget_added_by_a_reload_starts_from_the_ledgers_spend() {
    // In-process counters on SQLite, then Redis on Postgres.
    for shared in [false, true] {
        let mock = MockUpstream::start("m").await;
        let tenant = unique("added");
        let head = if shared {
            shared_counters()
        } else {
            String::new()
        };
        let yaml = policy(
            &mock,
            &head,
            (1.0, 1.0),
            &format!("  - name: {tenant}\n    rpm: 1000\n"),
        );
        let pg = if shared {
            Some(fresh_postgres().await)
        } else {
            None
        };
        let gw = Gateway::start(&yaml, pg.as_ref().map(|(url, _)| url.clone())).await;
        let key = gw.create_key(&tenant).await;
        for _ in 0..3 {
            served(&gw, &key, &spend_request(200, 300)).await;
        }
        let spent: i64 = gw
            .ledger(&tenant, 3)
            .await
            .iter()
            .map(|r| r.cost_micros)
            .sum();
        assert!(spent > 1_000, "{spent}");

        // A daily $0.001 budget appears: today's spend already exceeds it.
        rewrite_policy(
            &gw,
            "    rpm: 1000\n",
            "    rpm: 1000\n    budgets: [{ limit_usd: 0.001, period: daily }]\n",
        );
        wait_for_log(&gw, "policy reloaded").await;
        // The swap does not wait for the seed; the background seeds it from the ledger.
        wait_for_log(&gw, "counter seeded from the ledger").await;
        let r = gw.chat(&key, &spend_request(10, 10)).await;
        assert_eq!(r.status(), 429, "shared: {shared}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "budget_exceeded"
        );
        if let Some((_, name)) = pg {
            drop_postgres(&name).await;
        }
    }
}

/// A rolling deploy: a replica starts with a budget the running one's policy lacks, on warm
/// shared counters. The budget starts from the ledger's spend, and the old replica's requests
/// (which reserve nothing on it) still count in it.
#[tokio::test]
async fn a_budget_added_by_a_restart_starts_from_the_ledger_and_counts_old_replicas() {
    let mock = MockUpstream::start("m").await;
    let tenant = unique("rolled");
    let old = policy(
        &mock,
        &shared_counters(),
        (1.0, 1.0),
        &format!("  - name: {tenant}\n    rpm: 1000\n"),
    );
    let new = old.replace(
        "    rpm: 1000\n",
        "    rpm: 1000\n    budgets: [{ limit_usd: 0.002, period: daily }]\n",
    );
    let (pg_url, pg_name) = fresh_postgres().await;
    let a = Gateway::start(&old, Some(pg_url.clone())).await;
    let key = a.create_key(&tenant).await;
    for _ in 0..3 {
        served(&a, &key, &spend_request(200, 300)).await;
    }
    let spent: i64 = a
        .ledger(&tenant, 3)
        .await
        .iter()
        .map(|r| r.cost_micros)
        .sum();
    assert!((1_000..1_900).contains(&spent), "{spent}");

    // The new replica seeds the budget before it serves: a small request fits.
    let b = Gateway::start(&new, Some(pg_url)).await;
    assert!(
        b.log().contains("counter seeded from the ledger"),
        "{}",
        b.log()
    );
    assert_eq!(b.chat(&key, &spend_request(10, 10)).await.status(), 200);
    // The old replica spends past the budget: its settle counts in the new counter.
    assert_eq!(a.chat(&key, &spend_request(200, 300)).await.status(), 200);
    let spent: i64 = a
        .ledger(&tenant, 5)
        .await
        .iter()
        .map(|r| r.cost_micros)
        .sum();
    assert!(spent > 2_000, "{spent}");
    let mut status = 0;
    for _ in 0..100 {
        status = b.chat(&key, &spend_request(10, 10)).await.status().as_u16();
        if status == 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status, 429,
        "the old replica's spend counts in the new budget"
    );
    drop((a, b));
    drop_postgres(&pg_name).await;
}

#[tokio::test]
async fn a_model_budget_rebuilt_from_the_ledger_counts_routed_requests_under_the_served_model() {
    let mock = MockUpstream::start("m").await;
    let tenant = unique("routed");
    let yaml = format!(
        "backends:\n  - {{ name: mock, base_url: \"{}\" }}\nmodels:\n  - name: small\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: mock, model: up }}]\n  - name: large\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: mock, model: up }}]\nroutes:\n  - {{ name: auto, cheap: small, premium: large, threshold: 1.0 }}\ntenants:\n  - name: {tenant}\n    budgets: [{{ limit_usd: 0.002, period: daily, model: small }}]\n",
        mock.base_url()
    );
    let mut gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key(&tenant).await;
    let routed = |words: usize, max_tokens: u64| json!({"model": "auto", "max_tokens": max_tokens, "messages": [{"role": "user", "content": " hello".repeat(words)}]});
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, &routed(200, 300)).await.status(), 200);
    }
    let rows = gw.ledger(&tenant, 3).await;
    assert!(rows
        .iter()
        .all(|r| r.model == "auto" && r.routing.as_ref().unwrap().routed_model == "small"));
    // The restart rebuilds this replica's counters from the ledger: ~1,520 of 2,000 spent on
    // `small`, so a ~507 worst case no longer fits.
    gw.restart().await;
    let r = gw.chat(&key, &routed(200, 300)).await;
    assert_eq!(r.status(), 429);
    let r = gw.chat(&key, &routed(100, 100)).await;
    assert_eq!(r.status(), 200, "a request that fits still passes");
}

/// Reads a stream's events until it ends; `after_first` runs once the first event arrived.
async fn stream_events(response: reqwest::Response, after_first: impl FnOnce()) -> Vec<String> {
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut after_first = Some(after_first);
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if let Some(f) = after_first.take_if(|_| text.contains("\n\n")) {
            f();
        }
    }
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_redis_outage_mid_stream_cuts_fail_closed_streams_and_extends_fail_open_ones() {
    use crate::harness::stores::RedisServer;
    let mut redis = RedisServer::start().await;
    let mock = MockUpstream::start("storyteller").await;
    mock.behaviour.stream_chunks.store(600, Ordering::SeqCst);
    mock.behaviour.chunk_delay_ms.store(5, Ordering::SeqCst);
    let closed = unique("closed");
    let open = unique("open");
    // Reservations start at the prompt plus 20 output tokens: the streams outgrow them.
    let tenants = format!(
        "  - name: {closed}\n    default_output_tokens: 20\n    budgets: [{{ limit_usd: 1, period: total }}]\n\
         \x20 - name: {open}\n    default_output_tokens: 20\n    on_redis_down: fail_open\n    budgets: [{{ limit_usd: 1, period: total }}]\n"
    );
    let head = format!("redis_url: {}\nredis_timeout_ms: 200\n", redis.url());
    let gw = Gateway::start(&policy(&mock, &head, (1.0, 1.0), &tenants), None).await;
    let (closed_key, open_key) = (gw.create_key(&closed).await, gw.create_key(&open).await);
    let small =
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    served(&gw, &closed_key, &small).await;
    served(&gw, &open_key, &small).await;

    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "Tell me a long story."}]});
    let (closed_response, open_response) =
        tokio::join!(gw.chat(&closed_key, &body), gw.chat(&open_key, &body));
    assert_eq!(closed_response.status(), 200);
    assert_eq!(open_response.status(), 200);
    // Redis goes away once both streams have started.
    let redis_cell = std::sync::Mutex::new(Some(&mut redis));
    let kill = || {
        if let Some(redis) = redis_cell.lock().unwrap().take() {
            redis.kill();
        }
    };
    let closed_events = stream_events(closed_response, &kill).await;
    let open_events = stream_events(open_response, &kill).await;

    // fail_closed: cut with the outage's own error, billed for what was delivered.
    assert_eq!(closed_events.last().unwrap(), "data: [DONE]");
    let error: Value = serde_json::from_str(
        closed_events[closed_events.len() - 2]
            .strip_prefix("data: ")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(error["error"]["code"], "limits_unavailable", "{error}");
    // fail_open: extended on this replica's counters, served to the end.
    assert_eq!(open_events.last().unwrap(), "data: [DONE]");
    assert!(
        !open_events.iter().any(|e| e.contains("\"error\"")),
        "{open_events:?}"
    );
    let delivered = |events: &[String]| -> String {
        events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e.strip_prefix("data: ")?).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    };
    let closed_rows = gw.ledger(&closed, 2).await;
    let cut = closed_rows.iter().find(|r| r.stream).unwrap();
    assert_eq!(cut.outcome, "limits_cut");
    let closed_text = delivered(&closed_events);
    assert!(closed_text.len() < mock.words(600).concat().len());
    assert_eq!(
        cut.completion_tokens,
        tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(&closed_text)
            .len() as i64,
        "billed exactly what was delivered"
    );
    let open_rows = gw.ledger(&open, 2).await;
    let full = open_rows.iter().find(|r| r.stream).unwrap();
    assert_eq!(full.outcome, "ok");
    assert_eq!(delivered(&open_events), mock.words(600).concat());
}

#[tokio::test]
async fn a_settle_redis_never_took_is_kept_and_replayed_after_a_restart() {
    use crate::harness::stores::RedisServer;
    let redis = RedisServer::start().await;
    let mock = MockUpstream::start("m").await;
    let tenant = unique("abandoned");
    let head = format!("redis_url: {}\nredis_timeout_ms: 200\n", redis.url());
    let yaml = policy(
        &mock,
        &head,
        (1.0, 1.0),
        &format!("  - name: {tenant}\n    budgets: [{{ limit_usd: 1, period: monthly }}]\n"),
    );
    let mut gw = Gateway::start(&yaml, None).await;
    // Settles give up after a second instead of six minutes.
    gw.env
        .push(("TOLLGATE_SETTLE_RETRY_MS".into(), "1000".into()));
    gw.restart().await;
    let key = gw.create_key(&tenant).await;
    served(&gw, &key, &spend_request(50, 50)).await;

    // Redis stops answering while a request is at the provider: its settle cannot land.
    mock.behaviour.header_delay_ms.store(1500, Ordering::SeqCst);
    let before = mock.received().len();
    let request = {
        let (url, key) = (format!("{}/v1/chat/completions", gw.url()), key.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&spend_request(100, 100))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    while mock.received().len() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.freeze();
    assert_eq!(request.await.unwrap(), 200);
    mock.behaviour.header_delay_ms.store(0, Ordering::SeqCst);
    wait_for_log(&gw, "settle abandoned; kept on disk").await;
    let kept = gw
        .dir
        .path()
        .join("tollgate-journal")
        .join("abandoned-settles.jsonl");
    assert_eq!(std::fs::read_to_string(&kept).unwrap().lines().count(), 1);

    // The gateway stops, Redis answers again (its counters intact, so nothing is rebuilt) and
    // the gateway starts: the kept settle lands.
    gw.stop();
    redis.thaw();
    gw.restart().await;
    let spent: i64 = gw
        .ledger(&tenant, 2)
        .await
        .iter()
        .map(|r| r.cost_micros)
        .sum();
    let counter = format!("tg:{{{tenant}}}:b:usd.monthly.k=*.m=*:{}", month());
    let counters = RedisCounters::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let mut state = (0, 0);
    for _ in 0..200 {
        state = counters.read(&counter).await.unwrap();
        if state == (spent, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        state,
        (spent, 0),
        "counter (counted, held) against the ledger"
    );
    // Replayed whole: the file is gone (a pass takes it aside and puts back only what is left).
    assert_eq!(std::fs::read_to_string(&kept).unwrap_or_default(), "");
}
