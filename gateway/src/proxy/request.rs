//! The client's request: validated once, counted once, and re-serialised per upstream attempt.

use bytes::Bytes;
use serde_json::{Map, Value};
use std::collections::HashSet;

use tollgate_billing::tokens::{scan_media as tokenizer_media, ImageCost, Media, Tokenizer};

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
/// Largest `max_tokens` / `max_completion_tokens` accepted: far above any model's output, far
/// below where `max_tokens * n` could overflow a reservation.
pub const MAX_OUTPUT_TOKENS: u64 = (1 << 31) - 1;

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
        let mut body = match serde_json::from_slice(bytes).map_err(ApiError::invalid_json)? {
            TopLevel::Object(body) => body,
            TopLevel::Duplicate(key) => {
                let error = ApiError::bad_request(format!(
                    "The request body has the key `{}` more than once.",
                    key.escape_debug()
                ));
                let known = known_fields(endpoint).iter().find(|k| **k == key);
                return Err(match known {
                    Some(param) => error.with_param(param),
                    None => error,
                });
            }
            TopLevel::Other => {
                return Err(ApiError::bad_request(
                    "The request body must be a JSON object.",
                ))
            }
        };
        check_strings(&body, endpoint)?;
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
        if body.get("stream_options") == Some(&Value::Null) {
            // The same as leaving it out (the upstream body of a stream then asks for usage).
            body.remove("stream_options");
        }
        let wants_usage = match body.get("stream_options") {
            None => false,
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
        for param in ["max_tokens", "max_completion_tokens", "n", "best_of"] {
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
        let int = |name: &str| body.get(name).and_then(Value::as_u64);
        if int("n").is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
            return Err(
                ApiError::bad_request(format!("`n` must be between 1 and {MAX_CHOICES}."))
                    .with_param("n"),
            );
        }
        if let Some(best_of) = int("best_of") {
            if endpoint != Endpoint::Completions {
                return Err(ApiError::unknown_parameter("best_of"));
            }
            if !(1..=MAX_BEST_OF).contains(&best_of) || best_of < int("n").unwrap_or(1) {
                return Err(ApiError::bad_request(format!(
                    "`best_of` must be between `n` and {MAX_BEST_OF}."
                ))
                .with_param("best_of"));
            }
        }
        // Output caps multiply with choices into the reservation: a sane range only. A chat
        // answer of no tokens is refused as OpenAI does; legacy completions allow
        // `max_tokens: 0` (with `echo`, to score a prompt).
        let min_output = u64::from(endpoint == Endpoint::ChatCompletions);
        for param in ["max_tokens", "max_completion_tokens"] {
            let cap = body.get(param).and_then(Value::as_u64);
            if cap.is_some_and(|n| !(min_output..=MAX_OUTPUT_TOKENS).contains(&n)) {
                return Err(ApiError::bad_request(format!(
                    "`{param}` must be between {min_output} and {MAX_OUTPUT_TOKENS}."
                ))
                .with_param(param_name(param)));
            }
        }
        if let Some(user) = body.get("user") {
            check_name(user, "user", "user")?;
        }
        check_function_names(&body)?;
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

    /// Completions the provider generates (and bills) for the request: `n`, or `best_of` when
    /// larger (completions generates `best_of` and returns the best `n`). Each may produce up to
    /// the output cap.
    pub fn choices(&self) -> u64 {
        let int = |name: &str| self.body.get(name).and_then(Value::as_u64).unwrap_or(1);
        int("n").max(int("best_of")).max(1)
    }

    /// The non-text content parts of a chat request (images sized by `images`).
    pub fn media(&self, images: &ImageCost) -> Media {
        match (self.endpoint, self.body.get("messages")) {
            (Endpoint::ChatCompletions, Some(Value::Array(messages))) => {
                tokenizer_media(messages, images)
            }
            _ => Media::default(),
        }
    }

    /// Tokens of a predicted output (`prediction.content`): the provider bills the predicted
    /// tokens it rejects as output, on top of what it generates.
    pub fn predicted_tokens(&self, tokenizer: Tokenizer) -> u64 {
        let Some(content) = self.body.get("prediction").and_then(|p| p.get("content")) else {
            return 0;
        };
        tokenizer.count_content(Some(content)) as u64
    }

    /// The `service_tier` asked for, unless it is the default one.
    pub fn service_tier(&self) -> Option<&str> {
        self.body
            .get("service_tier")
            .and_then(Value::as_str)
            .filter(|tier| !matches!(*tier, "auto" | "default"))
    }

    /// The request asks for spoken output (`modalities` with `audio`, or an `audio` section).
    pub fn wants_audio_output(&self) -> bool {
        let modalities = self.body.get("modalities").and_then(Value::as_array);
        modalities.is_some_and(|m| m.iter().any(|v| v.as_str() == Some("audio")))
            || self.body.get("audio").is_some_and(|a| !a.is_null())
    }

    /// The request turns on the provider's web search (a fee per call).
    pub fn web_search(&self) -> bool {
        self.body
            .get("web_search_options")
            .is_some_and(|w| !w.is_null())
    }

    /// The first field the gateway does not know how to price, if any: a top-level field
    /// outside the endpoint's known set and `passthrough`, or a tool of a built-in (fee-bearing)
    /// type.
    pub fn unpriceable_field(&self, passthrough: &HashSet<String>) -> Option<String> {
        let known = known_fields(self.endpoint);
        if let Some(field) = self
            .body
            .keys()
            .find(|k| !known.contains(&k.as_str()) && !passthrough.contains(k.as_str()))
        {
            return Some(field.clone());
        }
        let tools = self.body.get("tools").and_then(Value::as_array)?;
        tools.iter().enumerate().find_map(|(i, tool)| {
            match tool.get("type").and_then(Value::as_str) {
                Some("function") | Some("custom") => None,
                _ => Some(format!("tools[{i}].type")),
            }
        })
    }

    /// The body for one upstream: `model` rewritten, for streams usage requested from the
    /// provider (so the ledger bills the provider's own count), and the output capped at
    /// `output_cap` when the client set no cap (so a reservation bounds the output). The cap
    /// goes in `cap_field`; a model that takes only `max_completion_tokens` gets a client's
    /// `max_tokens` under that name.
    pub fn upstream_body(
        &self,
        upstream_model: &str,
        output_cap: Option<u64>,
        cap_field: &str,
    ) -> Bytes {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(upstream_model.to_string()));
        if cap_field == "max_completion_tokens" {
            if let Some(cap) = body.shift_remove("max_tokens") {
                body.entry("max_completion_tokens").or_insert(cap);
            }
        }
        if let Some(cap) = output_cap.filter(|_| self.max_output_tokens().is_none()) {
            body.insert(cap_field.into(), Value::from(cap));
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
        "best_of" => "best_of",
        _ => "n",
    }
}

