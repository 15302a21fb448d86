//! A hard budget is only as hard as the worst case reserved for each request: images, files,
//! every output multiplier, hidden reasoning, and the features that change a request's price.

use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::fault_upstream::FaultUpstream;
use crate::harness::{Gateway, MockUpstream};

/// One backend `mock`, model `m` at $1/$1 per 1M tokens plus `model_extra` (YAML lines of the
/// model, indented four spaces), `head` at the top, and `tenants`.
fn policy(mock: &MockUpstream, head: &str, model_extra: &str, tenants: &str) -> String {
    format!(
        "{head}backends:\n  - {{ name: mock, base_url: \"{}\" }}\nmodels:\n  - name: m\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: mock, model: up }}]\n{model_extra}tenants:\n{tenants}",
        mock.base_url()
    )
}

fn user(content: Value) -> Value {
    json!([{"role": "user", "content": content}])
}

async fn status_and_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, code)
}

#[tokio::test]
async fn images_files_and_output_multipliers_are_reserved() {
    let mock = MockUpstream::start("worst").await;
    // A total budget of 1,000 tokens (hard), outputs defaulting to 16 tokens.
    let tenants = "  - { name: t, default_output_tokens: 16, budgets: [{ limit_tokens: 1000, period: total }] }\n  - { name: sized, default_output_tokens: 16, budgets: [{ limit_tokens: 1000, period: total }] }\n";
    let yaml = policy(&mock, "", "", tenants).replace(
        "tenants:",
        "  - name: sized-model\n    unsized_part_tokens: 2000\n    price: { input: 1.0, output: 1.0 }\n    targets: [{ backend: mock, model: up }]\ntenants:",
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("t").await;
    let sized = gw.create_key("sized").await;

    // An image of unknown size at high detail may cost 85 + 8 x 170 = 1,445 tokens: more than
    // the whole budget, so it is refused before it is sent.
    let image = |detail: &str| json!({"type": "image_url", "image_url": {"url": "https://images.example/cat.png", "detail": detail}});
    let r = gw
        .chat(
            &key,
            &json!({"model": "m", "messages": user(json!([{"type": "text", "text": "what is it?"}, image("high")]))}),
        )
        .await;
    assert_eq!(status_and_code(r).await, (429, "budget_exceeded".into()));
    // At low detail it costs 85 tokens: served.
    let r = gw
        .chat(
            &key,
            &json!({"model": "m", "messages": user(json!([{"type": "text", "text": "what is it?"}, image("low")]))}),
        )
        .await;
    assert_eq!(r.status(), 200);

    // A file only the provider can size: refused under a hard budget when the model sets no
    // ceiling; reserved at the model's ceiling (2,000 tokens here: over budget) when it does.
    let file = json!([{"type": "text", "text": "summarise"}, {"type": "file", "file": {"file_id": "file-abc"}}]);
    let r = gw
        .chat(&key, &json!({"model": "m", "messages": user(file.clone())}))
        .await;
    assert_eq!(
        status_and_code(r).await,
        (400, "unsupported_content".into())
    );
    let r = gw
        .chat(
            &sized,
            &json!({"model": "sized-model", "messages": user(file)}),
        )
        .await;
    assert_eq!(status_and_code(r).await, (429, "budget_exceeded".into()));

    // best_of generates (and bills) best_of completions: 4 x 300 does not fit, 1 x 300 does.
    let client = reqwest::Client::new();
    let completions = format!("{}/v1/completions", gw.url());
    let r = client
        .post(&completions)
        .bearer_auth(&sized)
        .json(&json!({"model": "m", "prompt": "once upon a time", "max_tokens": 300, "best_of": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_code(r).await, (429, "budget_exceeded".into()));
    let r = client
        .post(&completions)
        .bearer_auth(&sized)
        .json(&json!({"model": "m", "prompt": "once upon a time", "max_tokens": 300, "best_of": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The largest output cap and choices accepted are reserved in full (never wrapped into a
    // small reservation); absurd ones are refused outright.
    let r = gw
        .chat(
            &sized,
            &json!({"model": "m", "max_tokens": (1u64 << 31) - 1, "n": 128, "messages": user(json!("hi"))}),
        )
        .await;
    assert_eq!(status_and_code(r).await, (429, "budget_exceeded".into()));
    for max in [u64::MAX, i64::MAX as u64 + 1] {
        let r = gw
            .chat(
                &sized,
                &json!({"model": "m", "max_tokens": max, "n": 128, "messages": user(json!("hi"))}),
            )
            .await;
        assert_eq!(status_and_code(r).await.0, 400, "max_tokens {max}");
    }
    // Only the two served requests reached the provider.
    assert_eq!(mock.received().len(), 2);
    drop(gw);
}

#[tokio::test]
async fn features_that_change_the_price_are_priced_or_refused() {
    let mock = MockUpstream::start("priced").await;
    let model_extra = "  - name: rich\n    price: { input: 1.0, output: 1.0, web_search_calls: 25.0 }\n    service_tiers:\n      priority: { input: 2.0, output: 4.0 }\n    targets: [{ backend: mock, model: rich-up }]\n";
    let yaml = policy(
        &mock,
        "passthrough_parameters: [top_k]\n",
        model_extra,
        "  - { name: t }\n",
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("t").await;
    let ask = |extra: Value, model: &str| {
        let mut body = json!({"model": model, "max_tokens": 10, "messages": user(json!("hello"))});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    // Refused: a field nobody can price, a tier or feature the model has no price for, a
    // built-in tool.
    for (extra, model) in [
        (json!({"surprise": true}), "m"),
        (json!({"service_tier": "priority"}), "m"),
        (json!({"service_tier": "flex"}), "rich"),
        (
            json!({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}),
            "rich",
        ),
        (json!({"web_search_options": {}}), "m"),
        (json!({"tools": [{"type": "web_search_preview"}]}), "m"),
    ] {
        let r = gw.chat(&key, &ask(extra.clone(), model)).await;
        assert_eq!(
            status_and_code(r).await,
            (400, "unsupported_parameter".into()),
            "{extra} on {model}"
        );
    }
    let audio_in =
        json!([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]);
    let r = gw
        .chat(&key, &json!({"model": "m", "messages": user(audio_in)}))
        .await;
    assert_eq!(
        status_and_code(r).await,
        (400, "unsupported_parameter".into())
    );
    assert!(
        mock.received().is_empty(),
        "nothing refused reached the provider"
    );

    // Served and priced: an allowed passthrough field, the default tier, a priced tier, a
    // priced web search.
    for extra in [
        json!({"top_k": 5}),
        json!({"service_tier": "default"}),
        json!({"service_tier": "priority"}),
        json!({"web_search_options": {}}),
    ] {
        let model = if extra.get("top_k").is_some() {
            "m"
        } else {
            "rich"
        };
        let r = gw.chat(&key, &ask(extra.clone(), model)).await;
        assert_eq!(r.status(), 200, "{extra}");
    }
    assert_eq!(mock.received()[0].json()["top_k"], 5);
    // Refused requests have rows too (status 400, billed nothing): 7 of them, then the 4 served.
    let rows = gw.ledger("t", 11).await;
    assert!(rows[..7]
        .iter()
        .all(|r| r.status == 400 && r.cost_micros == 0));
    let rows = &rows[7..];
    let by_cost: Vec<i64> = rows.iter().map(|r| r.cost_micros).collect();
    let tokens = |r: &tollgate_billing::ledger::LedgerRow| r.prompt_tokens + r.completion_tokens;
    // $1/1M (one micro-dollar a token) for the default tier, $2/$4 for priority, and $25 per
    // 1,000 searches on top.
    let default = &rows[1];
    assert_eq!(default.cost_micros, tokens(default), "{by_cost:?}");
    let priority = &rows[2];
    assert_eq!(
        priority.cost_micros,
        (priority.prompt_tokens * 2 + priority.completion_tokens * 4)
    );
    let search = &rows[3];
    assert_eq!(search.cost_micros, tokens(search) + 25_000, "{by_cost:?}");
    drop(gw);
}

#[tokio::test]
async fn reasoning_models_get_max_completion_tokens_and_capped_streams() {
    let mock = MockUpstream::start("reasoner").await;
    let model_extra = "  - name: o\n    reasoning: true\n    price: { input: 1.0, output: 1.0 }\n    targets: [{ backend: mock, model: o-up }]\n";
    let tenants =
        "  - { name: t, default_output_tokens: 64, budgets: [{ limit_usd: 10, period: daily }] }\n";
    let gw = Gateway::start(&policy(&mock, "", model_extra, tenants), None).await;
    let key = gw.create_key("t").await;
    // A stream: its hidden reasoning cannot be watched, so the cap goes upstream, under the
    // name such models take.
    let r = gw
        .chat(
            &key,
            &json!({"model": "o", "stream": true, "messages": user(json!("think"))}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    // A client's max_tokens is renamed for such a model.
    let r = gw
        .chat(
            &key,
            &json!({"model": "o", "max_tokens": 20, "messages": user(json!("think"))}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let sent: Vec<Value> = mock.received().iter().map(|r| r.json()).collect();
    assert_eq!(sent[0]["max_completion_tokens"], 64, "{}", sent[0]);
    assert!(sent[0].get("max_tokens").is_none(), "{}", sent[0]);
    assert_eq!(sent[1]["max_completion_tokens"], 20, "{}", sent[1]);
    assert!(sent[1].get("max_tokens").is_none(), "{}", sent[1]);
    // An ordinary model's stream is not capped upstream (it is watched and extended).
    let r = gw
        .chat(
            &key,
            &json!({"model": "m", "stream": true, "messages": user(json!("talk"))}),
        )
        .await;
    let _ = r.bytes().await.unwrap();
    let sent = mock.received()[2].json();
    assert!(sent.get("max_tokens").is_none() && sent.get("max_completion_tokens").is_none());
    drop(gw);
}

#[tokio::test]
async fn the_providers_usage_is_billed_when_the_client_leaves_at_the_end() {
    let mock = MockUpstream::start("leaver").await;
    mock.behaviour.chunk_delay_ms.store(300, Ordering::SeqCst);
    mock.behaviour.stream_chunks.store(3, Ordering::SeqCst);
    let gw = Gateway::start(&policy(&mock, "", "", "  - { name: t }\n"), None).await;
    let key = gw.create_key("t").await;
    let response = gw
        .chat(
            &key,
            &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": user(json!("hi"))}),
        )
        .await;
    assert_eq!(response.status(), 200);
    // Read every content chunk, then leave before the usage chunk and [DONE].
    let last_word = mock.words(3).pop().unwrap();
    let mut body = response.bytes_stream();
    let mut got = String::new();
    while !got.contains(&last_word) {
        let bytes = body.next().await.unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(&bytes));
    }
    drop(body);
    let row = gw.ledger("t", 1).await.remove(0);
    assert_eq!(row.outcome, "client_closed", "{row:?}");
    assert_eq!(row.usage_source, "provider", "{row:?}");
    assert_eq!(
        row.completion_tokens,
        row.provider_completion_tokens.unwrap()
    );
    drop(gw);
}

#[tokio::test]
async fn a_success_that_cannot_be_read_is_billed_once_and_not_retried() {
    let faulty = FaultUpstream::start().await;
    let good = MockUpstream::start("good").await;
    let mut yaml = format!(
        "backends:\n  - {{ name: faulty, base_url: \"{}\", read_timeout_ms: 2000 }}\n  - {{ name: good, base_url: \"{}\" }}\nmodels:\n",
        faulty.base_url(),
        good.base_url()
    );
    for model in ["bad-json", "short-body"] {
        yaml.push_str(&format!("  - name: {model}\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: faulty, model: {model} }}, {{ backend: good, model: up }}]\n"));
    }
    yaml.push_str("tenants:\n  - { name: t, default_output_tokens: 50 }\n");
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("t").await;
    for model in ["bad-json", "short-body"] {
        let r = gw
            .chat(
                &key,
                &json!({"model": model, "messages": user(json!("hi"))}),
            )
            .await;
        assert_eq!(r.status(), 502, "{model}");
    }
    assert!(
        good.received().is_empty(),
        "a success is never paid for twice"
    );
    let rows = gw.ledger("t", 2).await;
    for row in rows {
        assert_eq!(row.usage_source, "upper_bound", "{row:?}");
        assert_eq!(row.completion_tokens, 50, "{row:?}");
        assert_eq!(row.attempts, 1, "{row:?}");
        assert_eq!(row.cost_micros, row.prompt_tokens + 50, "{row:?}");
    }
    drop(gw);
}

#[tokio::test]
async fn an_upstream_event_that_never_ends_is_cut_not_buffered() {
    let faulty = FaultUpstream::start().await;
    let yaml = format!(
        "backends:\n  - {{ name: faulty, base_url: \"{}\", read_timeout_ms: 20000 }}\nmodels:\n  - name: endless\n    price: {{ input: 1.0, output: 1.0 }}\n    targets: [{{ backend: faulty, model: endless-event }}]\ntenants:\n  - {{ name: t }}\n",
        faulty.base_url()
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("t").await;
    let r = gw
        .chat(
            &key,
            &json!({"model": "endless", "stream": true, "messages": user(json!("hi"))}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(std::time::Duration::from_secs(20), r.text())
        .await
        .expect("the gateway ends the stream itself")
        .unwrap();
    assert!(
        body.contains("fault-word0"),
        "{}",
        &body[..body.len().min(300)]
    );
    assert!(body.contains("upstream_event_too_large"));
    assert!(body.len() < 1 << 16, "the endless event was not relayed");
    let row = gw.ledger("t", 1).await.remove(0);
    assert_eq!(row.outcome, "upstream_closed");
    assert_eq!(row.usage_source, "gateway");
    assert!(row.completion_tokens > 0);
    drop(gw);
}

#[tokio::test]
async fn a_models_allow_list_covers_routes() {
    let mock = MockUpstream::start("routed").await;
    let model_extra = "  - name: big\n    price: { input: 5.0, output: 5.0 }\n    targets: [{ backend: mock, model: big-up }]\n";
    let tenants = "  - { name: by-route, models: [auto] }\n  - { name: both, models: [m, big] }\n  - { name: cheap-only, models: [m] }\n";
    let yaml = policy(&mock, "", model_extra, tenants).replace(
        "tenants:",
        "routes:\n  - { name: auto, cheap: m, premium: big, threshold: 0.5 }\ntenants:",
    );
    let gw = Gateway::start(&yaml, None).await;
    for (tenant, allowed) in [("by-route", true), ("both", true), ("cheap-only", false)] {
        let key = gw.create_key(tenant).await;
        let r = gw
            .chat(
                &key,
                &json!({"model": "auto", "messages": user(json!("hi"))}),
            )
            .await;
        let expected = if allowed { 200 } else { 404 };
        assert_eq!(r.status(), expected, "{tenant}");
        let listed = reqwest::Client::new()
            .get(format!("{}/v1/models", gw.url()))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        let names: Vec<&str> = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(names.contains(&"auto"), allowed, "{tenant}: {names:?}");
    }
    // A route's name is not a back door to models the tenant may not use directly.
    let key = gw.create_key("by-route").await;
    let r = gw
        .chat(
            &key,
            &json!({"model": "big", "messages": user(json!("hi"))}),
        )
        .await;
    assert_eq!(r.status(), 404);
    drop(gw);
}
