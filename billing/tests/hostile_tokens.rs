//! Token counting stays linear on hostile text: one repeated character, long runs without
//! spaces, random code points, repeated emoji. For each, the count and the time at 1 MiB must be
//! about ten times those at 100 KiB. Times are the best of several runs and the bound is loose
//! (a quadratic counter would take 100 times as long; linear takes 10), so load on the machine
//! cannot fail it. The measured numbers are written to `bench/HOSTILE_TOKENS.md`.

use std::time::{Duration, Instant};

use tollgate_billing::tokens::Tokenizer;

const SMALL: usize = 100 << 10;
const LARGE: usize = 1 << 20;
/// Largest accepted time ratio for 10x the input.
const MAX_TIME_RATIO: f64 = 40.0;

/// Text of about `len` bytes of each hostile kind.
fn hostile(kind: &str, len: usize) -> String {
    let fill = |unit: &str| unit.repeat(len / unit.len());
    match kind {
        "one character" => fill("a"),
        "one digit" => fill("7"),
        "no spaces" => "abcdefghijklmnopqrstuvwxyz0123456789"
            .chars()
            .cycle()
            .take(len)
            .collect(),
        "one emoji" => fill("😀"),
        "ZWJ emoji" => fill("👩‍👩‍👧‍👦"),
        "one CJK character" => fill("語"),
        "random code points" => {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut text = String::with_capacity(len + 4);
            while text.len() < len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if let Some(c) = char::from_u32((seed % 0x11_0000) as u32) {
                    text.push(c);
                }
            }
            text
        }
        "random bytes, lossy" => {
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => unreachable!("{kind}"),
    }
}

const KINDS: [&str; 8] = [
    "one character",
    "one digit",
    "no spaces",
    "one emoji",
    "ZWJ emoji",
    "one CJK character",
    "random code points",
    "random bytes, lossy",
];

/// Token count and the best time of `runs` counts.
fn measure(tokenizer: Tokenizer, text: &str, runs: usize) -> (usize, Duration) {
    let mut best = Duration::MAX;
    let mut tokens = 0;
    for _ in 0..runs {
        let started = Instant::now();
        tokens = tokenizer.count(text);
        best = best.min(started.elapsed());
    }
    (tokens, best)
}

#[test]
fn hostile_text_counts_in_linear_time() {
    let mut table = String::from(
        "# Token counting on hostile text\n\n\
         Written by `billing/tests/hostile_tokens.rs` (test build: `bpe-openai` at opt-level 2). \
         Best of 3 runs per size. A linear counter takes about 10x as long for 10x the text; the \
         test fails above 40x (quadratic would be about 100x).\n\n\
         | Text | Tokenizer | Tokens (100 KiB) | Tokens (1 MiB) | Time (100 KiB) | Time (1 MiB) | Time ratio |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    let mut failures = Vec::new();
    for kind in KINDS {
        let small = hostile(kind, SMALL);
        let large = hostile(kind, LARGE);
        let scale = large.len() as f64 / small.len() as f64;
        for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            // Warm up (the tokenizer's tables load once).
            tokenizer.count("warm up");
            let (small_tokens, small_time) = measure(tokenizer, &small, 3);
            let (large_tokens, large_time) = measure(tokenizer, &large, 3);
            let count_ratio = large_tokens as f64 / small_tokens.max(1) as f64;
            // Timer resolution: a count under 1 ms is taken as 1 ms.
            let floor = Duration::from_millis(1);
            let time_ratio =
                large_time.max(floor).as_secs_f64() / small_time.max(floor).as_secs_f64();
            table.push_str(&format!(
                "| {kind} | {tokenizer:?} | {small_tokens} | {large_tokens} | {:.1} ms | {:.1} ms | {time_ratio:.1} |\n",
                small_time.as_secs_f64() * 1e3,
                large_time.as_secs_f64() * 1e3,
            ));
            // Ten times the text is about ten times the tokens...
            if !(scale * 0.5..=scale * 2.0).contains(&count_ratio) {
                failures.push(format!(
                    "{kind}, {tokenizer:?}: {small_tokens} then {large_tokens} tokens"
                ));
            }
            // ...and about ten times the time, not a hundred.
            if time_ratio > MAX_TIME_RATIO {
                failures.push(format!(
                    "{kind}, {tokenizer:?}: {time_ratio:.1}x the time for {scale:.1}x the text"
                ));
            }
        }
    }
    eprintln!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/HOSTILE_TOKENS.md");
    if let Err(e) = std::fs::write(&out, &table) {
        eprintln!("cannot write {}: {e}", out.display());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
