//! Counters in the Prometheus text format, served at `/metrics`.

use crate::engine::Outcome;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub queued: AtomicU64,
    pub active: AtomicU64,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    target_passes: AtomicU64,
    drafted: AtomicU64,
    accepted: AtomicU64,
}

impl Metrics {
    pub fn record(&self, o: &Outcome) {
        self.requests.fetch_add(1, Relaxed);
        self.prompt_tokens
            .fetch_add(o.prompt_tokens as u64, Relaxed);
        self.completion_tokens
            .fetch_add(o.completion_tokens as u64, Relaxed);
        self.target_passes
            .fetch_add(o.speculation.target_passes, Relaxed);
        self.drafted
            .fetch_add(o.speculation.drafted_tokens, Relaxed);
        self.accepted
            .fetch_add(o.speculation.accepted_tokens, Relaxed);
    }

    pub fn render(&self, model: &str) -> String {
        let mut s = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model=\"{model}\"}} {v}"
            );
        };
        let get = |a: &AtomicU64| a.load(Relaxed) as f64;
        line(
            "tollgate_runtime_requests_total",
            "counter",
            "Requests completed.",
            get(&self.requests),
        );
        line(
            "tollgate_runtime_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            get(&self.prompt_tokens),
        );
        line(
            "tollgate_runtime_completion_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.completion_tokens),
        );
        line(
            "tollgate_runtime_target_passes_total",
            "counter",
            "Decode and verify forward passes of the target model.",
            get(&self.target_passes),
        );
        line(
            "tollgate_runtime_draft_tokens_total",
            "counter",
            "Speculative tokens proposed.",
            get(&self.drafted),
        );
        line(
            "tollgate_runtime_draft_accepted_total",
            "counter",
            "Speculative tokens the target accepted.",
            get(&self.accepted),
        );
        let drafted = get(&self.drafted);
        line(
            "tollgate_runtime_acceptance_rate",
            "gauge",
            "Accepted over drafted tokens since start.",
            if drafted > 0.0 {
                get(&self.accepted) / drafted
            } else {
                0.0
            },
        );
        let passes = get(&self.target_passes);
        let per_pass = if passes > 0.0 {
            (passes + get(&self.accepted)) / passes
        } else {
            0.0
        };
        line(
            "tollgate_runtime_tokens_per_pass",
            "gauge",
            "Tokens per target decode pass since start.",
            per_pass,
        );
        line(
            "tollgate_runtime_queued_requests",
            "gauge",
            "Requests waiting for a slot.",
            get(&self.queued),
        );
        line(
            "tollgate_runtime_active_requests",
            "gauge",
            "Requests being generated.",
            get(&self.active),
        );
        s
    }
}
