//! Prices and costs in integer micro-dollars, so that sums are exact.

use serde::{Deserialize, Serialize};

/// Price of a model in micro-dollars per one million tokens
/// (equivalently: pico-dollars per token). `0.15` USD per 1M tokens is `150_000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    /// Audio tokens in the prompt; `None`: the model is not priced for audio input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_input: Option<u64>,
    /// Audio tokens in the output; `None`: the model is not priced for audio output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_output: Option<u64>,
    /// Micro-dollars per web search call; `None`: the model is not priced for web search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search_call: Option<u64>,
}

/// Tokens a request used, as billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// All prompt tokens, cached ones included (OpenAI's `prompt_tokens`).
    pub prompt: u64,
    /// The part of `prompt` served from the provider's prompt cache.
    pub cached: u64,
    pub completion: u64,
    /// The part of `prompt` that is audio (priced at `audio_input`).
    pub audio_prompt: u64,
    /// The part of `completion` that is audio (priced at `audio_output`).
    pub audio_completion: u64,
    /// Web search calls (a fee each, on top of tokens).
    pub web_searches: u64,
}

impl Usage {
    /// Prompt plus completion tokens, saturating (a reservation never wraps around).
    pub fn tokens(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
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
    /// Audio is priced at the audio prices (text prices where the model has none: such
    /// requests are refused before they are sent); web search calls add their fee. Saturates
    /// at `u64::MAX`.
    pub fn cost_micros(&self, usage: Usage) -> u64 {
        let audio_prompt = usage.audio_prompt.min(usage.prompt);
        let text_prompt = usage.prompt - audio_prompt;
        let cached = usage.cached.min(text_prompt) as u128;
        let uncached = text_prompt as u128 - cached;
        let audio_completion = usage.audio_completion.min(usage.completion);
        let text_completion = (usage.completion - audio_completion) as u128;
        let pico = uncached * self.input as u128
            + cached * self.cached_input as u128
            + audio_prompt as u128 * self.audio_input.unwrap_or(self.input) as u128
            + text_completion * self.output as u128
            + audio_completion as u128 * self.audio_output.unwrap_or(self.output) as u128;
        let micros = (pico + PER_MILLION / 2) / PER_MILLION
            + usage.web_searches as u128 * self.web_search_call.unwrap_or(0) as u128;
        u64::try_from(micros).unwrap_or(u64::MAX)
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
            ..Default::default()
        };
        // 1M input tokens at $2.50 = 2.5M micro-dollars.
        let usage = Usage {
            prompt: 1_000_000,
            ..Default::default()
        };
        assert_eq!(price.cost_micros(usage), 2_500_000);
        // 1000 prompt (400 cached) + 500 completion:
        // 600*2.5 + 400*1.25 + 500*10 = 1500 + 500 + 5000 = 7000 micro-dollars.
        let usage = Usage {
            prompt: 1000,
            cached: 400,
            completion: 500,
            ..Default::default()
        };
        assert_eq!(price.cost_micros(usage), 7000);
        // 1 token at $0.15/1M = 0.15 micro-dollars, rounds to 0; 4 tokens = 0.6 -> 1.
        let cheap = Price {
            input: 150_000,
            cached_input: 75_000,
            output: 600_000,
            ..Default::default()
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
                ..Default::default()
            }),
            1
        );
    }

    #[test]
    fn audio_and_web_search_are_priced_apart_and_costs_saturate() {
        let price = Price {
            input: 2_500_000,
            cached_input: 1_250_000,
            output: 10_000_000,
            audio_input: Some(40_000_000),
            audio_output: Some(80_000_000),
            web_search_call: Some(25_000),
        };
        // 1000 prompt of which 400 audio, 100 cached text; 500 completion of which 200 audio;
        // two searches: 500*2.5 + 100*1.25 + 400*40 + 300*10 + 200*80 + 2*25000
        //             = 1250 + 125 + 16000 + 3000 + 16000 + 50000 micro-dollars.
        let usage = Usage {
            prompt: 1000,
            cached: 100,
            completion: 500,
            audio_prompt: 400,
            audio_completion: 200,
            web_searches: 2,
        };
        assert_eq!(price.cost_micros(usage), 86_375);
        let huge = Usage {
            prompt: u64::MAX,
            completion: u64::MAX,
            web_searches: u64::MAX,
            ..Default::default()
        };
        assert_eq!(price.cost_micros(huge), u64::MAX);
        assert_eq!(huge.tokens(), u64::MAX);
    }
}
