//! Proxying: rewriting, streaming, fallbacks, big bodies.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::{policy, Gateway, MockUpstream};

fn chat(content: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]})
}

#[tokio::test]
async fn chat_is_rewritten_proxied_and_metered() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;

    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip")
        .json(&chat("Say hello."))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-request-id").is_some());
    assert!(response.headers().get("content-encoding").is_none());
    let body: Value = response.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text, mock.words(5).concat());

    let received = mock.received();
    assert_eq!(received.len(), 1);
    let sent = &received[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.json()["model"], "upstream-alpha", "model rewritten");
    assert_eq!(sent.json()["messages"], chat("Say hello.")["messages"]);
    assert_eq!(sent.headers["authorization"], "Bearer sk-provider-secret");
    assert!(
        sent.headers.get("accept-encoding").is_none(),
        "encoding headers stripped"
    );
    let all_headers = format!("{:?}", sent.headers);
    assert!(
        !all_headers.contains(&key),
        "tenant key must never reach the provider"
    );

    let rows = gw.ledger("acme", 1).await;
    let row = &rows[0];
    assert_eq!(
        (row.status, row.outcome.as_str(), row.stream),
        (200, "ok", false)
    );
    assert_eq!(row.model, "gpt-test");
    assert_eq!(row.backend.as_deref(), Some("alpha"));
    assert_eq!(row.upstream_model.as_deref(), Some("upstream-alpha"));
    assert_eq!(row.usage_source, "provider");
    assert_eq!(
        row.provider_prompt_tokens,
        Some(row.counted_prompt_tokens),
        "our count equals the provider's (tiktoken)"
    );
    assert_eq!(
        row.provider_completion_tokens,
        Some(row.counted_completion_tokens)
    );
    assert_eq!(row.prompt_tokens, row.counted_prompt_tokens);
    // $2.50 / $10 per 1M tokens, in micro-dollars, rounded once.
    let expected = (row.prompt_tokens as u128 * 2_500_000
        + row.completion_tokens as u128 * 10_000_000
        + 500_000)
        / 1_000_000;
    assert_eq!(row.cost_micros as u128, expected);
    assert_eq!(row.attempts, 1);
    assert_eq!(
        row.tags.as_deref(),
        Some(r#"{"cost_center":"cc-42","team":"platform"}"#),
        "chargeback tags"
    );
}

async fn read_sse(response: reqwest::Response) -> (Vec<Value>, bool, Vec<Duration>) {
    let started = Instant::now();
    let mut arrivals = Vec::new();
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        arrivals.push(started.elapsed());
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let mut events = Vec::new();
    let mut done = false;
    for event in buffer.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event.strip_prefix("data: ").expect("data event");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done, arrivals)
}

#[tokio::test]
async fn streams_event_by_event_and_hides_usage_unless_asked() {
    let mock = MockUpstream::start("alpha").await;
    mock.behaviour.chunk_delay_ms.store(150, Ordering::SeqCst);
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;

    let mut request = chat("Stream please.");
    request["stream"] = json!(true);
    let response = gw.chat(&key, &request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, done, arrivals) = read_sse(response).await;
    assert!(done);
    assert_eq!(
        events.len(),
        5,
        "no usage chunk for a client that did not ask: {events:?}"
    );
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, mock.words(5).concat());
    // Events arrive as the provider sends them (150 ms apart), not in one piece at the end.
    assert!(arrivals.len() >= 5, "events were buffered: {arrivals:?}");
    assert_eq!(
        mock.received()[0].json()["stream_options"]["include_usage"],
        true,
        "usage requested upstream"
    );

    request["stream_options"] = json!({"include_usage": true});
    let response = gw.chat(&key, &request).await;
    let (events, done, _) = read_sse(response).await;
    assert!(done);
    assert_eq!(events.len(), 6);
    let usage = &events[5]["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);

    let rows = gw.ledger("acme", 2).await;
    for row in &rows {
        assert!(row.stream);
        assert_eq!(row.usage_source, "provider");
        assert_eq!(
            row.provider_completion_tokens,
            Some(row.counted_completion_tokens)
        );
        assert_eq!(
            row.completion_tokens as u64,
            usage["completion_tokens"].as_u64().unwrap()
        );
        assert!(row.ttft_ms.is_some());
        assert!(row.ttft_ms.unwrap() < row.latency_ms);
    }
}

