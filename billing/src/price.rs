//! Prices and costs in integer micro-dollars, so that sums are exact.

use serde::{Deserialize, Serialize};

/// Price of a model in micro-dollars per one million tokens
/// (equivalently: pico-dollars per token). `0.15` USD per 1M tokens is `150_000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

/// Tokens a request used, as billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// All prompt tokens, cached ones included (OpenAI's `prompt_tokens`).
    pub prompt: u64,
    /// The part of `prompt` served from the provider's prompt cache.
    pub cached: u64,
    pub completion: u64,
}

const PER_MILLION: u128 = 1_000_000;

impl Price {
    /// Converts a USD-per-1M-tokens figure from a policy file. Prices finer than one
    /// micro-dollar per 1M tokens are rounded to the nearest.
    pub fn usd_per_million_to_micros(usd: f64) -> Option<u64> {
        if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
            return None;
        }
        Some((usd * 1e6).round() as u64)
    }

    /// Cost of `usage` in micro-dollars, rounded half up once per request.
    pub fn cost_micros(&self, usage: Usage) -> u64 {
        let cached = usage.cached.min(usage.prompt) as u128;
        let uncached = usage.prompt as u128 - cached;
        let pico = uncached * self.input as u128
            + cached * self.cached_input as u128
            + usage.completion as u128 * self.output as u128;
        ((pico + PER_MILLION / 2) / PER_MILLION) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_usd_prices() {
        assert_eq!(Price::usd_per_million_to_micros(0.15), Some(150_000));
        assert_eq!(Price::usd_per_million_to_micros(2.5), Some(2_500_000));
        assert_eq!(Price::usd_per_million_to_micros(0.075), Some(75_000));
        assert_eq!(Price::usd_per_million_to_micros(-1.0), None);
        assert_eq!(Price::usd_per_million_to_micros(f64::NAN), None);
    }

    #[test]
    fn costs_are_exact_and_rounded_once() {
        let price = Price {
            input: 2_500_000,
            cached_input: 1_250_000,
            output: 10_000_000,
        };
        // 1M input tokens at $2.50 = 2.5M micro-dollars.
        let usage = Usage {
            prompt: 1_000_000,
            cached: 0,
            completion: 0,
        };
        assert_eq!(price.cost_micros(usage), 2_500_000);
        // 1000 prompt (400 cached) + 500 completion:
        // 600*2.5 + 400*1.25 + 500*10 = 1500 + 500 + 5000 = 7000 micro-dollars.
        let usage = Usage {
            prompt: 1000,
            cached: 400,
            completion: 500,
        };
        assert_eq!(price.cost_micros(usage), 7000);
        // 1 token at $0.15/1M = 0.15 micro-dollars, rounds to 0; 4 tokens = 0.6 -> 1.
        let cheap = Price {
            input: 150_000,
            cached_input: 75_000,
            output: 600_000,
        };
        assert_eq!(
            cheap.cost_micros(Usage {
                prompt: 1,
                ..Default::default()
            }),
            0
        );
        assert_eq!(
            cheap.cost_micros(Usage {
                prompt: 4,
                ..Default::default()
            }),
            1
        );
        // cached can never exceed prompt.
        assert_eq!(
            cheap.cost_micros(Usage {
                prompt: 10,
                cached: 50,
                completion: 0
            }),
            1
        );
    }
}
