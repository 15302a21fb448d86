//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, plus `/health` and `/metrics`. With a [`Token`], every route asks for it as a
//! bearer token (the gateway's per-process secret), so no other process can use the runtime
//! unmetered.

use crate::engine::{Engine, Event, Job, Outcome};
use crate::sampling::SamplingParams;
use crate::template::{ChatMessage, ChatTemplate};
use crate::tokenizer::ModelTokenizer;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::mpsc;

pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<ModelTokenizer>,
    pub template: ChatTemplate,
    /// The name the model answers to (besides `default`).
    pub model_name: String,
    pub context_length: usize,
    /// Requests allowed to wait for a slot before new ones get 503.
    pub max_queue: u64,
    pub default_temperature: f32,
    pub default_top_p: f32,
}

/// The runtime's API; with `token`, every request must carry it (see [`require_token`]).
pub fn router(state: Arc<AppState>, token: Option<Token>) -> Router {
    let routes = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(state);
    require_token(routes, token)
}

/// The bearer token a runtime requires: the gateway's per-process secret, or one an operator
/// chose. Compared in constant time; its `Debug` never shows it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// `None` for an empty (or all-blank) value: an empty token would protect nothing.
    pub fn new(value: &str) -> Option<Token> {
        let value = value.trim();
        (!value.is_empty()).then(|| Token(Arc::from(value)))
    }

    /// The token in environment variable `var`; `None` when it is unset or blank.
    pub fn from_env(var: &str) -> Option<Token> {
        std::env::var(var).ok().and_then(|v| Token::new(&v))
    }

    /// 32 random bytes from the OS, as 64 hex digits.
    pub fn random() -> Token {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Token(Arc::from(hex))
    }

    /// The secret itself, for the `Authorization` header of the one client that holds it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        presented.ct_eq(self.0.as_bytes()).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

/// Wraps `routes` so that every request needs `Authorization: Bearer <token>`; others get an
/// OpenAI-shaped 401. Without a token, `routes` is returned as it is.
pub fn require_token(routes: Router, token: Option<Token>) -> Router {
    match token {
        Some(token) => routes.layer(axum::middleware::from_fn_with_state(token, check_token)),
        None => routes,
    }
}

async fn check_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| &v[7..]);
    if presented.is_some_and(|p| token.matches(p)) {
        return next.run(request).await;
    }
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "This runtime serves only the gateway that started it: a valid bearer token \
                  is required."
            .into(),
        kind: "invalid_request_error",
        code: "invalid_api_key",
    }
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// An OpenAI-shaped error.
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: &'static str,
}