#[tokio::test]
async fn counts_streamed_output_when_the_provider_reports_no_usage() {
    let mock = MockUpstream::start("alpha").await;
    mock.behaviour.omit_usage.store(true, Ordering::SeqCst);
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let mut request = chat("No usage from this one.");
    request["stream"] = json!(true);
    let response = gw.chat(&key, &request).await;
    let (events, done, _) = read_sse(response).await;
    assert!(done && events.len() == 5);

    let row = &gw.ledger("acme", 1).await[0];
    assert_eq!(row.usage_source, "gateway");
    assert_eq!(row.provider_completion_tokens, None);
    let expected = tiktoken_rs::o200k_base()
        .unwrap()
        .encode_ordinary(&mock.words(5).concat())
        .len();
    assert_eq!(row.completion_tokens as usize, expected);
    assert_eq!(row.completion_tokens, row.counted_completion_tokens);
    assert!(row.cost_micros > 0);
}

#[tokio::test]
async fn one_mebibyte_prompt_falls_back_intact_after_a_503() {
    let first = MockUpstream::start("first").await;
    let second = MockUpstream::start("second").await;
    first.behaviour.fail_first.store(1, Ordering::SeqCst);
    let gw = Gateway::start(
        &policy(
            &[("first", first.base_url()), ("second", second.base_url())],
            "",
        ),
        None,
    )
    .await;
    let key = gw.create_key("acme").await;

    // 1 MiB of varied text: far beyond Pingora's 64 KiB retry buffer.
    let mut prompt = String::new();
    let mut i = 0u64;
    while prompt.len() < 1 << 20 {
        prompt.push_str(&format!(
            "line {i}: the quick brown fox {} jumps; ",
            i * 7919 % 10007
        ));
        i += 1;
    }
    let response = gw.chat(&key, &chat(&prompt)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        second.words(5).concat()
    );

    let to_first = first.received();
    let to_second = second.received();
    assert_eq!((to_first.len(), to_second.len()), (1, 1));
    assert_eq!(
        to_first[0].json()["messages"][1]["content"]
            .as_str()
            .unwrap(),
        prompt,
        "first attempt intact"
    );
    assert_eq!(
        to_second[0].json()["messages"][1]["content"]
            .as_str()
            .unwrap(),
        prompt,
        "retry intact"
    );
    assert_eq!(to_second[0].json()["model"], "upstream-second");

    let row = &gw.ledger("acme", 1).await[0];
    assert_eq!((row.attempts, row.backend.as_deref()), (2, Some("second")));
    assert_eq!(row.provider_prompt_tokens, Some(row.counted_prompt_tokens));
}

