//! Scoring latency on the request path: a 4k-token conversation (8 turns of mixed prose, code
//! and numbers), scored repeatedly; reports p50/p99 per request. Budget: p99 under 100 µs.
//!
//! Run: `cargo bench -p tollgate-router --bench router_score`.

use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_router::Scorer;

fn main() {
    let scorer = Scorer::shipped();
    let turn = "Please review this function and explain why the total is off by 17 when n = 42. \
                fn total(xs: &[u64]) -> u64 { xs.iter().map(|x| x * 2).sum() } \
                The quarterly report lists 1,204 units at $3.50 each; compute the revenue step by step. ";
    let messages: Vec<_> = (0..8)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": turn.repeat(8)}))
        .collect();
    let request = json!({"model": "auto", "messages": messages});
    let tokens = tiktoken_free_estimate(&request.to_string());
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..21_000 {
        let start = Instant::now();
        let score = scorer.score(std::hint::black_box(&request));
        let elapsed = start.elapsed();
        std::hint::black_box(score);
        if i >= 1_000 {
            samples.push(elapsed);
        }
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("conversation: 8 messages, ~{tokens} tokens");
    println!("| scorer | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| 4k-token conversation | {:.1} µs | {:.1} µs | {:.1} µs |",
        us(at(0.5)),
        us(at(0.99)),
        us(*samples.last().unwrap())
    );
}

/// ~4 characters per token, enough to label the size.
fn tiktoken_free_estimate(text: &str) -> usize {
    text.len() / 4
}
