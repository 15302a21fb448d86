//! Errors the gateway answers itself, always in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    /// Seconds, sent as `retry-after` (429s).
    pub retry_after: Option<i64>,
}

impl ApiError {
    pub(crate) fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn missing_key() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "missing_api_key",
            "You didn't provide an API key. Send it as `Authorization: Bearer tg-...`.",
        )
    }

    /// Unknown and revoked keys get the same answer: which one it was is not the caller's business.
    pub fn invalid_key() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect or revoked API key provided.",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", "invalid_request", message)
    }

    /// The ledger cannot take more rows (journal full or unwritable under `fail_closed`):
    /// serving would mean serving unbilled.
    pub fn ledger_unavailable() -> Self {
        let mut error = Self::new(
            503,
            "server_error",
            "ledger_unavailable",
            "The gateway cannot record usage right now, so it is not serving requests. Retry shortly.",
        );
        error.retry_after = Some(5);
        error
    }

    /// The gateway is shutting down and ended this request before an answer was chosen.
    pub fn shutting_down() -> Self {
        let mut error = Self::new(
            503,
            "server_error",
            "shutting_down",
            "The gateway is shutting down; retry the request.",
        );
        error.retry_after = Some(1);
        error
    }

    pub fn invalid_json(detail: impl std::fmt::Display) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("The request body is not valid JSON: {detail}"),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown request URL: {path}."),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} is not allowed on {path}."),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("The request body exceeds the limit of {limit} bytes."),
        )
    }

    pub fn budget_exceeded(message: String, retry_after: i64) -> Self {
        let mut error = Self::new(429, "budget_exceeded", "budget_exceeded", message);
        error.retry_after = Some(retry_after.max(1));
        error
    }

    /// OpenAI's shape for rate limits: type `requests` or `tokens`.
    pub fn rate_limited(message: String, requests: bool, retry_after: i64) -> Self {
        let kind = if requests { "requests" } else { "tokens" };
        let mut error = Self::new(429, kind, "rate_limit_exceeded", message);
        error.retry_after = Some(retry_after.max(1));
        error
    }

    pub fn limits_unavailable() -> Self {
        let mut error = Self::new(
            503,
            "service_unavailable",
            "limits_unavailable",
            "Budget counters are unreachable and this tenant's policy is to refuse requests meanwhile.",
        );
        error.retry_after = Some(1);
        error
    }

    pub fn unpriced_model(model: &str) -> Self {
        Self::new(
            403,
            "invalid_request_error",
            "model_unpriced",
            format!("The model `{model}` has no price, and this tenant's policy refuses unpriced models."),
        )
        .with_param("model")
    }

    /// A request field the gateway does not know, so cannot tell what it costs. The field's name
    /// is the client's: shortened, and escaped by the JSON body.
    pub fn unknown_parameter(field: &str) -> Self {
        let shown: String = field.chars().take(64).collect();
        Self::new(
            400,
            "invalid_request_error",
            "unsupported_parameter",
            format!(
                "Unsupported parameter: `{shown}` is not known to this gateway, which cannot tell what it would cost. An operator can allow it with `passthrough_parameters`."
            ),
        )
    }

    /// A feature that changes what a request costs, which the model's price does not cover.
    pub fn unpriced_feature(feature: &str, model: &str, param: &'static str) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "unsupported_parameter",
            format!("The model `{model}` has no price for {feature}, so this gateway does not serve it."),
        )
        .with_param(param)
    }

    /// Content only the provider can size, which a hard budget cannot bound.
    pub fn unsized_content(model: &str) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "unsupported_content",
            format!("The request has content parts (audio, files or parts of an unknown type) whose size only the provider knows, and the model `{model}` sets no `unsized_part_tokens` to reserve for them under a hard budget."),
        )
        .with_param("messages")
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "upstream_error", "bad_gateway", message)
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "upstream_error", "gateway_timeout", message)
    }

    pub fn body(&self) -> Bytes {
        let value = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        Bytes::from(value.to_string())
    }
}
