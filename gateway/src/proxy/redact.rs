//! Key material removed from what a provider says before the gateway repeats it to a tenant or
//! writes it to its log. Providers echo keys in their errors, often masked (OpenAI: `Incorrect
//! API key provided: sk-proj-****abcd`), so besides the backend's key itself this removes any
//! word that begins or ends like it (4 characters or more, around masking `*`, `.` or `…`),
//! anything that looks like an API key (`sk-...`, `sk_...`, `tg-...`), and the credential after
//! `Bearer` or `Basic`.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::Value;

/// What a removed secret is replaced with.
pub const REDACTED: &str = "[redacted]";
/// Shortest piece of a key that counts as the key.
const MIN_PART: usize = 4;

/// An upstream error body with key material removed: a JSON body string by string (so it stays
/// the same JSON), any other body as text. Unchanged bodies are returned as they came.
pub fn error_body(body: Bytes, key: Option<&str>) -> Bytes {
    if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
        return if redact_value(&mut value, key) {
            Bytes::from(value.to_string())
        } else {
            body
        };
    }
    let clean = {
        let text = String::from_utf8_lossy(&body);
        match redact(&text, key) {
            Cow::Borrowed(_) if matches!(text, Cow::Borrowed(_)) => None,
            clean => Some(clean.into_owned()),
        }
    };
    clean.map_or(body, Bytes::from)
}

/// Redacts every string in `value`; true when something changed.
fn redact_value(value: &mut Value, key: Option<&str>) -> bool {
    match value {
        Value::String(text) => match redact(text, key) {
            Cow::Owned(clean) => {
                *text = clean;
                true
            }
            Cow::Borrowed(_) => false,
        },
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, item| redact_value(item, key) | changed),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |changed, item| redact_value(item, key) | changed),
        _ => false,
    }
}

/// `text` with key material replaced by [`REDACTED`]; `key` is the backend's own key.
pub fn redact<'a>(text: &'a str, key: Option<&str>) -> Cow<'a, str> {
    let key = key.filter(|k| !k.is_empty());
    let whole: Cow<'a, str> = match key {
        Some(k) if text.contains(k) => Cow::Owned(text.replace(k, REDACTED)),
        _ => Cow::Borrowed(text),
    };
    let mut out = String::new();
    let mut copied = 0;
    let mut after_scheme = false;
    for (start, end) in words(&whole) {
        let word = &whole[start..end];
        // A sentence's full stop is not part of the word.
        let word = word.trim_end_matches('.');
        let end = start + word.len();
        let secret =
            !word.is_empty() && (after_scheme || looks_like_a_key(word) || is_part_of(word, key));
        after_scheme = (word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic"))
            && whole[end..].starts_with(|c: char| c.is_whitespace());
        if secret {
            out.push_str(&whole[copied..start]);
            out.push_str(REDACTED);
            copied = end;
        }
    }
    if copied == 0 {
        return whole;
    }
    out.push_str(&whole[copied..]);
    Cow::Owned(out)
}

/// `[start, end)` of each run of characters a key (or a masked key) is made of.
fn words(text: &str) -> Vec<(usize, usize)> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let in_word = c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '.' | '…');
        match (in_word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                words.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, text.len()));
    }
    words
}

/// `sk-...`, `sk_...` (OpenAI, Anthropic and most providers since) and `tg-...` (tenant keys).
fn looks_like_a_key(word: &str) -> bool {
    ["sk-", "sk_", "tg-"]
        .iter()
        .any(|p| word.starts_with(p) && word.len() >= p.len() + 5)
}

/// True when a piece of `word` between masking characters is at least [`MIN_PART`] long and
/// begins or ends the key.
fn is_part_of(word: &str, key: Option<&str>) -> bool {
    let Some(key) = key else {
        return false;
    };
    word.split(['*', '.', '…'])
        .filter(|part| part.len() >= MIN_PART)
        .any(|part| key.starts_with(part) || key.ends_with(part) || part.contains(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-live-4f9c2a7e8b1d0c3f5a6e";

    #[test]
    fn full_masked_and_generic_keys_are_removed() {
        let cases = [
            format!("Incorrect API key provided: {KEY}."),
            "Incorrect API key provided: sk-live-****************5a6e.".to_string(),
            "key sk-l...5a6e is not valid".to_string(),
            "key …c3f5a6e rejected".to_string(),
            "header was Authorization: Bearer abc123zzz".to_string(),
            "header was Authorization: basic dXNlcjpwYXNz".to_string(),
            "another provider's key sk-ant-api03-xyzxyzxyz".to_string(),
            format!("url https://host/v1?key={KEY}&x=1"),
        ];
        for case in cases {
            let clean = redact(&case, Some(KEY));
            assert!(clean.contains(REDACTED), "{case} -> {clean}");
            for secret in [
                KEY,
                "5a6e",
                "sk-live",
                "abc123zzz",
                "dXNlcjpwYXNz",
                "xyzxyz",
            ] {
                assert!(!clean.contains(secret), "{case} -> {clean}");
            }
        }
        let masked = redact("Incorrect API key provided: sk-live-****5a6e.", Some(KEY));
        assert_eq!(masked, "Incorrect API key provided: [redacted].");
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for text in [
            "The model `gpt-4o` does not exist.",
            "Rate limit reached for requests. Please try again in 20s.",
            "You can find your API key at https://platform.openai.com/account/api-keys.",
            "task-force sketch ask-me",
        ] {
            assert!(
                matches!(redact(text, Some(KEY)), Cow::Borrowed(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn a_json_body_stays_the_same_json() {
        let body = serde_json::json!({"error": {
            "message": format!("Incorrect API key provided: {}***{}.", &KEY[..10], &KEY[KEY.len() - 4..]),
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
        let clean = error_body(Bytes::from(body.to_string()), Some(KEY));
        let value: Value = serde_json::from_slice(&clean).unwrap();
        assert_eq!(
            value["error"]["message"],
            "Incorrect API key provided: [redacted]."
        );
        assert_eq!(value["error"]["code"], "invalid_api_key");
        let untouched = Bytes::from_static(br#"{"error": {"message": "overloaded"}}"#);
        assert_eq!(error_body(untouched.clone(), Some(KEY)), untouched);
        let text = error_body(Bytes::from(format!("<h1>401 {KEY}</h1>")), Some(KEY));
        assert_eq!(text, Bytes::from("<h1>401 [redacted]</h1>"));
    }
}
