//! Token counting for OpenAI-family models.
//!
//! Counting runs on the request path, so it uses `bpe-openai`, which is linear on hostile input;
//! `tiktoken-rs` is kept as the test oracle (see the tests below and `tests/`).

use serde_json::Value;

mod media;
pub use media::{scan as scan_media, ImageCost, Media};

/// A BPE vocabulary the gateway can count with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenizer {
    O200kBase,
    Cl100kBase,
}

/// Framing tokens OpenAI adds around every chat message (`<|start|>role<|message|>...<|end|>`).
const TOKENS_PER_MESSAGE: usize = 3;
/// Extra token when a message carries a `name`.
const TOKENS_PER_NAME: usize = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: usize = 3;
/// One token of framing per function or tool call in an assistant message.
const FUNCTION_CALL_OVERHEAD: usize = 1;

impl Tokenizer {
    fn bpe(self) -> &'static bpe_openai::Tokenizer {
        match self {
            Tokenizer::O200kBase => bpe_openai::o200k_base(),
            Tokenizer::Cl100kBase => bpe_openai::cl100k_base(),
        }
    }

    /// Tokens in plain text (special-token strings count as ordinary text, as the API treats them).
    pub fn count(self, text: &str) -> usize {
        if text.is_empty() {
            return 0;
        }
        self.bpe().count(text)
    }

    /// Prompt tokens of a chat request's `messages`, with OpenAI's per-message framing.
    ///
    /// Content given as an array of parts counts its text parts here; images, audio and files
    /// are [`scan_media`]'s. Tool definitions are counted as their JSON text.
    pub fn count_chat(self, messages: &[Value], tools: Option<&Value>) -> usize {
        let mut total = REPLY_PRIMING;
        for message in messages {
            total += TOKENS_PER_MESSAGE;
            let Some(fields) = message.as_object() else {
                continue;
            };
            if let Some(role) = fields.get("role").and_then(Value::as_str) {
                total += self.count(role);
            }
            total += self.count_content(fields.get("content"));
            if let Some(name) = fields.get("name").and_then(Value::as_str) {
                total += self.count(name) + TOKENS_PER_NAME;
            }
            if let Some(call) = fields.get("function_call") {
                total += self.count_function_call(call);
            }
            if let Some(calls) = fields.get("tool_calls").and_then(Value::as_array) {
                for call in calls {
                    if let Some(function) = call.get("function") {
                        total += self.count_function_call(function);
                    }
                }
            }
            if let Some(refusal) = fields.get("refusal").and_then(Value::as_str) {
                total += self.count(refusal);
            }
        }
        if let Some(tools) = tools.filter(|t| !t.is_null()) {
            total += self.count(&tools.to_string());
        }
        total
    }

    fn count_function_call(self, call: &Value) -> usize {
        let text = |key| call.get(key).and_then(Value::as_str).unwrap_or_default();
        self.count(text("name")) + self.count(text("arguments")) + FUNCTION_CALL_OVERHEAD
    }

    /// Tokens of a message's `content`: a string, or the text of its parts.
    pub fn count_content(self, content: Option<&Value>) -> usize {
        match content {
            Some(Value::String(text)) => self.count(text),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .map(|text| self.count(text))
                .sum(),
            _ => 0,
        }
    }

    /// Tokens of a `prompt` (completions) or `input` (embeddings): a string, an array of
    /// strings, or pre-tokenized arrays of ids (counted as their length).
    pub fn count_input(self, input: &Value) -> usize {
        match input {
            Value::String(text) => self.count(text),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::Number(_) => 1,
                    other => self.count_input(other),
                })
                .sum(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tiktoken_rs::ChatCompletionRequestMessage as Oracle;

    fn corpus() -> Vec<String> {
        let mut texts = vec![
            "Hello, world!".to_string(),
            "The quick brown fox jumps over the lazy dog.\n\nAnd then it slept.".to_string(),
            "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{v:?}\");\n}\n".to_string(),
            "def fib(n):\n\treturn n if n < 2 else fib(n-1) + fib(n-2)\n".to_string(),
            "机器学习是人工智能的一个分支。東京は日本の首都です。한국어 문장도 있습니다.".to_string(),
            "Emoji: 👩‍👩‍👧‍👦 🚀🔥 ✨ 🇫🇷 — and some ünïcödé àccents, Ελληνικά, русский текст.".to_string(),
            "   leading and trailing spaces   \n\n\n\t\t".to_string(),
            "{\"json\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}".to_string(),
            "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days';".to_string(),
            "1234567890 3.14159 -42 1e10 0xDEADBEEF".to_string(),
        ];
        texts.push("a".repeat(5000));
        texts.push("ab ".repeat(700));
        texts
    }

    #[test]
    fn plain_text_counts_match_tiktoken() {
        let o200k = tiktoken_rs::o200k_base().unwrap();
        let cl100k = tiktoken_rs::cl100k_base().unwrap();
        for text in corpus() {
            assert_eq!(
                Tokenizer::O200kBase.count(&text),
                o200k.encode_ordinary(&text).len(),
                "o200k: {text:?}"
            );
            assert_eq!(
                Tokenizer::Cl100kBase.count(&text),
                cl100k.encode_ordinary(&text).len(),
                "cl100k: {text:?}"
            );
        }
    }

    #[test]
    fn chat_counts_match_tiktoken() {
        for (tokenizer, model) in [
            (Tokenizer::O200kBase, "gpt-4o"),
            (Tokenizer::Cl100kBase, "gpt-4"),
        ] {
            for text in corpus() {
                let messages = vec![
                    json!({"role": "system", "content": "You are terse."}),
                    json!({"role": "user", "content": text, "name": "alice"}),
                    json!({"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}
                    ]}),
                ];
                let oracle: Vec<Oracle> = vec![
                    Oracle {
                        role: "system".into(),
                        content: Some("You are terse.".into()),
                        ..Default::default()
                    },
                    Oracle {
                        role: "user".into(),
                        content: Some(text.clone()),
                        name: Some("alice".into()),
                        ..Default::default()
                    },
                    Oracle {
                        role: "assistant".into(),
                        tool_calls: vec![tiktoken_rs::FunctionCall {
                            name: "lookup".into(),
                            arguments: "{\"q\":\"x\"}".into(),
                        }],
                        ..Default::default()
                    },
                ];
                let expected = tiktoken_rs::num_tokens_from_messages(model, &oracle).unwrap();
                assert_eq!(
                    tokenizer.count_chat(&messages, None),
                    expected,
                    "{model}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn content_parts_and_inputs() {
        let t = Tokenizer::O200kBase;
        let parts = json!([{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}}]);
        let as_parts = t.count_chat(&[json!({"role": "user", "content": parts})], None);
        let as_string = t.count_chat(&[json!({"role": "user", "content": "hello"})], None);
        assert_eq!(as_parts, as_string);
        assert_eq!(
            t.count_input(&json!(["hello", "hello"])),
            2 * t.count("hello")
        );
        assert_eq!(t.count_input(&json!([[1, 2, 3], [4]])), 4);
        assert_eq!(t.count_input(&json!(null)), 0);
    }
}
