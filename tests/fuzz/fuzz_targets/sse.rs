//! `SseRelay` on arbitrary upstream bytes cut into arbitrary chunks: what it forwards, meters and
//! notes never depends on where the chunks were cut, and without usage hiding it forwards the
//! stream unchanged (bar a blank tail).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_gateway::proxy::sse::SseRelay;

/// Forwarded bytes and what the relay noted.
fn relay(hide: bool, chunks: &[&[u8]]) -> (Vec<u8>, String) {
    let mut relay = SseRelay::new(hide);
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&relay.push(chunk));
    }
    out.extend_from_slice(&relay.finish());
    let noted = format!(
        "{:?} {:?} {:?}",
        relay.usage, relay.generated_text, relay.saw_done
    );
    (out, noted)
}

fuzz_target!(|data: &[u8]| {
    // First byte: usage hiding and the chunking seed; the rest is the upstream stream.
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let hide = control & 1 == 1;
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut seed = u32::from(control >> 1) + 1;
    while !rest.is_empty() {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let len = 1 + (seed >> 16) as usize % 7.max(rest.len() / 3 + 1);
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    let whole = relay(hide, &[stream]);
    let chunked = relay(hide, &chunks);
    assert_eq!(whole, chunked, "chunking changed the relay's result");
    if !hide {
        let (out, _) = whole;
        assert!(
            stream.starts_with(&out),
            "forwarded bytes differ from the stream"
        );
        assert!(
            stream[out.len()..].iter().all(u8::is_ascii_whitespace),
            "only a blank tail may be dropped"
        );
    }
});
