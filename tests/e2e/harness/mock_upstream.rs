//! A mock OpenAI-compatible provider for end-to-end tests: answers chat, completions and
//! embeddings (streamed or not), reports usage counted with tiktoken-rs like OpenAI does, records
//! what it received, and can be told to fail, stall or omit usage.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One request as the provider saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("gateway sent JSON")
    }
}

#[derive(Default)]
pub struct Behaviour {
    /// Answer this many requests with 503 before answering normally.
    pub fail_first: AtomicUsize,
    /// Answer every request with this status (0: normal).
    pub always_status: AtomicUsize,
    /// Leave `usage` out of responses and streams.
    pub omit_usage: AtomicBool,
    /// Wait this long before the response header.
    pub header_delay_ms: AtomicU64,
    /// Wait this long between streamed chunks.
    pub chunk_delay_ms: AtomicU64,
    /// Number of content chunks in a stream.
    pub stream_chunks: AtomicUsize,
    /// Refuse every request with 401, echoing the key it was sent like OpenAI does (masked in
    /// the message) and whole in another field, as a careless provider might.
    pub echo_key: AtomicBool,
}

pub struct MockUpstream {
    pub name: String,
    pub addr: SocketAddr,
    pub behaviour: Behaviour,
    received: Mutex<Vec<Received>>,
    /// Completion tokens this provider generated in total (what it would bill).
    pub completion_tokens_served: AtomicU64,
    /// Stream chunks actually written to the socket.
    pub chunks_sent: AtomicUsize,
}

impl MockUpstream {
    pub async fn start(name: &str) -> Arc<MockUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock = Arc::new(MockUpstream {
            name: name.to_string(),
            addr: listener.local_addr().unwrap(),
            behaviour: Behaviour {
                stream_chunks: AtomicUsize::new(5),
                ..Default::default()
            },
            received: Mutex::new(Vec::new()),
            completion_tokens_served: AtomicU64::new(0),
            chunks_sent: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(mock.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        mock
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The words a stream or response of this mock says, so tests can tell backends apart.
    pub fn words(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!(" {}-word{}", self.name, i))
            .collect()
    }
}

fn count(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// Prompt tokens as OpenAI reports them, computed with tiktoken-rs (the independent oracle).
fn prompt_tokens(path: &str, body: &Value) -> u64 {
    if path.ends_with("/chat/completions") {
        let messages: Vec<tiktoken_rs::ChatCompletionRequestMessage> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| tiktoken_rs::ChatCompletionRequestMessage {
                role: m["role"].as_str().unwrap().to_string(),
                content: m["content"].as_str().map(str::to_string),
                name: m["name"].as_str().map(str::to_string),
                ..Default::default()
            })
            .collect();
        tiktoken_rs::num_tokens_from_messages("gpt-4o", &messages).unwrap() as u64
    } else {
        let input = if path.ends_with("/embeddings") {
            &body["input"]
        } else {
            &body["prompt"]
        };
        match input {
            Value::String(s) => count(s),
            Value::Array(items) => items
                .iter()
                .map(|i| count(i.as_str().unwrap_or_default()))
                .sum(),
            _ => 0,
        }
    }
}

async fn handle(
    State(mock): State<Arc<MockUpstream>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let key = bearer(&headers);
    mock.received.lock().unwrap().push(Received {
        path: path.clone(),
        headers,
        body: body.clone(),
    });
    let b = &mock.behaviour;
    let delay = b.header_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if b.echo_key.load(Ordering::SeqCst) {
        let masked = if key.len() > 12 {
            format!(
                "{}{}{}",
                &key[..8],
                "*".repeat(key.len() - 12),
                &key[key.len() - 4..]
            )
        } else {
            key.clone()
        };
        let error = json!({"error": {
            "message": format!("Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
            "debug": format!("Authorization: Bearer {key}")}});
        return (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            error.to_string(),
        )
            .into_response();
    }
    let forced = b.always_status.load(Ordering::SeqCst);
    let failing = b
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if forced != 0 || failing {
        let status = if forced != 0 { forced as u16 } else { 503 };
        let error = json!({"error": {"message": format!("{} is unavailable", mock.name), "type": "server_error", "param": null, "code": null}});
        return (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json"), ("retry-after", "1")],
            error.to_string(),
        )
            .into_response();
    }
    let request: Value = serde_json::from_slice(&body).expect("JSON body");
    let model = request["model"].as_str().unwrap_or_default().to_string();
    let prompt = prompt_tokens(&path, &request);
    let with_usage = !b.omit_usage.load(Ordering::SeqCst);

    if path.ends_with("/embeddings") {
        let n = match &request["input"] {
            Value::Array(items) => items.len(),
            _ => 1,
        };
        let data: Vec<Value> = (0..n)
            .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.125]}))
            .collect();
        let mut reply = json!({"object": "list", "data": data, "model": model});
        if with_usage {
            reply["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
        }
        return json_response(reply);
    }

    let chat = path.ends_with("/chat/completions");
    // Like a real model asked for a long answer: with `max_tokens`, exactly that many tokens
    // (" hello" is one token), in up to 8 chunks; without, the mock's own words.
    let words = match request["max_tokens"]
        .as_u64()
        .or(request["max_completion_tokens"].as_u64())
    {
        Some(max) => {
            let per_chunk = (max as usize).div_ceil(8).max(1);
            let mut left = max as usize;
            let mut chunks = Vec::new();
            while left > 0 {
                let n = per_chunk.min(left);
                chunks.push(" hello".repeat(n));
                left -= n;
            }
            chunks
        }
        None => mock.words(b.stream_chunks.load(Ordering::SeqCst)),
    };
    let text: String = words.concat();
    let completion = count(&text);
    mock.completion_tokens_served
        .fetch_add(completion, Ordering::SeqCst);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                       "prompt_tokens_details": {"cached_tokens": 0}});

    if request["stream"] == json!(true) {
        let include_usage = with_usage && request["stream_options"]["include_usage"] == json!(true);
        let mut events: Vec<String> = Vec::new();
        for word in &words {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": word}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": word, "finish_reason": null})
            };
            let mut chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model, "choices": [choice]});
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            events.push(format!("data: {chunk}\n\n"));
        }
        if include_usage {
            let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage});
            events.push(format!("data: {chunk}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_string());
        let chunk_delay = Duration::from_millis(b.chunk_delay_ms.load(Ordering::SeqCst));
        let stream_mock = mock.clone();
        let stream = futures_util::stream::unfold(events.into_iter(), move |mut events| {
            let mock = stream_mock.clone();
            async move {
                let event = events.next()?;
                if !chunk_delay.is_zero() {
                    tokio::time::sleep(chunk_delay).await;
                }
                mock.chunks_sent.fetch_add(1, Ordering::SeqCst);
                Some((Ok::<_, Infallible>(Bytes::from(event)), events))
            }
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap();
    }

    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": text, "finish_reason": "stop"})
    };
    let mut reply = json!({"id": "chatcmpl-mock", "object": if chat { "chat.completion" } else { "text_completion" },
                           "created": 0, "model": model, "choices": [choice]});
    if with_usage {
        reply["usage"] = usage;
    }
    json_response(reply)
}

/// The bearer token a request carried.
fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

fn json_response(value: Value) -> Response {
    ([("content-type", "application/json")], value.to_string()).into_response()
}
