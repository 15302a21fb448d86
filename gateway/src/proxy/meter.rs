//! What one request is billed, assembled as the request goes and turned into its ledger row.

use std::time::{Duration, Instant};

use tollgate_billing::ledger::{LedgerRow, Routing};
use tollgate_billing::price::{Price, Usage};
use tollgate_billing::tokens::Tokenizer;

use super::usage::ProviderUsage;

/// The routing decision of a request sent to a complexity route.
pub struct RouteNote {
    pub route: String,
    pub tier: &'static str,
    pub score: f32,
    pub reason: String,
    pub routed_model: String,
    /// Price of the route's premium model: what the request would have cost there.
    pub premium_price: Price,
}

pub struct Meter {
    pub request_id: String,
    pub started: Instant,
    pub created_ms: i64,
    pub tenant: String,
    pub key_id: String,
    pub endpoint: &'static str,
    pub model: String,
    pub stream: bool,
    pub tokenizer: Tokenizer,
    pub price: Price,
    pub backend: Option<String>,
    pub upstream_model: Option<String>,
    pub attempts: i32,
    pub counted_prompt: u64,
    pub counted_completion: u64,
    pub provider: Option<ProviderUsage>,
    pub first_byte: Option<Duration>,
    pub status: u16,
    pub outcome: &'static str,
    /// A successful response (or part of one) reached the client: there is something to bill.
    pub served: bool,
    pub tags: Option<std::sync::Arc<str>>,
    /// The tenant's time zone: the ledger row's day in the daily rollups.
    pub time_zone: Option<tollgate_billing::budget::Tz>,
    pub routing: Option<RouteNote>,
    /// Set once by [`Meter::end`]: the ledger row and the budget settle share this instant.
    pub ended: Option<Duration>,
    /// Web search calls the request pays for.
    pub web_searches: u64,
    /// A provider that did the work but whose answer could not be read: the output it may
    /// bill (the cap it was sent), billed with the counted prompt.
    pub unread_output: Option<u64>,
}

impl Meter {
    /// Counts generated text the gateway saw, for when the provider reports no usage.
    pub fn count_completion(&mut self, text: &str) {
        self.counted_completion = self.tokenizer.count(text) as u64;
    }

    /// Fixes the request's end; returns it as Unix milliseconds (`created_ms + latency_ms`).
    pub fn end(&mut self) -> i64 {
        let latency = *self.ended.get_or_insert_with(|| self.started.elapsed());
        self.created_ms + latency.as_millis() as i64
    }

    /// What the request is billed for (and its budgets settled with).
    pub fn billed_usage(&self) -> Usage {
        self.billed().0
    }

    /// Billed usage: the provider's report when it covers the request, else the gateway's count.
    fn billed(&self) -> (Usage, &'static str) {
        if let (false, Some(output)) = (self.served, self.unread_output) {
            let usage = Usage {
                prompt: self.counted_prompt,
                completion: output,
                web_searches: self.web_searches,
                ..Default::default()
            };
            return (usage, "upper_bound");
        }
        if !self.served {
            return (Usage::default(), "none");
        }
        let embeddings = self.endpoint == "embeddings";
        match self.provider {
            Some(ProviderUsage {
                prompt: Some(prompt),
                cached,
                completion,
                audio_prompt,
                audio_completion,
                ..
            }) if completion.is_some() || embeddings => {
                let usage = Usage {
                    prompt,
                    cached: cached.unwrap_or(0),
                    completion: completion.unwrap_or(0),
                    audio_prompt: audio_prompt.unwrap_or(0),
                    audio_completion: audio_completion.unwrap_or(0),
                    web_searches: self.web_searches,
                };
                (usage, "provider")
            }
            _ => {
                let usage = Usage {
                    prompt: self.counted_prompt,
                    completion: self.counted_completion,
                    web_searches: self.web_searches,
                    ..Default::default()
                };
                (usage, "gateway")
            }
        }
    }

    pub fn into_row(mut self) -> LedgerRow {
        self.end();
        let (usage, source) = self.billed();
        let provider = self.provider.unwrap_or_default();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        LedgerRow {
            cost_micros: as_i64(self.price.cost_micros(usage)),
            request_id: self.request_id,
            created_ms: self.created_ms,
            tenant: self.tenant,
            key_id: self.key_id,
            endpoint: self.endpoint.to_string(),
            model: self.model,
            backend: self.backend,
            upstream_model: self.upstream_model,
            stream: self.stream,
            status: i32::from(self.status),
            outcome: self.outcome.to_string(),
            attempts: self.attempts,
            prompt_tokens: as_i64(usage.prompt),
            cached_tokens: as_i64(usage.cached),
            completion_tokens: as_i64(usage.completion),
            counted_prompt_tokens: as_i64(self.counted_prompt),
            counted_completion_tokens: as_i64(self.counted_completion),
            provider_prompt_tokens: provider.prompt.map(as_i64),
            provider_cached_tokens: provider.cached.map(as_i64),
            provider_completion_tokens: provider.completion.map(as_i64),
            usage_source: source.to_string(),
            latency_ms: self.ended.unwrap_or_default().as_millis() as i64,
            ttft_ms: self.first_byte.map(|d| d.as_millis() as i64),
            tags: self.tags.map(|t| t.to_string()),
            speculation: self.provider.and_then(|p| p.speculation),
            time_zone: self.time_zone.map(|tz| tz.name().to_string()),
            routing: self.routing.map(|r| Routing {
                premium_equivalent_micros: as_i64(r.premium_price.cost_micros(usage)),
                route: r.route,
                tier: r.tier.to_string(),
                score: f64::from(r.score),
                reason: r.reason,
                routed_model: r.routed_model,
            }),
        }
    }
}
