//! Reading what a provider says it used, and the generated text the gateway counts itself when
//! the provider says nothing.

use serde_json::Value;
use tollgate_billing::ledger::Speculation;

/// The provider's `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProviderUsage {
    pub prompt: Option<u64>,
    pub cached: Option<u64>,
    pub completion: Option<u64>,
    /// `prompt_tokens_details.audio_tokens` and `completion_tokens_details.audio_tokens`.
    pub audio_prompt: Option<u64>,
    pub audio_completion: Option<u64>,
    /// `usage.speculative` of Tollgate's local runtime.
    pub speculation: Option<Speculation>,
}

/// `usage` of a response or of a stream chunk; `None` when absent or null.
pub fn provider_usage(message: &Value) -> Option<ProviderUsage> {
    let usage = message.get("usage")?.as_object()?;
    let number = |v: Option<&Value>| v.and_then(Value::as_u64);
    Some(ProviderUsage {
        prompt: number(usage.get("prompt_tokens")),
        cached: number(
            usage
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens")),
        ),
        completion: number(usage.get("completion_tokens")),
        audio_prompt: number(
            usage
                .get("prompt_tokens_details")
                .and_then(|d| d.get("audio_tokens")),
        ),
        audio_completion: number(
            usage
                .get("completion_tokens_details")
                .and_then(|d| d.get("audio_tokens")),
        ),
        speculation: usage.get("speculative").and_then(|s| {
            Some(Speculation {
                acceptance_rate: s.get("acceptance_rate")?.as_f64()?,
                tokens_per_pass: s.get("tokens_per_pass")?.as_f64()?,
            })
        }),
    })
}

/// Appends the generated text of a response or stream chunk (message or delta content, tool-call
/// arguments, refusals, completion text) to `out`.
pub fn append_generated_text(message: &Value, out: &mut String) {
    let Some(choices) = message.get("choices").and_then(Value::as_array) else {
        return;
    };
    for choice in choices {
        if let Some(text) = choice.get("text").and_then(Value::as_str) {
            out.push_str(text);
        }
        let Some(part) = choice.get("delta").or_else(|| choice.get("message")) else {
            continue;
        };
        for key in ["content", "refusal", "reasoning_content"] {
            if let Some(text) = part.get(key).and_then(Value::as_str) {
                out.push_str(text);
            }
        }
        if let Some(calls) = part.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                if let Some(function) = call.get("function") {
                    for key in ["name", "arguments"] {
                        if let Some(text) = function.get(key).and_then(Value::as_str) {
                            out.push_str(text);
                        }
                    }
                }
            }
        }
    }
}

/// A stream chunk that exists only to carry usage (`"choices": []` with a usage object).
pub fn is_usage_only_chunk(message: &Value) -> bool {
    message
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && message.get("usage").is_some_and(Value::is_object)
}