/// Most choices (`n`) a request may ask for (OpenAI's own bound).
pub const MAX_CHOICES: u64 = 128;
/// Most completions `best_of` may generate (OpenAI's own bound).
pub const MAX_BEST_OF: u64 = 20;

/// The request fields the gateway knows for each endpoint: each either does not change what a
/// request costs or is priced (or refused) by the proxy. Anything else is refused unless the
/// policy's `passthrough_parameters` lists it.
fn known_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::ChatCompletions => &[
            "model",
            "messages",
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "temperature",
            "top_p",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "user",
            "seed",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "functions",
            "function_call",
            "metadata",
            "store",
            "reasoning_effort",
            "verbosity",
            "safety_identifier",
            "prompt_cache_key",
            "prediction",
            "modalities",
            "audio",
            "service_tier",
            "web_search_options",
        ],
        Endpoint::Completions => &[
            "model",
            "prompt",
            "suffix",
            "stream",
            "stream_options",
            "max_tokens",
            "n",
            "best_of",
            "temperature",
            "top_p",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "echo",
            "user",
            "seed",
            "service_tier",
        ],
        Endpoint::Embeddings => &["model", "input", "encoding_format", "dimensions", "user"],
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
            Some(Value::String(role)) if !role.chars().any(char::is_control) => {}
            _ => {
                return err(format!(
                    "`messages[{i}].role` must be a string without control characters."
                ))
            }
        }
        if let Some(name) = fields.get("name") {
            check_name(name, "messages", &format!("messages[{i}].name"))?;
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

/// The top level of a request body: an object with each key once, or something else. A key given
/// twice could mean one thing to the gateway and another to a provider that keeps the first one
/// (serde_json keeps the last), so a duplicate is refused rather than resolved.
enum TopLevel {
    Object(Map<String, Value>),
    Duplicate(String),
    Other,
}

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> serde::de::Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut body = Map::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            if duplicate.is_some() {
                // Still read to the end: malformed JSON is reported as such.
                map.next_value::<serde::de::IgnoredAny>()?;
            } else if body.contains_key(&key) {
                map.next_value::<serde::de::IgnoredAny>()?;
                duplicate = Some(key);
            } else {
                let value = map.next_value()?;
                body.insert(key, value);
            }
        }
        Ok(duplicate.map_or(TopLevel::Object(body), TopLevel::Duplicate))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(TopLevel::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }

    fn visit_unit<E>(self) -> Result<TopLevel, E> {
        Ok(TopLevel::Other)
    }
}

