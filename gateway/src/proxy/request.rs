//! The client's request: validated once, counted once, and re-serialised per upstream attempt.

use bytes::Bytes;
use serde_json::{Map, Value};
use tollgate_billing::tokens::Tokenizer;

use super::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    /// Appended to a backend's base URL (which ends in `/v1` for OpenAI).
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// Name recorded in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// Longest model name accepted (it is stored on the ledger row and echoed in errors).
pub const MAX_MODEL_BYTES: usize = 256;

#[derive(Debug)]
pub struct ClientRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub wants_usage: bool,
    body: Map<String, Value>,
}

impl ClientRequest {
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<ClientRequest, ApiError> {
        let value: Value = serde_json::from_slice(bytes).map_err(ApiError::invalid_json)?;
        let Value::Object(body) = value else {
            return Err(ApiError::bad_request(
                "The request body must be a JSON object.",
            ));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if m.len() > MAX_MODEL_BYTES => {
                return Err(ApiError::bad_request(format!(
                    "`model` is longer than {MAX_MODEL_BYTES} bytes."
                ))
                .with_param("model"))
            }
            Some(Value::String(m)) if m.chars().any(char::is_control) => {
                return Err(
                    ApiError::bad_request("`model` must not contain control characters.")
                        .with_param("model"),
                )
            }
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(ApiError::bad_request("You must provide a model parameter.")
                    .with_param("model"))
            }
            Some(_) => {
                return Err(ApiError::bad_request("`model` must be a string.").with_param("model"))
            }
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(
                    ApiError::bad_request("`stream` must be a boolean.").with_param("stream")
                )
            }
        };
        let wants_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => match options.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "`stream_options.include_usage` must be a boolean.",
                    )
                    .with_param("stream_options"))
                }
            },
            Some(_) => {
                return Err(ApiError::bad_request("`stream_options` must be an object.")
                    .with_param("stream_options"))
            }
        };
        for param in ["max_tokens", "max_completion_tokens", "n"] {
            match body.get(param) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) if n.as_u64().is_some() => {}
                Some(_) => {
                    return Err(ApiError::bad_request(format!(
                        "`{param}` must be a non-negative integer."
                    ))
                    .with_param(param_name(param)))
                }
            }
        }
        match endpoint {
            Endpoint::ChatCompletions => validate_messages(body.get("messages"))?,
            Endpoint::Completions => validate_text_input(body.get("prompt"), "prompt")?,
            Endpoint::Embeddings => {
                validate_text_input(body.get("input"), "input")?;
                if stream {
                    return Err(ApiError::bad_request("Embeddings cannot be streamed.")
                        .with_param("stream"));
                }
            }
        }
        Ok(ClientRequest {
            endpoint,
            model,
            stream,
            wants_usage,
            body,
        })
    }

    /// Prompt tokens as OpenAI counts them, chat framing included.
    pub fn count_prompt_tokens(&self, tokenizer: Tokenizer) -> usize {
        match self.endpoint {
            Endpoint::ChatCompletions => {
                let messages = self
                    .body
                    .get("messages")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice);
                tokenizer.count_chat(messages.unwrap_or_default(), self.body.get("tools"))
            }
            Endpoint::Completions => {
                tokenizer.count_input(self.body.get("prompt").unwrap_or(&Value::Null))
            }
            Endpoint::Embeddings => {
                tokenizer.count_input(self.body.get("input").unwrap_or(&Value::Null))
            }
        }
    }

    /// A top-level field of the request body.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.body.get(name)
    }

    /// The client's own output cap (`max_completion_tokens` or `max_tokens`), per choice.
    pub fn max_output_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| self.body.get(*k).and_then(Value::as_u64))
    }

    /// Number of choices asked for (`n`); each may produce up to the output cap.
    pub fn choices(&self) -> u64 {
        self.body
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1)
    }

    /// The body for one upstream: `model` rewritten, for streams usage requested from the
    /// provider (so the ledger bills the provider's own count), and `max_tokens` set to
    /// `output_cap` when the client set none (so a reservation bounds the output).
    pub fn upstream_body(&self, upstream_model: &str, output_cap: Option<u64>) -> Bytes {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(upstream_model.to_string()));
        if let Some(cap) = output_cap.filter(|_| self.max_output_tokens().is_none()) {
            body.insert("max_tokens".into(), Value::from(cap));
        }
        if self.stream {
            let options = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

fn param_name(param: &str) -> &'static str {
    match param {
        "max_tokens" => "max_tokens",
        "max_completion_tokens" => "max_completion_tokens",
        _ => "n",
    }
}