#[tokio::test]
async fn connect_failure_falls_back_and_a_stream_waits_for_its_first_byte() {
    let dead = format!(
        "http://127.0.0.1:{}/v1",
        crate::harness::gateway::free_port()
    );
    let alive = MockUpstream::start("alive").await;
    let gw = Gateway::start(
        &policy(&[("dead", dead), ("alive", alive.base_url())], ""),
        None,
    )
    .await;
    let key = gw.create_key("acme").await;
    let mut request = chat("hi");
    request["stream"] = json!(true);
    let response = gw.chat(&key, &request).await;
    assert_eq!(response.status(), 200);
    let (events, done, _) = read_sse(response).await;
    assert!(done && events.len() == 5);
    let row = &gw.ledger("acme", 1).await[0];
    assert_eq!(
        (row.attempts, row.backend.as_deref(), row.outcome.as_str()),
        (2, Some("alive"), "ok")
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_not_retried_and_is_billed_for_what_it_got() {
    let first = MockUpstream::start("first").await;
    let second = MockUpstream::start("second").await;
    first.behaviour.chunk_delay_ms.store(300, Ordering::SeqCst);
    first.behaviour.stream_chunks.store(20, Ordering::SeqCst);
    let gw = Gateway::start(
        &policy(
            &[("first", first.base_url()), ("second", second.base_url())],
            "",
        ),
        None,
    )
    .await;
    let key = gw.create_key("acme").await;
    let mut request = chat("long story");
    request["stream"] = json!(true);
    let response = gw.chat(&key, &request).await;
    let mut stream = response.bytes_stream();
    let mut got = String::new();
    while !got.contains("word1") {
        got.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);

    let row = &gw.ledger("acme", 1).await[0];
    assert_eq!(row.outcome, "client_closed");
    assert_eq!(row.usage_source, "gateway");
    assert!(
        row.completion_tokens > 0 && row.completion_tokens < 20 * 3,
        "billed the delivered part: {row:?}"
    );
    assert_eq!(second.received().len(), 0, "never retried elsewhere");
    // The provider's stream was abandoned, not read to the end.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(first.chunks_sent.load(Ordering::SeqCst) < 20);
}

#[tokio::test]
async fn completions_embeddings_and_models() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let other = gw.create_key("other").await;
    let client = reqwest::Client::new();

    let r = client
        .post(format!("{}/v1/completions", gw.url()))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-test", "prompt": "Once upon a time"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{}/v1/embeddings", gw.url()))
        .bearer_auth(&key)
        .json(&json!({"model": "embed-test", "input": ["first text", "second text"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(mock.received()[1].path, "/v1/embeddings");

    let models: Value = client
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["embed-test"], "a tenant sees only its models");

    let rows = gw.ledger("acme", 2).await;
    let embed = rows.iter().find(|r| r.endpoint == "embeddings").unwrap();
    assert_eq!(embed.usage_source, "provider");
    assert_eq!(
        embed.provider_prompt_tokens,
        Some(embed.counted_prompt_tokens)
    );
    assert_eq!(embed.completion_tokens, 0);
    let completion = rows.iter().find(|r| r.endpoint == "completions").unwrap();
    assert_eq!(
        completion.provider_prompt_tokens,
        Some(completion.counted_prompt_tokens)
    );
}

#[tokio::test]
async fn prompt_counts_equal_tiktoken_on_a_varied_corpus() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let corpus = [
        "Plain English: the committee will reconvene on Tuesday to review the budget.",
        "fn main() {\n    let xs: Vec<u64> = (1..=10).map(|x| x * x).collect();\n    println!(\"{:?}\", xs);\n}",
        "SELECT user_id, SUM(amount) FROM payments GROUP BY 1 HAVING SUM(amount) > 100;",
        "深度学习模型需要大量数据。日本語のテキストも含まれます。한국어도 있습니다.",
        "Emoji mix 🚀🔥👩‍💻 with flags 🇯🇵🇧🇷 and symbols ∑∫√ ≠ ≤ ≥",
        "Mixed\ttabs\n\nand    spaces   and trailing newline\n",
        "مرحبا بالعالم — Привет, мир — Γειά σου Κόσμε",
    ];
    for text in corpus {
        let r = gw.chat(&key, &chat(text)).await;
        assert_eq!(r.status(), 200);
    }
    let rows = gw.ledger("acme", corpus.len()).await;
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let tokens = |t: &str| o200k.encode_ordinary(t).len();
    // 3 framing tokens per message + role + content, and 3 to prime the reply.
    let mut expected: Vec<usize> = corpus
        .iter()
        .map(|text| {
            3 + tokens("system") + tokens("Be brief.") + 3 + tokens("user") + tokens(text) + 3
        })
        .collect();
    let mut counted: Vec<usize> = rows
        .iter()
        .map(|r| r.counted_prompt_tokens as usize)
        .collect();
    expected.sort();
    counted.sort();
    assert_eq!(counted, expected);
    for row in &rows {
        assert_eq!(row.provider_prompt_tokens, Some(row.counted_prompt_tokens));
    }
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_stops_the_fallbacks() {
    let first = MockUpstream::start("first").await;
    let second = MockUpstream::start("second").await;
    first.behaviour.header_delay_ms.store(800, Ordering::SeqCst);
    first.behaviour.always_status.store(503, Ordering::SeqCst);
    let gw = Gateway::start(
        &policy(
            &[("first", first.base_url()), ("second", second.base_url())],
            "",
        ),
        None,
    )
    .await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let result = client
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(&key)
        .json(&chat("hi"))
        .send()
        .await;
    assert!(result.is_err(), "the client gave up");

    let row = &gw.ledger("acme", 1).await[0];
    assert_eq!(
        (row.status, row.outcome.as_str(), row.cost_micros),
        (499, "client_closed", 0)
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(first.received().len(), 1);
    assert_eq!(
        second.received().len(),
        0,
        "a departed client is never retried elsewhere"
    );
}