impl ApiError {
    fn bad_request(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": null}});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both completion endpoints.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    n: Option<u32>,
    /// Extension: `false` turns speculation off for this request.
    speculative: Option<bool>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}"), "invalid_request"))
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return ApiError::bad_request(
                            format!(
                                "Content part type `{}` is not supported by this model.",
                                p.kind
                            ),
                            "unsupported_content",
                        )
                        .into_response();
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        messages.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    if messages.is_empty() {
        return ApiError::bad_request("`messages` must not be empty.", "invalid_request")
            .into_response();
    }
    let prompt = match s.template.render(&messages) {
        Ok(p) => p,
        Err(e) => return ApiError::bad_request(e.to_string(), "invalid_messages").into_response(),
    };
    generate(s, req.common, prompt, Kind::Chat).await
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match req.prompt {
        Value::String(p) => p,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return ApiError::bad_request("`prompt` must be a string.", "invalid_prompt")
                .into_response()
        }
    };
    generate(s, req.common, prompt, Kind::Text).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn generate(s: Arc<AppState>, c: Common, prompt: String, kind: Kind) -> Response {
    if c.model != s.model_name && c.model != "default" {
        return ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{}` does not exist; this server serves `{}`.",
                c.model, s.model_name
            ),
            kind: "invalid_request_error",
            code: "model_not_found",
        }
        .into_response();
    }
    let temperature = c.temperature.unwrap_or(s.default_temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return ApiError::bad_request(
            "`temperature` must be between 0 and 2.",
            "invalid_temperature",
        )
        .into_response();
    }
    let top_p = c.top_p.unwrap_or(s.default_top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return ApiError::bad_request("`top_p` must be in (0, 1].", "invalid_top_p")
            .into_response();
    }
    if c.n.unwrap_or(1) != 1 {
        return ApiError::bad_request("Only `n: 1` is supported.", "invalid_n").into_response();
    }
    let stops = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > 4 {
        return ApiError::bad_request("At most 4 stop sequences are allowed.", "invalid_stop")
            .into_response();
    }
    let ids = match s.tokenizer.encode(&prompt, true) {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => {
            return ApiError::bad_request("The prompt is empty.", "invalid_prompt").into_response()
        }
        Err(e) => return ApiError::bad_request(e.to_string(), "invalid_prompt").into_response(),
    };
    let room = s.context_length.saturating_sub(ids.len());
    let asked = c.max_completion_tokens.or(c.max_tokens);
    if room == 0 || asked.is_some_and(|m| m > room) {
        let msg = format!(
            "This model's maximum context length is {} tokens; the prompt has {} and {} completion tokens were requested.",
            s.context_length,
            ids.len(),
            asked.unwrap_or(1)
        );
        return ApiError::bad_request(msg, "context_length_exceeded").into_response();
    }
    if asked == Some(0) {
        return ApiError::bad_request("`max_tokens` must be at least 1.", "invalid_max_tokens")
            .into_response();
    }
    if s.engine.metrics.queued.load(Relaxed) >= s.max_queue {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The local model is at capacity; retry shortly.".into(),
            kind: "server_error",
            code: "overloaded",
        }
        .into_response();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: ids,
        params: SamplingParams { temperature, top_p },
        max_tokens: asked.unwrap_or(room),
        stops,
        seed: c.seed,
        speculate: c.speculative.unwrap_or(true),
        events: tx,
    };
    if let Err(e) = s.engine.submit(job) {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: e.to_string(),
            kind: "server_error",
            code: "engine_stopped",
        }
        .into_response();
    }
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        uuid::Uuid::new_v4().simple()
    );
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let meta = Meta {
        id,
        created,
        model: s.model_name.clone(),
        kind,
    };
    if c.stream {
        stream_response(rx, meta, c.stream_options.is_some_and(|o| o.include_usage))
    } else {
        whole_response(rx, meta).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

fn usage_json(o: &Outcome) -> Value {
    json!({
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "speculative": o.speculation,
    })
}

async fn whole_response(mut rx: mpsc::UnboundedReceiver<Event>, m: Meta) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Error(e) => {
                return ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: e,
                    kind: "server_error",
                    code: "generation_failed",
                }
                .into_response()
            }
            Event::Done(o) => {
                let choice = match m.kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": o.finish_reason})
                    }
                    Kind::Text => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": o.finish_reason})
                    }
                };
                let object = if m.kind == Kind::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Json(json!({
                    "id": m.id, "object": object, "created": m.created, "model": m.model,
                    "choices": [choice], "usage": usage_json(&o), "system_fingerprint": null,
                }))
                .into_response();
            }
        }
    }
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "generation ended early".into(),
        kind: "server_error",
        code: "generation_failed",
    }
    .into_response()
}

fn stream_response(rx: mpsc::UnboundedReceiver<Event>, m: Meta, include_usage: bool) -> Response {
    let object = if m.kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choices: Value, usage: Option<Value>| -> Bytes {
        let mut v = json!({"id": m.id, "object": object, "created": m.created, "model": m.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let kind = m.kind;
    let delta = move |text: Option<&str>, finish: Option<&Outcome>| -> Value {
        let finish_reason = finish
            .map(|o| json!(o.finish_reason))
            .unwrap_or(Value::Null);
        match kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}])
            }
            Kind::Text => {
                json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason}])
            }
        }
    };
    let first = (kind == Kind::Chat).then(|| chunk(delta(None, None), None));
    let stream = futures_util::stream::unfold(
        (rx, Some(first), false),
        move |(mut rx, first, done)| {
            let chunk = chunk.clone();
            async move {
                if let Some(Some(f)) = first {
                    return Some((Ok::<_, std::convert::Infallible>(f), (rx, None, false)));
                }
                if done {
                    return None;
                }
                match rx.recv().await {
                    Some(Event::Delta(t)) => {
                        Some((Ok(chunk(delta(Some(&t), None), None)), (rx, None, false)))
                    }
                    Some(Event::Done(o)) => {
                        let mut out = chunk(delta(None, Some(&o)), None).to_vec();
                        if include_usage {
                            out.extend_from_slice(&chunk(json!([]), Some(usage_json(&o))));
                        }
                        out.extend_from_slice(b"data: [DONE]\n\n");
                        Some((Ok(Bytes::from(out)), (rx, None, true)))
                    }
                    Some(Event::Error(e)) => {
                        let err = json!({"error": {"message": e, "type": "server_error", "code": "generation_failed"}});
                        Some((
                            Ok(Bytes::from(format!("data: {err}\n\n"))),
                            (rx, None, true),
                        ))
                    }
                    None => None,
                }
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("static headers")
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let entry = |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate-runtime", "context_length": s.context_length});
    Json(json!({"object": "list", "data": [entry(&s.model_name), entry("default")]}))
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.engine.metrics.render(&s.model_name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn call(token: Option<Token>, authorization: Option<&str>) -> (StatusCode, Value) {
        let app = require_token(
            Router::new().route("/v1/models", get(|| async { Json(json!({"ok": true})) })),
            token,
        );
        let mut request = axum::http::Request::get("/v1/models");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let response = app
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn with_a_token_only_requests_that_carry_it_are_served() {
        let token = Token::new("s3cret-token").unwrap();
        for refused in [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer s3cret-toke"),
            Some("Bearer s3cret-token2"),
            Some("Basic s3cret-token"),
            Some("s3cret-token"),
        ] {
            let (status, body) = call(Some(token.clone()), refused).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{refused:?}");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            assert!(!body.to_string().contains("s3cret"), "{body}");
        }
        for accepted in ["Bearer s3cret-token", "bearer s3cret-token"] {
            let (status, body) = call(Some(token.clone()), Some(accepted)).await;
            assert_eq!((status, body), (StatusCode::OK, json!({"ok": true})));
        }
        // No token configured: open (a loopback-only standalone runtime).
        assert_eq!(call(None, None).await.0, StatusCode::OK);
    }

    #[test]
    fn tokens_are_random_hex_never_empty_and_never_printed() {
        let (a, b) = (Token::random(), Token::random());
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(a.expose()));
        assert!(Token::new("  ").is_none() && Token::new("").is_none());
        assert!(a.matches(a.expose().as_bytes()) && !a.matches(b.expose().as_bytes()));
    }
}