fn validate_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let err = |m: String| Err(ApiError::bad_request(m).with_param("messages"));
    let Some(messages) = messages else {
        return err("Missing required parameter: 'messages'.".into());
    };
    let Some(list) = messages.as_array() else {
        return err("`messages` must be an array.".into());
    };
    if list.is_empty() {
        return err("`messages` must contain at least one message.".into());
    }
    for (i, message) in list.iter().enumerate() {
        let Some(fields) = message.as_object() else {
            return err(format!("`messages[{i}]` must be an object."));
        };
        match fields.get("role") {
            Some(Value::String(_)) => {}
            _ => {
                return err(format!(
                    "`messages[{i}].role` is required and must be a string."
                ))
            }
        }
        match fields.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Array(_)) => {}
            Some(_) => {
                return err(format!(
                    "`messages[{i}].content` must be a string or an array of parts."
                ))
            }
        }
    }
    Ok(())
}

fn validate_text_input(input: Option<&Value>, name: &'static str) -> Result<(), ApiError> {
    match input {
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if !items.is_empty() => Ok(()),
        Some(Value::Array(_)) => {
            Err(ApiError::bad_request(format!("`{name}` must not be empty.")).with_param(name))
        }
        None | Some(Value::Null) => Err(ApiError::bad_request(format!(
            "Missing required parameter: '{name}'."
        ))
        .with_param(name)),
        Some(_) => Err(
            ApiError::bad_request(format!("`{name}` must be a string or an array."))
                .with_param(name),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> Result<ClientRequest, ApiError> {
        ClientRequest::parse(endpoint, body.as_bytes())
    }

    #[test]
    fn refuses_model_names_that_cannot_be_stored() {
        let chat = Endpoint::ChatCompletions;
        let long = "m".repeat(MAX_MODEL_BYTES + 1);
        for model in ["x\\u0000", "gpt\\u0007", "a\\nb", "\\u009f", long.as_str()] {
            let body =
                format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"x"}}]}}"#);
            let error = parse(chat, &body).unwrap_err();
            assert_eq!((error.status, error.param), (400, Some("model")), "{model}");
        }
        // A lone surrogate is not valid UTF-8 text: refused by the JSON parser.
        let body = r#"{"model":"\ud800","messages":[{"role":"user","content":"x"}]}"#;
        assert_eq!(parse(chat, body).unwrap_err().status, 400);
        let ok = "m".repeat(MAX_MODEL_BYTES);
        let body = format!(r#"{{"model":"{ok}","messages":[{{"role":"user","content":"x"}}]}}"#);
        assert!(parse(chat, &body).is_ok());
        assert!(parse(
            chat,
            r#"{"model":"gpt-4o-mini é","messages":[{"role":"user","content":"x"}]}"#
        )
        .is_ok());
    }

    #[test]
    fn rejects_malformed_and_mistyped_requests() {
        let chat = Endpoint::ChatCompletions;
        assert_eq!(parse(chat, "{").unwrap_err().code, "invalid_json");
        assert_eq!(parse(chat, "[]").unwrap_err().status, 400);
        assert_eq!(
            parse(chat, r#"{"messages":[{"role":"user","content":"x"}]}"#)
                .unwrap_err()
                .param,
            Some("model")
        );
        assert_eq!(
            parse(chat, r#"{"model":5,"messages":[]}"#)
                .unwrap_err()
                .param,
            Some("model")
        );
        assert_eq!(
            parse(chat, r#"{"model":"m"}"#).unwrap_err().param,
            Some("messages")
        );
        assert_eq!(
            parse(chat, r#"{"model":"m","messages":"hi"}"#)
                .unwrap_err()
                .param,
            Some("messages")
        );
        assert_eq!(
            parse(chat, r#"{"model":"m","messages":[{"content":"x"}]}"#)
                .unwrap_err()
                .param,
            Some("messages")
        );
        let bad_stream =
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#;
        assert_eq!(parse(chat, bad_stream).unwrap_err().param, Some("stream"));
        let bad_max = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#;
        assert_eq!(parse(chat, bad_max).unwrap_err().param, Some("max_tokens"));
        assert_eq!(
            parse(Endpoint::Embeddings, r#"{"model":"m"}"#)
                .unwrap_err()
                .param,
            Some("input")
        );
        assert_eq!(
            parse(Endpoint::Completions, r#"{"model":"m","prompt":7}"#)
                .unwrap_err()
                .param,
            Some("prompt")
        );
    }

    #[test]
    fn rewrites_model_and_asks_for_stream_usage() {
        let body = r#"{"model":"public","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":0.7}"#;
        let request = parse(Endpoint::ChatCompletions, body).unwrap();
        assert!(request.stream && !request.wants_usage);
        let upstream: Value =
            serde_json::from_slice(&request.upstream_body("private", None)).unwrap();
        assert_eq!(upstream["model"], "private");
        assert_eq!(upstream["stream_options"]["include_usage"], true);
        assert_eq!(upstream["temperature"], 0.7);
        // Key order is preserved, so the body stays recognisable to the provider.
        let keys: Vec<&String> = upstream.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "model",
                "messages",
                "stream",
                "temperature",
                "stream_options"
            ]
        );
    }
}
