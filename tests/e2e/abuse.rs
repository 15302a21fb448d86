//! Hostile input, case by case, against the real gateway: each case is sent over a raw socket
//! (so that anything can be sent: bad bytes, duplicate keys and headers, huge headers) and must
//! get the answer its row expects, an OpenAI-shaped 4xx for everything the gateway refuses.
//! After every case `/healthz` answers 200; at the end a normal request is served, nothing
//! refused reached the provider, the ledger bills nothing for refused requests, and no client
//! text appears in a response header. Every case and its outcome is written to the hostile-input
//! section of `bench/RELIABILITY.md`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::report::save_abuse_section;
use crate::harness::{policy, Gateway, MockUpstream};

/// Largest body the test gateway accepts.
const BODY_LIMIT: usize = 4 << 20;

/// What a case sends.
enum Send {
    /// POST /v1/chat/completions with the tenant's key and this body.
    Chat(Vec<u8>),
    /// POST to this path with the tenant's key and this body.
    Post(&'static str, Vec<u8>),
    /// These bytes as they are, `{KEY}` replaced by the tenant's key.
    Raw(Vec<u8>),
}

/// What a case must get.
#[derive(Clone, Copy)]
enum Expect {
    /// The gateway's own error: this status and code, and `param` when given.
    Error(u16, &'static str, Option<&'static str>),
    /// Served (200), after the gateway checked what there was to check.
    Served,
    /// Refused before the gateway saw a request (the HTTP layer): a 4xx of any shape, or the
    /// connection closed without an answer. Never a 5xx, never a hang.
    Refused,
    /// Either served or refused as above: a case whose point is that the process survives.
    Survives,
}

struct Case {
    name: &'static str,
    /// What is sent, in words, for the report.
    what: String,
    send: Send,
    expect: Expect,
}

/// One answer read off the socket.
#[derive(Debug, Default)]
struct Answer {
    /// 0: the connection closed without a status line.
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    elapsed: Duration,
    /// No end of the answer within 30 s.
    timed_out: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `status code` (or `closed`) for the report.
    fn describe(&self) -> String {
        if self.timed_out {
            return "no answer within 30 s".into();
        }
        if self.status == 0 {
            return "connection closed, no answer".into();
        }
        match self.json() {
            Some(body) if body["error"].is_object() => {
                let error = &body["error"];
                let param = error["param"]
                    .as_str()
                    .map_or(String::new(), |p| format!(", param `{p}`"));
                format!(
                    "{} `{}`{param}",
                    self.status,
                    error["code"].as_str().unwrap_or("?")
                )
            }
            Some(_) => format!("{}", self.status),
            None if self
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/event-stream")) =>
            {
                format!("{}, event stream", self.status)
            }
            None if self.body.is_empty() => format!("{}, empty body", self.status),
            None => format!("{}, non-JSON body", self.status),
        }
    }
}

/// Sends `bytes` on a fresh connection and reads the answer to its end; with `half_close`, the
/// client shuts its side down once everything is written (it has nothing more to send).
async fn exchange(port: u16, bytes: &[u8], half_close: bool) -> Answer {
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // Written alongside the read: the gateway may answer (413) and stop reading first.
    let bytes = bytes.to_vec();
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        if half_close {
            let _ = writer.shutdown().await;
        }
        // Kept until the answer is read: dropping the write half would close our side.
        writer
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut raw)).await;
    write.abort();
    let mut answer = parse_answer(&raw);
    answer.timed_out = read.is_err();
    answer.elapsed = started.elapsed();
    answer
}

