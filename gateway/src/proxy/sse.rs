//! Relaying a server-sent-event stream event by event: each complete event is forwarded as soon
//! as it arrives, its usage and generated text are noted, and the provider's usage chunk is
//! hidden from clients that did not ask for it.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::usage::{append_generated_text, is_usage_only_chunk, provider_usage, ProviderUsage};

/// Longest event relayed: an upstream whose event grows past it is cut rather than buffered.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

pub struct SseRelay {
    pending: BytesMut,
    /// Where the search for the end of the pending event resumes: bytes before it were searched
    /// already (an event sent in many small chunks costs linear time, not quadratic).
    searched: usize,
    hide_usage_chunk: bool,
    pub usage: Option<ProviderUsage>,
    pub generated_text: String,
    pub saw_done: bool,
}

impl SseRelay {
    pub fn new(hide_usage_chunk: bool) -> SseRelay {
        SseRelay {
            pending: BytesMut::new(),
            searched: 0,
            hide_usage_chunk,
            usage: None,
            generated_text: String::new(),
            saw_done: false,
        }
    }

    /// Takes bytes from upstream; returns the complete events to forward now (possibly empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        loop {
            match event_end(&self.pending, self.searched) {
                Ok(end) => {
                    let event = self.pending.split_to(end).freeze();
                    self.searched = 0;
                    if self.inspect(&event) {
                        out.extend_from_slice(&event);
                    }
                }
                Err(resume) => {
                    self.searched = resume;
                    break;
                }
            }
        }
        out.freeze()
    }

    /// The event being received is longer than [`MAX_EVENT_BYTES`].
    pub fn overflowed(&self) -> bool {
        self.pending.len() > MAX_EVENT_BYTES
    }

    /// Whatever is left when the upstream ends (an unterminated last event).
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        self.searched = 0;
        if rest.iter().all(u8::is_ascii_whitespace) || !self.inspect(&rest) {
            return Bytes::new();
        }
        rest
    }

    /// Notes what the event carries; false when it must not be forwarded.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(event) else {
            return true;
        };
        let mut data = String::new();
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        let data = data.trim();
        if data == "[DONE]" {
            self.saw_done = true;
            return true;
        }
        let Ok(message) = serde_json::from_str::<Value>(data) else {
            return true;
        };
        if let Some(usage) = provider_usage(&message) {
            self.usage = Some(usage);
        }
        append_generated_text(&message, &mut self.generated_text);
        !(self.hide_usage_chunk && is_usage_only_chunk(&message))
    }
}

/// End (exclusive) of the first complete event: after a blank line, in any of SSE's line endings.
/// The search starts at `from`, a position an earlier search returned; `Err` is where the next
/// search, with more bytes, resumes.
fn event_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' || buf[i] == b'\r' {
            let first = line_break_len(&buf[i..]).ok_or(i)?;
            let j = i + first;
            if j < buf.len() && (buf[j] == b'\n' || buf[j] == b'\r') {
                let second = line_break_len(&buf[j..]).ok_or(i)?;
                return Ok(j + second);
            }
            if j >= buf.len() {
                return Err(i);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    Err(buf.len())
}

/// Length of the line break at the start of `buf`; `None` when a lone `\r` ends the buffer and
/// the next byte may turn it into `\r\n`.
fn line_break_len(buf: &[u8]) -> Option<usize> {
    match buf {
        [b'\r', b'\n', ..] => Some(2),
        [b'\r'] => None,
        [b'\r', ..] | [b'\n', ..] => Some(1),
        _ => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n";
    const CHUNK2: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn forwards_events_whole_across_arbitrary_splits() {
        let stream = format!("{CHUNK}{CHUNK2}{USAGE}{DONE}");
        for split in 1..stream.len() {
            let mut relay = SseRelay::new(false);
            let mut out = Vec::new();
            out.extend_from_slice(&relay.push(&stream.as_bytes()[..split]));
            out.extend_from_slice(&relay.push(&stream.as_bytes()[split..]));
            out.extend_from_slice(&relay.finish());
            assert_eq!(String::from_utf8(out).unwrap(), stream, "split at {split}");
            assert_eq!(relay.generated_text, "Hello");
            assert_eq!(
                relay.usage,
                Some(ProviderUsage {
                    prompt: Some(9),
                    cached: Some(4),
                    completion: Some(2),
                    ..Default::default()
                })
            );
            assert!(relay.saw_done);
        }
    }

    #[test]
    fn hides_the_usage_chunk_unless_asked() {
        let mut relay = SseRelay::new(true);
        let out = relay.push(format!("{CHUNK}{USAGE}{DONE}").as_bytes());
        assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{CHUNK}{DONE}"));
        assert_eq!(
            relay.usage.unwrap().completion,
            Some(2),
            "usage is still metered"
        );
    }

    #[test]
    fn an_event_that_never_ends_overflows() {
        let mut relay = SseRelay::new(false);
        assert!(relay.push(b"data: {\"choices\":").is_empty());
        let block = vec![b'a'; 1 << 20];
        for _ in 0..(MAX_EVENT_BYTES >> 20) {
            assert!(!relay.overflowed());
            assert!(relay.push(&block).is_empty());
        }
        assert!(relay.overflowed());
        // Ended events never count against the bound.
        let mut relay = SseRelay::new(false);
        let event = format!("data: {}\n\n", "x".repeat(1 << 20));
        for _ in 0..20 {
            assert_eq!(relay.push(event.as_bytes()).len(), event.len());
        }
        assert!(!relay.overflowed());
    }

    #[test]
    fn a_long_event_in_small_chunks_is_searched_once() {
        // A 64 KiB event in 1-byte chunks: each push searches only the new byte.
        let mut relay = SseRelay::new(false);
        let event = format!("data: {}\n\n", "x".repeat(1 << 16));
        let mut out = Vec::new();
        for byte in event.as_bytes() {
            out.extend_from_slice(&relay.push(std::slice::from_ref(byte)));
            assert!(relay.searched <= relay.pending.len());
            assert!(
                relay.pending.len() - relay.searched <= 2,
                "re-searched old bytes"
            );
        }
        assert_eq!(out, event.as_bytes());
        // A CR at a chunk's end may become CRLF: the search resumes on it.
        let mut relay = SseRelay::new(false);
        assert!(relay.push(b"data: a\r").is_empty());
        assert!(relay.push(b"\n\r").is_empty());
        assert_eq!(&relay.push(b"\ndata: b")[..], b"data: a\r\n\r\n");
    }

    #[test]
    fn handles_crlf_and_unterminated_tail() {
        let mut relay = SseRelay::new(false);
        let out = relay
            .push(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\ndata: [DONE]");
        assert_eq!(
            out.len(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n".len()
        );
        assert_eq!(&relay.finish()[..], b"data: [DONE]");
        assert!(relay.saw_done);
        assert_eq!(relay.generated_text, "a");
    }
}
