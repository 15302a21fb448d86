//! Every error is OpenAI-shaped, with the right status, and nothing panics.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::harness::{gateway::free_port, policy, Gateway, MockUpstream};

async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert_eq!(error["code"], code, "{body}");
    body
}

#[tokio::test]
async fn client_errors() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let other = gw.create_key("other").await;
    let client = reqwest::Client::new();
    let chat_url = format!("{}/v1/chat/completions", gw.url());
    let good = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});

    expect_error(
        client.post(&chat_url).json(&good).send().await.unwrap(),
        401,
        "missing_api_key",
    )
    .await;
    let r = client
        .post(&chat_url)
        .bearer_auth("tg-not-a-real-key")
        .json(&good)
        .send()
        .await
        .unwrap();
    let body = expect_error(r, 401, "invalid_api_key").await;
    assert!(
        !body.to_string().contains("tg-not-a-real-key"),
        "keys never echoed"
    );
    let r = client
        .post(&chat_url)
        .header("authorization", "Basic abc")
        .json(&good)
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    let r = client
        .post(&chat_url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_json").await;
    let r = gw.chat(&key, &json!({"model": "gpt-test"})).await;
    let body = expect_error(r, 400, "invalid_request").await;
    assert_eq!(body["error"]["param"], "messages");
    let r = gw
        .chat(
            &key,
            &json!({"model": "gpt-test", "messages": [], "max_tokens": "ten"}),
        )
        .await;
    expect_error(r, 400, "invalid_request").await;
    let r = client
        .post(&chat_url)
        .bearer_auth(&key)
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_json").await;

    let r = gw
        .chat(
            &key,
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    expect_error(r, 404, "model_not_found").await;
    let r = gw.chat(&other, &good).await;
    expect_error(r, 404, "model_not_found").await;

    let r = client
        .get(format!("{}/v1/nothing", gw.url()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "unknown_url").await;
    let r = client
        .get(&chat_url)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    expect_error(r, 405, "method_not_allowed").await;

    assert_eq!(
        mock.received().len(),
        0,
        "nothing invalid reached the provider"
    );
    // Authenticated rejections are ledgered too (unauthenticated ones have no tenant).
    let rows = gw.ledger("acme", 5).await;
    assert!(rows
        .iter()
        .all(|r| r.outcome == "rejected" && r.cost_micros == 0));
}

#[tokio::test]
async fn revoked_keys_stop_working() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let listing = String::from_utf8(gw.cli(&["keys", "list", "--tenant", "acme"]).stdout).unwrap();
    assert!(!listing.contains(&key), "list never shows secrets");
    let id = listing
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(gw.cli(&["keys", "revoke", &id]).status.success());
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let r = client
            .get(format!("{}/v1/models", gw.url()))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        if r.status() == 401 {
            expect_error(r, 401, "invalid_api_key").await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("revoked key still accepted");
}

#[tokio::test]
async fn body_limit_is_enforced() {
    let mock = MockUpstream::start("alpha").await;
    let policy = format!(
        "max_body_bytes: 100000\n{}",
        policy(&[("alpha", mock.base_url())], "")
    );
    let gw = Gateway::start(&policy, None).await;
    let key = gw.create_key("acme").await;
    let big = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x".repeat(200_000)}]});
    let r = gw.chat(&key, &big).await;
    expect_error(r, 413, "request_too_large").await;
    assert_eq!(mock.received().len(), 0);
}

#[tokio::test]
async fn upstream_failures_after_fallbacks() {
    let down = format!("http://127.0.0.1:{}/v1", free_port());
    let slow = MockUpstream::start("slow").await;
    slow.behaviour
        .header_delay_ms
        .store(2_000, Ordering::SeqCst);
    let broken = MockUpstream::start("broken").await;
    broken.behaviour.always_status.store(500, Ordering::SeqCst);
    let yaml = format!(
        r#"backends:
  - {{ name: down, base_url: "{down}", api_key_env: TOLLGATE_TEST_PROVIDER_KEY, connect_timeout_ms: 500 }}
  - {{ name: slow, base_url: "{slow}", read_timeout_ms: 300 }}
  - {{ name: broken, base_url: "{broken}" }}
models:
  - name: gpt-test
    targets: [{{ backend: down, model: d }}]
  - name: slowpoke
    targets: [{{ backend: slow, model: s }}]
  - name: broken
    targets: [{{ backend: down, model: d }}, {{ backend: broken, model: b }}]
tenants:
  - name: acme
    allow_unpriced: true
"#,
        slow = slow.base_url(),
        broken = broken.base_url()
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let ask =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});

    expect_error(gw.chat(&key, &ask("gpt-test")).await, 502, "bad_gateway").await;
    expect_error(
        gw.chat(&key, &ask("slowpoke")).await,
        504,
        "gateway_timeout",
    )
    .await;
    // The last backend's own answer (a 500) is passed through once fallbacks are exhausted.
    let r = gw.chat(&key, &ask("broken")).await;
    assert_eq!(r.status(), 500);
    assert_eq!(broken.received().len(), 1);

    let rows = gw.ledger("acme", 3).await;
    assert!(
        rows.iter().all(|r| r.outcome == "upstream_error"
            && r.cost_micros == 0
            && r.usage_source == "none"),
        "{rows:#?}"
    );
    assert!(
        !gw.log().contains("sk-provider-secret"),
        "provider key never logged"
    );
}

#[tokio::test]
async fn hostile_inputs_never_break_the_gateway() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"null".to_vec(),
        b"\"just a string\"".to_vec(),
        deep.into_bytes(),
        br#"{"model": "gpt-test", "messages": [{"role": "user", "content": {"nested": true}}]}"#.to_vec(),
        br#"{"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}"#.to_vec(),
        br#"{"model": "gpt-test", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}"#.to_vec(),
        (0..=255u8).cycle().take(70_000).collect(),
    ];
    for body in bodies {
        let r = client
            .post(&url)
            .bearer_auth(&key)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_client_error() || r.status() == 200,
            "{}",
            r.status()
        );
        let parsed: Value = r.json().await.unwrap();
        assert!(parsed.get("error").is_some() || parsed.get("choices").is_some());
    }
    // One megabyte of a single letter: linear-time counting, and the gateway still answers.
    let hostile = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "a".repeat(1 << 20)}]});
    let r = gw.chat(&key, &hostile).await;
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/healthz", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}