fn parse_answer(raw: &[u8]) -> Answer {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Answer::default();
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
        ..Answer::default()
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        let start = line_end + 2;
        if size == 0 || start + size > raw.len() {
            break;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    out
}

/// A POST with a body, `Connection: close`, `extra` header lines first.
fn post(path: &str, key: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Authorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn replace_key(raw: &[u8], key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.windows(5).position(|w| w == b"{KEY}") {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(key.as_bytes());
        rest = &rest[at + 5..];
    }
    out.extend_from_slice(rest);
    out
}

fn chat_with(extra: Value) -> Vec<u8> {
    let mut body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string().into_bytes()
}

fn chat_text(text: &str) -> Vec<u8> {
    chat_with(json!({"messages": [{"role": "user", "content": text}], "max_tokens": 5}))
}

/// Text of `len` bytes from a fixed pseudo-random sequence of code points (any plane, no
/// surrogates), i.e. "random bytes as text".
fn random_text(len: usize) -> String {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut text = String::with_capacity(len + 4);
    while text.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // NUL is refused on its own (a case of its own); everything else is text.
        match char::from_u32((seed % 0x11_0000) as u32) {
            Some('\0') | None => {}
            Some(c) => text.push(c),
        }
    }
    text
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let chat = |name, what: &str, body: &[u8], expect| Case {
        name,
        what: what.to_string(),
        send: Send::Chat(body.to_vec()),
        expect,
    };
    let raw = |name, what: &str, bytes: Vec<u8>, expect| Case {
        name,
        what: what.to_string(),
        send: Send::Raw(bytes),
        expect,
    };
    let invalid_json = Error(400, "invalid_json", None);
    let bad = |param| Error(400, "invalid_request", Some(param));
    let deep = |open: &str, close: &str| format!("{}{}", open.repeat(10_000), close.repeat(10_000));
    let deep_content = format!(
        r#"{{"model":"gpt-test","messages":[{{"role":"user","content":{}}}]}}"#,
        deep("[", "]")
    );
    vec![
        // Malformed JSON and wrong shapes.
        chat("empty body", "no bytes at all", b"", invalid_json),
        chat("truncated JSON", "`{\"model\": `", b"{\"model\": ", invalid_json),
        chat(
            "trailing garbage",
            "a valid request followed by `}x`",
            &[chat_with(json!({})), b"}x".to_vec()].concat(),
            invalid_json,
        ),
        chat("array body", "`[1, 2]`", b"[1, 2]", Error(400, "invalid_request", None)),
        chat("null body", "`null`", b"null", Error(400, "invalid_request", None)),
        chat("string body", "`\"hi\"`", b"\"hi\"", Error(400, "invalid_request", None)),
        chat(
            "model not a string",
            "`model: 5`",
            &chat_with(json!({"model": 5})),
            bad("model"),
        ),
        chat(
            "messages not an array",
            "`messages: \"hi\"`",
            &chat_with(json!({"messages": "hi"})),
            bad("messages"),
        ),
        chat(
            "content an object",
            "`content: {\"a\": 1}`",
            &chat_with(json!({"messages": [{"role": "user", "content": {"a": 1}}]})),
            bad("messages"),
        ),
        chat(
            "role a number",
            "`role: 5`",
            &chat_with(json!({"messages": [{"role": 5, "content": "x"}]})),
            bad("messages"),
        ),
        chat(
            "stream a string",
            "`stream: \"yes\"`",
            &chat_with(json!({"stream": "yes"})),
            bad("stream"),
        ),
        chat(
            "stream_options a list",
            "`stream_options: [true]`",
            &chat_with(json!({"stream": true, "stream_options": [true]})),
            bad("stream_options"),
        ),
        // Numbers.
        chat(
            "max_tokens 1e400",
            "a float beyond f64",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"max_tokens":1e400}"#,
            invalid_json,
        ),
        chat(
            "max_tokens u64::MAX+1",
            "`18446744073709551616`",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"max_tokens":18446744073709551616}"#,
            bad("max_tokens"),
        ),
        chat(
            "max_tokens u64::MAX",
            "`18446744073709551615`",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"max_tokens":18446744073709551615}"#,
            bad("max_tokens"),
        ),
        chat(
            "max_tokens 2^63",
            "`9223372036854775808`",
            &chat_with(json!({"max_tokens": 1u64 << 63})),
            bad("max_tokens"),
        ),
        chat(
            "max_tokens 2^31",
            "one above the bound (2^31 - 1)",
            &chat_with(json!({"max_tokens": 1u64 << 31})),
            bad("max_tokens"),
        ),
        chat(
            "max_tokens -1",
            "`-1`",
            &chat_with(json!({"max_tokens": -1})),
            bad("max_tokens"),
        ),
        chat(
            "max_tokens -0",
            "`-0` (zero)",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"max_tokens":-0}"#,
            bad("max_tokens"),
        ),
        chat(
            "max_tokens 0",
            "`0` on chat",
            &chat_with(json!({"max_tokens": 0})),
            bad("max_tokens"),
        ),
        chat(
            "max_tokens 1.5",
            "`1.5`",
            &chat_with(json!({"max_tokens": 1.5})),
            bad("max_tokens"),
        ),
        chat(
            "max_tokens 1.0",
            "`1.0` (a float, even if whole)",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"max_tokens":1.0}"#,
            bad("max_tokens"),
        ),
        chat(
            "max_tokens a string",
            "`\"10\"`",
            &chat_with(json!({"max_tokens": "10"})),
            bad("max_tokens"),
        ),
        chat(
            "max_completion_tokens 2^63",
            "`9223372036854775808`",
            &chat_with(json!({"max_completion_tokens": 1u64 << 63})),
            bad("max_completion_tokens"),
        ),
        chat("n 0", "`n: 0`", &chat_with(json!({"n": 0})), bad("n")),
        chat("n -1", "`n: -1`", &chat_with(json!({"n": -1})), bad("n")),
        chat("n 129", "one above OpenAI's 128", &chat_with(json!({"n": 129})), bad("n")),
        chat(
            "n 10^6",
            "a million choices",
            &chat_with(json!({"n": 1_000_000})),
            bad("n"),
        ),
        chat("n 2^63", "`n: 2^63`", &chat_with(json!({"n": 1u64 << 63})), bad("n")),
        chat("n 1.5", "`n: 1.5`", &chat_with(json!({"n": 1.5})), bad("n")),
        // Nesting.
        chat(
            "10,000 nested arrays",
            "the whole body (skipped without recursion: not an object)",
            deep("[", "]").as_bytes(),
            Error(400, "invalid_request", None),
        ),
        chat(
            "10,000 nested objects",
            "the whole body, `{\"a\":{\"a\":...}}`",
            format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).as_bytes(),
            invalid_json,
        ),
        chat(
            "10,000 nested arrays in content",
            "as a message's content",
            deep_content.as_bytes(),
            invalid_json,
        ),
        // Bytes and characters.
        chat(
            "invalid UTF-8",
            "bytes 0xff 0xfe inside the content string",
            &[
                &br#"{"model":"gpt-test","messages":[{"role":"user","content":"a"#[..],
                b"\xff\xfe",
                br#""}]}"#,
            ]
            .concat(),
            invalid_json,
        ),
        chat(
            "lone surrogate",
            "`\\ud800` in the content",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"\ud800"}]}"#,
            invalid_json,
        ),
        chat(
            "raw control byte",
            "an unescaped 0x01 inside a string",
            b"{\"model\":\"gpt-test\",\"messages\":[{\"role\":\"user\",\"content\":\"a\x01b\"}]}",
            invalid_json,
        ),
        chat(
            "NUL in model",
            "`gpt-test\\u0000`",
            &chat_with(json!({"model": "gpt-test\u{0}"})),
            bad("model"),
        ),
        chat(
            "NUL in content",
            "`\\u0000` in a message's content",
            &chat_text("a\u{0}b"),
            bad("messages"),
        ),
        chat(
            "NUL in a content part",
            "`\\u0000` in a text part",
            &chat_with(
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\u{0}"}]}]}),
            ),
            bad("messages"),
        ),
        chat(
            "NUL in role",
            "`us\\u0000er`",
            &chat_with(json!({"messages": [{"role": "us\u{0}er", "content": "x"}]})),
            bad("messages"),
        ),
        chat(
            "NUL in name",
            "a message's `name`",
            &chat_with(json!({"messages": [{"role": "user", "name": "a\u{0}", "content": "x"}]})),
            bad("messages"),
        ),
        chat(
            "NUL in user",
            "`user: \"u\\u0000\"`",
            &chat_with(json!({"user": "u\u{0}"})),
            bad("user"),
        ),
        chat(
            "NUL in a tool name",
            "`tools[0].function.name`",
            &chat_with(
                json!({"tools": [{"type": "function", "function": {"name": "f\u{0}", "parameters": {}}}]}),
            ),
            bad("tools"),
        ),
        chat(
            "NUL in stop",
            "a `stop` list with a `\\u0000` string",
            &chat_with(json!({"stop": ["\u{0}"]})),
            bad("stop"),
        ),
        chat(
            "NUL in a key",
            "a message with a key `a\\u0000`",
            &chat_with(json!({"messages": [{"role": "user", "content": "x", "a\u{0}": 1}]})),
            bad("messages"),
        ),
        chat(
            "BEL in model",
            "`gpt\\u0007`",
            &chat_with(json!({"model": "gpt\u{7}"})),
            bad("model"),
        ),
        chat(
            "CR LF in model",
            "`gpt-test\\r\\nx-injected: 1` (header injection)",
            &chat_with(json!({"model": "gpt-test\r\nx-injected: 1"})),
            bad("model"),
        ),
        chat(
            "ESC in role",
            "`user\\u001b[31m`",
            &chat_with(json!({"messages": [{"role": "user\u{1b}[31m", "content": "x"}]})),
            bad("messages"),
        ),
        chat(
            "LF in user",
            "`user: \"a\\nx-injected: 1\"`",
            &chat_with(json!({"user": "a\nx-injected: 1"})),
            bad("user"),
        ),
        chat(
            "LF in a tool name",
            "`tools[0].function.name: \"f\\n\"`",
            &chat_with(json!({"tools": [{"type": "function", "function": {"name": "f\n"}}]})),
            bad("tools"),
        ),
        chat(
            "CR in a tool call's name",
            "`messages[1].tool_calls[0].function.name`",
            &chat_with(json!({"messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f\r", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "y"}
            ]})),
            bad("messages"),
        ),
        chat(
            "tabs and newlines in content",
            "`\\t`, `\\n`, `\\r`, BEL in message text (text, not names)",
            &chat_text("a\tb\nc\r\nd\u{7}"),
            Served,
        ),
        // Duplicate keys.
        chat(
            "model twice",
            "`gpt-test` then `other-model`",
            br#"{"model":"gpt-test","model":"other-model","messages":[{"role":"user","content":"x"}]}"#,
            bad("model"),
        ),
        chat(
            "model twice, unknown first",
            "`other-model` then `gpt-test`",
            br#"{"model":"other-model","messages":[{"role":"user","content":"x"}],"model":"gpt-test"}"#,
            bad("model"),
        ),
        chat(
            "stream twice",
            "`stream: false` then `stream: true`",
            br#"{"model":"gpt-test","stream":false,"messages":[{"role":"user","content":"x"}],"stream":true}"#,
            bad("stream"),
        ),
        chat(
            "max_tokens twice",
            "`max_tokens: 5` then `max_tokens: 100000`",
            br#"{"model":"gpt-test","max_tokens":5,"messages":[{"role":"user","content":"x"}],"max_tokens":100000}"#,
            bad("max_tokens"),
        ),
        chat(
            "duplicate then malformed",
            "`model` twice, then a cut-off body",
            br#"{"model":"gpt-test","model":"gpt-test","messages":["#,
            invalid_json,
        ),
        chat(
            "stream_options null",
            "`stream: true, stream_options: null` (usage still asked upstream)",
            &chat_with(json!({"stream": true, "stream_options": null, "max_tokens": 5})),
            Served,
        ),
        // Other endpoints.
        Case {
            name: "NUL in an embedding input",
            what: "`input: [\"a\\u0000\"]`".into(),
            send: Send::Post(
                "/v1/embeddings",
                json!({"model": "embed-test", "input": ["a\u{0}"]})
                    .to_string()
                    .into_bytes(),
            ),
            expect: bad("input"),
        },
        Case {
            name: "NUL in a prompt",
            what: "`prompt: \"a\\u0000\"`".into(),
            send: Send::Post(
                "/v1/completions",
                json!({"model": "gpt-test", "prompt": "a\u{0}"})
                    .to_string()
                    .into_bytes(),
            ),
            expect: bad("prompt"),
        },
        // Sizes.
        chat(
            "body over the limit",
            "5 MiB of content, limit 4 MiB",
            &chat_text(&"a".repeat(5 << 20)),
            Error(413, "request_too_large", None),
        ),
        raw(
            "declared length over the limit",
            "`Content-Length: 10000000000`, 100 bytes sent, then the client half-closes",
            [
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
                  Content-Length: 10000000000\r\nConnection: close\r\n\r\n"
                    .to_vec(),
                vec![b'{'; 100],
            ]
            .concat(),
            Error(413, "request_too_large", None),
        ),
        chat(
            "1 MiB of one character",
            "content `aaaa...`, 1 MiB",
            &chat_text(&"a".repeat(1 << 20)),
            Served,
        ),
        chat(
            "1 MiB without spaces",
            "content `abcd...xyzabcd...`, 1 MiB, no whitespace",
            &chat_text(
                &"abcdefghijklmnopqrstuvwxyz0123456789"
                    .chars()
                    .cycle()
                    .take(1 << 20)
                    .collect::<String>(),
            ),
            Served,
        ),
        chat(
            "1 MiB of random text",
            "pseudo-random code points from every plane, 1 MiB",
            &chat_text(&random_text(1 << 20)),
            Served,
        ),
        chat(
            "1 MiB of one emoji",
            "`👩‍👩‍👧‍👦` (a ZWJ sequence) repeated to 1 MiB",
            &chat_text(&"👩‍👩‍👧‍👦".repeat((1 << 20) / "👩‍👩‍👧‍👦".len())),
            Served,
        ),
        // Headers.
        Case {
            name: "64 KiB header",
            what: "one `x-junk` header of 64 KiB".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                &format!("x-junk: {}\r\n", "j".repeat(64 << 10)),
                &chat_with(json!({"max_tokens": 5})),
            )),
            expect: Survives,
        },
        Case {
            name: "2 MiB header",
            what: "one `x-junk` header of 2 MiB".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                &format!("x-junk: {}\r\n", "j".repeat(2 << 20)),
                &chat_with(json!({"max_tokens": 5})),
            )),
            expect: Refused,
        },
        Case {
            name: "1,000 headers",
            what: "1,000 small `x-h-N` headers".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                &(0..1000).map(|i| format!("x-h-{i}: v\r\n")).collect::<String>(),
                &chat_with(json!({"max_tokens": 5})),
            )),
            expect: Refused,
        },
        Case {
            name: "bare CR in a header",
            what: "`x-tollgate-tier: premium\\rx-injected: 1`".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                "x-tollgate-tier: premium\rx-injected: 1\r\n",
                &chat_with(json!({"max_tokens": 5})),
            )),
            expect: Refused,
        },
        Case {
            name: "client request id",
            what: "`x-request-id: x-injected` (never echoed: the gateway makes its own)".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                "x-request-id: x-injected\r\n",
                &chat_with(json!({"max_tokens": 5})),
            )),
            expect: Served,
        },
        Case {
            name: "Content-Length and chunked",
            what: "both `Content-Length: 4` and `Transfer-Encoding: chunked` (smuggling shape)"
                .into(),
            send: Send::Raw(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
                  Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n\
                  GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                    .to_vec(),
            ),
            expect: Refused,
        },
        Case {
            name: "bad chunk size",
            what: "`Transfer-Encoding: chunked`, chunk size `zz`".into(),
            send: Send::Raw(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
                  Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
                    .to_vec(),
            ),
            expect: Refused,
        },
        Case {
            name: "Content-Length not a number",
            what: "`Content-Length: -5`".into(),
            send: Send::Raw(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
                  Content-Length: -5\r\nConnection: close\r\n\r\n{}"
                    .to_vec(),
            ),
            expect: Refused,
        },
        // Authorization.
        raw(
            "Authorization not UTF-8",
            "`Authorization: Bearer tg-\\xff\\xfe`",
            [
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tg-\xff\xfe\r\n".to_vec(),
                format!("Content-Length: {}\r\nConnection: close\r\n\r\n", chat_with(json!({})).len()).into_bytes(),
                chat_with(json!({})),
            ]
            .concat(),
            Error(401, "invalid_api_key", None),
        ),
        Case {
            name: "Authorization of 64 KiB",
            what: "a 64 KiB bearer token".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                &format!("tg-{}", "a".repeat(64 << 10)),
                "",
                &chat_with(json!({})),
            )),
            expect: Error(401, "invalid_api_key", None),
        },
        Case {
            name: "Authorization twice, valid first",
            what: "the tenant's key, then a second `Authorization` header".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                "Authorization: Bearer {KEY}\r\n",
                &chat_with(json!({})),
            )),
            expect: Error(401, "invalid_api_key", None),
        },
        Case {
            name: "Authorization twice, valid second",
            what: "an unknown key, then the tenant's".into(),
            send: Send::Raw(post(
                "/v1/chat/completions",
                "{KEY}",
                "Authorization: Bearer tg-unknown\r\n",
                &chat_with(json!({})),
            )),
            expect: Error(401, "invalid_api_key", None),
        },
        Case {
            name: "Authorization, empty bearer",
            what: "`Authorization: Bearer `".into(),
            send: Send::Raw(post("/v1/chat/completions", "", "", &chat_with(json!({})))),
            expect: Error(401, "missing_api_key", None),
        },
        Case {
            name: "Authorization, other scheme",
            what: "`Authorization: Basic ...` with the key".into(),
            send: Send::Raw(
                [
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {KEY}\r\n".to_vec(),
                    format!("Content-Length: {}\r\nConnection: close\r\n\r\n", chat_with(json!({})).len()).into_bytes(),
                    chat_with(json!({})),
                ]
                .concat(),
            ),
            expect: Error(401, "invalid_api_key", None),
        },
    ]
}

