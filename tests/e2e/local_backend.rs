//! A `kind: local` backend: `tollgate serve` starts the bundled runtime on the real default
//! model, routes to it like any backend, and meters the runtime's exact token counts.

use crate::harness::Gateway;
use serde_json::{json, Value};
use std::path::PathBuf;

fn model_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/fetch-model"))
        .output()
        .expect("scripts/fetch-model");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    root.join(String::from_utf8(out.stdout).unwrap().trim())
        .canonicalize()
        .unwrap()
}

fn local_policy() -> String {
    format!(
        "backends:\n  - {{ name: local, kind: local, model_path: \"{}\", speculate: ngram, slots: 2 }}\n\
         models:\n  - name: smol\n    price: {{ input: 1.0, output: 2.0 }}\n    targets:\n      - {{ backend: local, model: default }}\n\
         tenants:\n  - name: acme\n",
        model_path().display()
    )
}

#[tokio::test]
async fn local_backend_answers_and_is_metered_with_its_own_token_counts() {
    let gw = Gateway::start(&local_policy(), None).await;
    let key = gw.create_key("acme").await;
    let body = json!({
        "model": "smol",
        "messages": [{"role": "user", "content": "Repeat exactly: the cat sat on the mat. the cat sat on the mat."}],
        "temperature": 0,
        "max_tokens": 24,
    });
    let r = gw.chat(&key, &body).await;
    assert_eq!(r.status(), 200, "{}", gw.log());
    let v: Value = r.json().await.unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_i64().unwrap(),
        usage["completion_tokens"].as_i64().unwrap(),
    );
    assert!(prompt > 20 && (1..=24).contains(&completion), "{usage}");
    assert_eq!(usage["speculative"]["mode"], "ngram");

    // Streamed: the gateway asks the runtime for the usage chunk and bills from it.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let r = gw.chat(&key, &stream_body).await;
    assert_eq!(r.status(), 200);
    let sse = r.text().await.unwrap();
    let streamed: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        streamed, text,
        "greedy: the stream says what the whole response said"
    );

    let rows = gw.ledger("acme", 2).await;
    for row in &rows {
        assert_eq!(row.backend.as_deref(), Some("local"));
        assert_eq!(row.usage_source, "provider");
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (prompt, completion),
            "{row:?}"
        );
        // $1 / $2 per 1M tokens, in micro-dollars.
        assert_eq!(row.cost_micros, prompt + 2 * completion);
        let spec = row
            .speculation
            .expect("the runtime's speculation report reaches the ledger");
        assert!(spec.tokens_per_pass >= 1.0, "{spec:?}");
    }
}

#[tokio::test]
async fn a_missing_model_file_stops_serve_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.yaml");
    std::fs::write(
        &config,
        "listen: [\"127.0.0.1:1\"]\ndatabase_url: sqlite://x.db\nbackends:\n  - { name: local, kind: local, model_path: /nonexistent/m.gguf }\n\
         models:\n  - { name: smol, targets: [{ backend: local, model: default }] }\ntenants:\n  - name: acme\n",
    )
    .unwrap();
    let out = crate::harness::gateway::tollgate(&config, &["serve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/m.gguf") && err.contains("not found"),
        "{err}"
    );
}

#[tokio::test]
async fn only_the_gateway_can_use_its_local_runtime() {
    // A fixed loopback port, so that this test can knock on the runtime's door itself.
    let port = crate::harness::gateway::free_port();
    let policy = local_policy().replace(
        "slots: 2 }",
        &format!("slots: 1, listen: \"127.0.0.1:{port}\" }}"),
    );
    let gw = Gateway::start(&policy, None).await;
    let key = gw.create_key("acme").await;
    let body = json!({
        "model": "smol",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
    });
    let r = gw.chat(&key, &body).await;
    assert_eq!(
        r.status(),
        200,
        "the gateway holds the runtime's secret: {}",
        gw.log()
    );

    // Any other local process: no token, a tenant key, a wrong token. All refused, OpenAI-shaped.
    let direct = reqwest::Client::new();
    for bearer in [None, Some(key.as_str()), Some("0000")] {
        for path in ["/v1/chat/completions", "/v1/models", "/metrics"] {
            let mut request = if path == "/v1/chat/completions" {
                direct
                    .post(format!("http://127.0.0.1:{port}{path}"))
                    .json(&body)
            } else {
                direct.get(format!("http://127.0.0.1:{port}{path}"))
            };
            if let Some(bearer) = bearer {
                request = request.bearer_auth(bearer);
            }
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} with {bearer:?}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        }
    }
    // Only the one request the gateway made was served (and billed).
    assert_eq!(gw.ledger("acme", 1).await.len(), 1);
}

#[test]
fn a_runtime_off_loopback_needs_a_token_env() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.yaml");
    let text = |extra: &str| {
        format!(
            "listen: [\"127.0.0.1:1\"]\ndatabase_url: sqlite://x.db\nbackends:\n  - {{ name: local, kind: local, model_path: /nonexistent/m.gguf, listen: \"0.0.0.0:8090\"{extra} }}\n\
             models:\n  - {{ name: smol, targets: [{{ backend: local, model: default }}] }}\ntenants:\n  - name: acme\n"
        )
    };
    std::fs::write(&config, text("")).unwrap();
    let out = crate::harness::gateway::tollgate(&config, &["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("backends[0].listen") && err.contains("token_env"),
        "{err}"
    );
    std::fs::write(&config, text(", token_env: TOLLGATE_TEST_RUNTIME_TOKEN")).unwrap();
    let out = crate::harness::gateway::tollgate(&config, &["config", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