/// No string in the body (key or value) may hold U+0000: providers and the logs behind them
/// commonly treat it as the end of a string, so the text counted would not be the text served.
fn check_strings(body: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    for (key, value) in body {
        if key.contains('\0') || has_nul(value) {
            let error = ApiError::bad_request(format!(
                "`{}` must not contain NUL characters (\\u0000).",
                key.escape_debug()
            ));
            return Err(match known_fields(endpoint).iter().find(|k| **k == key) {
                Some(param) => error.with_param(param),
                None => error,
            });
        }
    }
    Ok(())
}

/// A name the provider treats as an identifier (`user`, a message's `name`, a function's name):
/// a string without control characters.
fn check_name(value: &Value, param: &'static str, what: &str) -> Result<(), ApiError> {
    match value {
        Value::String(name) if !name.chars().any(char::is_control) => Ok(()),
        Value::String(_) => Err(ApiError::bad_request(format!(
            "`{what}` must not contain control characters."
        ))
        .with_param(param)),
        _ => Err(ApiError::bad_request(format!("`{what}` must be a string.")).with_param(param)),
    }
}

/// Function and tool names, wherever a chat request gives one.
fn check_function_names(body: &Map<String, Value>) -> Result<(), ApiError> {
    let list = |key: &str| {
        body.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    for (i, tool) in list("tools").enumerate() {
        let names = [tool.get("name"), tool.pointer("/function/name")];
        for name in names.into_iter().flatten() {
            check_name(name, "tools", &format!("tools[{i}] name"))?;
        }
    }
    for (i, function) in list("functions").enumerate() {
        if let Some(name) = function.get("name") {
            check_name(name, "functions", &format!("functions[{i}].name"))?;
        }
    }
    if let Some(name) = body
        .get("tool_choice")
        .and_then(|c| c.pointer("/function/name"))
    {
        check_name(name, "tool_choice", "tool_choice.function.name")?;
    }
    if let Some(name) = body.get("function_call").and_then(|c| c.get("name")) {
        check_name(name, "function_call", "function_call.name")?;
    }
    for (i, message) in list("messages").enumerate() {
        let calls = message.get("tool_calls").and_then(Value::as_array);
        for (j, call) in calls.into_iter().flatten().enumerate() {
            if let Some(name) = call.pointer("/function/name") {
                check_name(
                    name,
                    "messages",
                    &format!("messages[{i}].tool_calls[{j}].function.name"),
                )?;
            }
        }
        if let Some(name) = message.pointer("/function_call/name") {
            check_name(
                name,
                "messages",
                &format!("messages[{i}].function_call.name"),
            )?;
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
    fn every_output_multiplier_multiplies_and_is_bounded() {
        let completions = Endpoint::Completions;
        let request = parse(
            completions,
            r#"{"model":"m","prompt":"x","n":2,"best_of":5,"max_tokens":10}"#,
        )
        .unwrap();
        assert_eq!(request.choices(), 5);
        let request = parse(completions, r#"{"model":"m","prompt":"x","n":3}"#).unwrap();
        assert_eq!(request.choices(), 3);
        for bad in [
            r#"{"model":"m","prompt":"x","n":2,"best_of":1}"#,
            r#"{"model":"m","prompt":"x","best_of":21}"#,
            r#"{"model":"m","prompt":"x","best_of":-1}"#,
            r#"{"model":"m","prompt":"x","n":0}"#,
            r#"{"model":"m","prompt":"x","n":129}"#,
            r#"{"model":"m","prompt":"x","n":18446744073709551615}"#,
        ] {
            assert_eq!(parse(completions, bad).unwrap_err().status, 400, "{bad}");
        }
        // best_of belongs to completions; chat refuses it rather than ignore a multiplier.
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"best_of":3}"#;
        assert_eq!(
            parse(Endpoint::ChatCompletions, chat).unwrap_err().code,
            "unsupported_parameter"
        );
    }

    #[test]
    fn fields_that_change_the_price_are_named() {
        let chat = Endpoint::ChatCompletions;
        let none = HashSet::new();
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.2,"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(request.unpriceable_field(&none), None);
        assert!(!request.wants_audio_output() && !request.web_search());
        assert_eq!(request.service_tier(), None);
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_k":5}"#,
        )
        .unwrap();
        assert_eq!(request.unpriceable_field(&none).as_deref(), Some("top_k"));
        let passthrough: HashSet<String> = ["top_k".to_string()].into();
        assert_eq!(request.unpriceable_field(&passthrough), None);
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}},{"type":"web_search"}]}"#,
        )
        .unwrap();
        assert_eq!(
            request.unpriceable_field(&none).as_deref(),
            Some("tools[1].type")
        );
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"service_tier":"priority","modalities":["text","audio"],"web_search_options":{}}"#,
        )
        .unwrap();
        assert_eq!(request.service_tier(), Some("priority"));
        assert!(request.wants_audio_output() && request.web_search());
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"service_tier":"auto","prediction":{"type":"content","content":"hello world"}}"#,
        )
        .unwrap();
        assert_eq!(request.service_tier(), None);
        assert_eq!(
            request.predicted_tokens(Tokenizer::O200kBase),
            Tokenizer::O200kBase.count("hello world") as u64
        );
        // Embeddings know their own few fields only.
        let embed = parse(
            Endpoint::Embeddings,
            r#"{"model":"m","input":"x","temperature":1}"#,
        )
        .unwrap();
        assert_eq!(
            embed.unpriceable_field(&none).as_deref(),
            Some("temperature")
        );
    }

    #[test]
    fn a_model_that_takes_max_completion_tokens_gets_it() {
        let chat = Endpoint::ChatCompletions;
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        let body: Value =
            serde_json::from_slice(&request.upstream_body("o", Some(300), "max_completion_tokens"))
                .unwrap();
        assert_eq!(body["max_completion_tokens"], 300);
        assert!(body.get("max_tokens").is_none());
        // A client's max_tokens is renamed for such a model, and kept for others.
        let request = parse(
            chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":50}"#,
        )
        .unwrap();
        let body: Value =
            serde_json::from_slice(&request.upstream_body("o", Some(50), "max_completion_tokens"))
                .unwrap();
        assert_eq!(body["max_completion_tokens"], 50);
        assert!(body.get("max_tokens").is_none());
        let body: Value =
            serde_json::from_slice(&request.upstream_body("o", Some(50), "max_tokens")).unwrap();
        assert_eq!(body["max_tokens"], 50);
        assert!(body.get("max_completion_tokens").is_none());
    }

    #[test]
    fn rewrites_model_and_asks_for_stream_usage() {
        let body = r#"{"model":"public","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":0.7}"#;
        let request = parse(Endpoint::ChatCompletions, body).unwrap();
        assert!(request.stream && !request.wants_usage);
        let upstream: Value =
            serde_json::from_slice(&request.upstream_body("private", None, "max_tokens")).unwrap();
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

/// Hostile bodies (issue "Hostile input"; `tests/e2e/abuse.rs` sends them to the real gateway and
/// `tests/fuzz` fuzzes `parse`). Inputs the fuzzers found are kept here as they were found.
#[cfg(test)]
mod hostile {
    use super::*;

    fn error(endpoint: Endpoint, body: &[u8]) -> (u16, &'static str, Option<&'static str>) {
        let error = ClientRequest::parse(endpoint, body).unwrap_err();
        (error.status, error.code, error.param)
    }

    const CHAT: Endpoint = Endpoint::ChatCompletions;
    const MESSAGES: &str = r#""messages":[{"role":"user","content":"x"}]"#;

    #[test]
    fn duplicate_top_level_keys_are_refused() {
        for (body, param) in [
            (
                format!(r#"{{"model":"a","model":"b",{MESSAGES}}}"#),
                Some("model"),
            ),
            (
                format!(r#"{{"model":"a",{MESSAGES},"stream":true,"stream":false}}"#),
                Some("stream"),
            ),
            (
                format!(r#"{{"model":"a",{MESSAGES},"n":1,"n":100}}"#),
                Some("n"),
            ),
            (
                format!(r#"{{"model":"a",{MESSAGES},"x-y":1,"x-y":1}}"#),
                None,
            ),
        ] {
            assert_eq!(
                error(CHAT, body.as_bytes()),
                (400, "invalid_request", param),
                "{body}"
            );
        }
        // Malformed JSON after a duplicate is still reported as malformed.
        assert_eq!(
            error(CHAT, br#"{"model":"a","model":"a","messages":["#).1,
            "invalid_json"
        );
        // Nested duplicates are resolved once (the last wins) for both counting and sending.
        let body = r#"{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}"#;
        let request = ClientRequest::parse(CHAT, body.as_bytes()).unwrap();
        let sent: Value =
            serde_json::from_slice(&request.upstream_body("u", None, "max_tokens")).unwrap();
        assert_eq!(sent["messages"][0]["content"], "b");
    }

    #[test]
    fn bodies_that_are_not_objects_or_too_deep_are_refused() {
        // Deep arrays as the whole body are skipped without recursion: not an object.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        for body in [
            &b"[1,2]"[..],
            b"null",
            b"\"x\"",
            b"1",
            b"true",
            deep.as_bytes(),
        ] {
            assert_eq!(error(CHAT, body), (400, "invalid_request", None));
        }
        // Deep values inside the object meet serde_json's recursion limit (128).
        for body in [
            format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000)),
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":{}{}}}]}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            ),
        ] {
            assert_eq!(error(CHAT, body.as_bytes()).1, "invalid_json");
        }
    }

    #[test]
    fn output_caps_and_choices_stay_in_range() {
        let with = |extra: &str| format!(r#"{{"model":"m",{MESSAGES},{extra}}}"#);
        for (extra, param) in [
            ("\"max_tokens\":0", "max_tokens"),
            ("\"max_tokens\":-0", "max_tokens"),
            ("\"max_tokens\":-1", "max_tokens"),
            ("\"max_tokens\":1.5", "max_tokens"),
            ("\"max_tokens\":1.0", "max_tokens"),
            ("\"max_tokens\":2147483648", "max_tokens"),
            ("\"max_tokens\":9223372036854775808", "max_tokens"),
            ("\"max_tokens\":18446744073709551615", "max_tokens"),
            ("\"max_tokens\":18446744073709551616", "max_tokens"),
            ("\"max_completion_tokens\":0", "max_completion_tokens"),
            ("\"n\":0", "n"),
            ("\"n\":129", "n"),
            ("\"n\":1000000", "n"),
        ] {
            assert_eq!(
                error(CHAT, with(extra).as_bytes()),
                (400, "invalid_request", Some(param)),
                "{extra}"
            );
        }
        assert_eq!(
            error(CHAT, with("\"max_tokens\":1e400").as_bytes()).1,
            "invalid_json"
        );
        let request =
            ClientRequest::parse(CHAT, with("\"max_tokens\":2147483647,\"n\":128").as_bytes())
                .unwrap();
        assert_eq!(
            (request.max_output_tokens(), request.choices()),
            (Some(MAX_OUTPUT_TOKENS), 128)
        );
        // Legacy completions may ask for no output (to score a prompt with `echo`).
        let body = r#"{"model":"m","prompt":"x","max_tokens":0,"echo":true}"#;
        assert!(ClientRequest::parse(Endpoint::Completions, body.as_bytes()).is_ok());
    }

    #[test]
    fn nul_anywhere_and_control_characters_in_names_are_refused() {
        let chat = |body: serde_json::Value| error(CHAT, body.to_string().as_bytes());
        let bad = |param| (400, "invalid_request", Some(param));
        let m =
            |message: serde_json::Value| serde_json::json!({"model": "m", "messages": [message]});
        assert_eq!(
            chat(m(serde_json::json!({"role": "user", "content": "a\0b"}))),
            bad("messages")
        );
        assert_eq!(
            chat(m(
                serde_json::json!({"role": "user", "content": [{"type": "text", "text": "\0"}]})
            )),
            bad("messages")
        );
        assert_eq!(
            chat(m(serde_json::json!({"role": "us\0er", "content": "x"}))),
            bad("messages")
        );
        assert_eq!(
            chat(m(serde_json::json!({"role": "user\n", "content": "x"}))),
            bad("messages")
        );
        assert_eq!(
            chat(m(
                serde_json::json!({"role": "user", "name": "a\u{7}", "content": "x"})
            )),
            bad("messages")
        );
        assert_eq!(
            chat(m(
                serde_json::json!({"role": "user", "content": "x", "k\0": 1})
            )),
            bad("messages")
        );
        let with = |key: &str, value: serde_json::Value| {
            let mut body = m(serde_json::json!({"role": "user", "content": "x"}));
            body[key] = value;
            chat(body)
        };
        assert_eq!(with("user", "u\0".into()), bad("user"));
        assert_eq!(with("user", "u\r\nx-injected: 1".into()), bad("user"));
        assert_eq!(with("user", 5.into()), bad("user"));
        assert_eq!(with("stop", serde_json::json!(["\0"])), bad("stop"));
        assert_eq!(
            with(
                "tools",
                serde_json::json!([{"type": "function", "function": {"name": "f\n"}}])
            ),
            bad("tools")
        );
        assert_eq!(
            with(
                "tool_choice",
                serde_json::json!({"type": "function", "function": {"name": "f\r"}})
            ),
            bad("tool_choice")
        );
        let body = serde_json::json!({"model": "m", "input": ["a", "b\0"]});
        assert_eq!(
            error(Endpoint::Embeddings, body.to_string().as_bytes()),
            bad("input")
        );
        let body = serde_json::json!({"model": "m", "prompt": "\0"});
        assert_eq!(
            error(Endpoint::Completions, body.to_string().as_bytes()),
            bad("prompt")
        );
        // Text is text: tabs, newlines and other control characters pass in content.
        let body = m(serde_json::json!({"role": "user", "content": "a\tb\r\nc\u{7}\u{1b}[0m"}));
        assert!(ClientRequest::parse(CHAT, body.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn a_null_stream_options_still_asks_the_provider_for_usage() {
        let body = format!(r#"{{"model":"m",{MESSAGES},"stream":true,"stream_options":null}}"#);
        let request = ClientRequest::parse(CHAT, body.as_bytes()).unwrap();
        assert!(request.stream && !request.wants_usage);
        let sent: Value =
            serde_json::from_slice(&request.upstream_body("u", None, "max_tokens")).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }
}