/// Sends every case, checks its answer and the gateway's health after it, writes the report,
/// then fails if anything did not hold.
#[tokio::test]
async fn hostile_input_gets_clear_client_errors() {
    let mock = MockUpstream::start("alpha").await;
    let yaml = format!(
        "max_body_bytes: {BODY_LIMIT}\n{}",
        policy(&[("alpha", mock.base_url())], "")
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let health = || async {
        let answer = exchange(
            gw.port,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
        answer.status == 200
    };

    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let mut served = 0;
    // Answers the gateway gave as itself to an authenticated request: each has a ledger row.
    let mut ledgered = 0;
    for case in cases() {
        let bytes = match &case.send {
            Send::Chat(body) => post("/v1/chat/completions", &key, "", body),
            Send::Post(path, body) => post(path, &key, "", body),
            Send::Raw(bytes) => replace_key(bytes, &key),
        };
        let half_close = case.name == "declared length over the limit";
        let answer = exchange(gw.port, &bytes, half_close).await;
        let mut problems = check(&answer, case.expect);
        if answer
            .headers
            .iter()
            .any(|(n, v)| n.contains("injected") || v.contains("injected"))
        {
            problems.push("client text in a response header".to_string());
        }
        if !health().await {
            problems.push("/healthz did not answer 200 afterwards".to_string());
        }
        let shaped = answer
            .json()
            .is_some_and(|b| b["error"]["code"].is_string());
        if answer.status == 200 {
            served += 1;
            ledgered += 1;
        } else if shaped && answer.status != 401 {
            ledgered += 1;
        }
        let result = if problems.is_empty() {
            "pass".to_string()
        } else {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
            format!("FAIL: {}", problems.join("; "))
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {} ms | {result} |",
            case.name,
            case.what.replace('|', "\\|"),
            describe_expect(case.expect),
            answer.describe(),
            answer.elapsed.as_millis()
        ));
    }

    // Afterwards: a normal request is served, and the provider saw only the served cases.
    let normal = gw
        .chat(
            &key,
            &json!({"model": "gpt-test", "messages": [{"role": "user", "content": "still there?"}]}),
        )
        .await;
    let normal_ok = normal.status() == 200;
    if !normal_ok {
        failures.push(format!(
            "a normal request afterwards got {}",
            normal.status()
        ));
    }
    let received = mock.received();
    if received.len() != served + 1 {
        failures.push(format!(
            "the provider received {} requests, {} were served",
            received.len(),
            served + 1
        ));
    }
    // The stream sent with `stream_options: null` still asked the provider for usage.
    let streams = received
        .iter()
        .filter(|r| r.json()["stream"] == json!(true))
        .collect::<Vec<_>>();
    if streams.len() != 1 || streams[0].json()["stream_options"]["include_usage"] != json!(true) {
        failures.push("the stream with `stream_options: null` did not ask for usage".into());
    }
    // The ledger: one row per authenticated request; nothing refused is billed.
    let rows_in_ledger = ledger_rows(&gw, ledgered + 1).await;
    if rows_in_ledger.len() != ledgered + 1 {
        failures.push(format!(
            "{} ledger rows for {} authenticated requests",
            rows_in_ledger.len(),
            ledgered + 1
        ));
    }
    let billed_refusals: Vec<_> = rows_in_ledger
        .iter()
        .filter(|r| r.status != 200)
        .filter(|r| {
            r.cost_micros != 0
                || r.prompt_tokens != 0
                || r.completion_tokens != 0
                || r.outcome != "rejected"
        })
        .collect();
    if !billed_refusals.is_empty() {
        failures.push(format!(
            "refused requests billed or not marked rejected: {billed_refusals:#?}"
        ));
    }
    let ok_rows = rows_in_ledger.iter().filter(|r| r.status == 200).count();
    if ok_rows != served + 1 || rows_in_ledger.iter().any(|r| r.model.contains('\0')) {
        failures.push(format!("{ok_rows} served rows for {} served", served + 1));
    }
    if gw.log().contains("panicked") {
        failures.push("the gateway log has a panic".into());
    }

    save_abuse_section(&render(&rows, &failures, normal_ok));
    assert!(
        failures.is_empty(),
        "{} hostile-input check(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// The tenant's ledger rows, once there are `n` (or after 15 s).
async fn ledger_rows(gw: &Gateway, n: usize) -> Vec<tollgate_billing::ledger::LedgerRow> {
    let store = gw.store().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let rows = loop {
        let rows = store.ledger_rows("acme").await.unwrap();
        if rows.len() >= n || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    store.close().await;
    rows
}

/// What is wrong with `answer` for `expect` (empty: nothing).
fn check(answer: &Answer, expect: Expect) -> Vec<String> {
    if answer.timed_out {
        return vec!["no answer within 30 s".into()];
    }
    let mut problems = Vec::new();
    let body = answer.json();
    let shaped = |problems: &mut Vec<String>| {
        let error = body.as_ref().map(|b| &b["error"]);
        let fine = error.is_some_and(|e| {
            e["message"].as_str().is_some_and(|m| !m.is_empty())
                && e["type"].is_string()
                && e["code"].is_string()
                && e.get("param").is_some_and(|p| p.is_null() || p.is_string())
        });
        if !fine {
            problems.push(format!(
                "not an OpenAI-shaped error: {}",
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
            ));
        }
        if answer.header("content-type") != Some("application/json") {
            problems.push(format!("content-type {:?}", answer.header("content-type")));
        }
    };
    match expect {
        Expect::Error(status, code, param) => {
            if answer.status != status {
                problems.push(format!("status {} (expected {status})", answer.status));
            }
            shaped(&mut problems);
            let error = body
                .as_ref()
                .map(|b| b["error"].clone())
                .unwrap_or_default();
            if error["code"] != code {
                problems.push(format!("code {} (expected {code})", error["code"]));
            }
            if let Some(param) = param {
                if error["param"] != param {
                    problems.push(format!("param {} (expected {param})", error["param"]));
                }
            }
        }
        Expect::Served => {
            let streamed = answer
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/event-stream"));
            let complete = if streamed {
                answer.body.ends_with(b"data: [DONE]\n\n")
            } else {
                body.is_some_and(|b| b["choices"].is_array())
            };
            if answer.status != 200 || !complete {
                problems.push(format!("not served: {}", answer.describe()));
            }
        }
        Expect::Refused | Expect::Survives => {
            let refused = answer.status == 0 || (400..500).contains(&answer.status);
            let ok = refused || (matches!(expect, Expect::Survives) && answer.status == 200);
            if !ok {
                problems.push(format!("unexpected answer: {}", answer.describe()));
            }
        }
    }
    problems
}

fn describe_expect(expect: Expect) -> String {
    match expect {
        Expect::Error(status, code, Some(param)) => format!("{status} `{code}`, param `{param}`"),
        Expect::Error(status, code, None) => format!("{status} `{code}`"),
        Expect::Served => "200 (served)".into(),
        Expect::Refused => "4xx or connection closed".into(),
        Expect::Survives => "200, 4xx or closed".into(),
    }
}

fn render(rows: &[String], failures: &[String], normal_ok: bool) -> String {
    let mut md = String::from(
        "## Hostile input\n\n\
         Written by `tests/e2e/abuse.rs`: each case is sent on a raw socket to the real `tollgate` \
         binary (SQLite ledger, a mock provider, 127.0.0.1). Reproduce with\n\n\
         ```\ncargo test --workspace --locked -- hostile_input_gets_clear_client_errors\n```\n\n\
         Every case must get its expected answer, and after each one `/healthz` must answer 200. \
         After all of them a normal request must be served, the provider must have received only \
         the served cases, every ledger row of a refused request must bill nothing (cost and \
         tokens 0, outcome `rejected`), and no response header may carry client text. Errors of \
         the gateway are OpenAI-shaped (`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, \
         `application/json`); *4xx or connection closed* marks requests that the HTTP layer \
         (Pingora) refuses before the gateway sees them. Time: the whole exchange, from connect \
         to the connection's close (debug build).\n\n\
         | Case | Sent | Expected | Got | Time | Result |\n|---|---|---|---|---:|---|\n",
    );
    for row in rows {
        md.push_str(row);
        md.push('\n');
    }
    md.push_str(&format!(
        "\nAfter all cases: a normal request was {}. Run at {}.\n",
        if normal_ok { "served" } else { "NOT served" },
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    ));
    if !failures.is_empty() {
        md.push_str("\nFailed checks:\n\n");
        for failure in failures {
            md.push_str(&format!("- {}\n", failure.replace('\n', " ")));
        }
    }
    md
}
