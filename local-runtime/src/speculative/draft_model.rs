//! Drafting with a smaller model that shares the target's vocabulary.

use super::{Draft, Proposer};
use crate::kv::KvCache;
use crate::model::{argmax, Model};
use crate::sampling::{distribution, sample, SamplingParams};
use anyhow::Result;
use std::sync::Arc;

pub struct DraftModelProposer {
    model: Arc<Model>,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds.
    cached: Vec<u32>,
    /// One draft forward pass in target-forward units, measured at load.
    step_cost: f64,
}

impl DraftModelProposer {
    pub fn new(model: Arc<Model>, step_cost: f64) -> Result<Self> {
        let cache = model.new_cache()?;
        Ok(Self {
            model,
            cache,
            cached: Vec::new(),
            step_cost,
        })
    }
}

impl Proposer for DraftModelProposer {
    fn propose(
        &mut self,
        context: &[u32],
        max: usize,
        params: SamplingParams,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<Draft> {
        if context.is_empty() || max == 0 {
            return Ok(Draft::default());
        }
        // Reuse the cache up to where it agrees with the context (it holds the last draft,
        // of which only the accepted part is now in the context), and keep one token to run.
        let common = self
            .cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(context.len() - 1);
        self.cache.truncate(keep);
        self.cached.truncate(keep);
        let limit = self.model.config.context_length;
        let max = max.min(limit.saturating_sub(context.len() + 1));
        if max == 0 {
            return Ok(Draft::default());
        }
        let mut logits = self
            .model
            .forward(&context[keep..], &mut self.cache)?
            .pop()
            .unwrap_or_default();
        self.cached.extend_from_slice(&context[keep..]);
        let mut tokens = Vec::with_capacity(max);
        let mut probs = Vec::with_capacity(max);
        for i in 0..max {
            let t = if params.is_greedy() {
                argmax(&logits)
            } else {
                let q = distribution(&logits, params);
                let t = sample(&q, rng);
                probs.push(q);
                t
            };
            tokens.push(t);
            if i + 1 < max {
                logits = self
                    .model
                    .forward(&[t], &mut self.cache)?
                    .pop()
                    .unwrap_or_default();
                self.cached.push(t);
            }
        }
        Ok(Draft {
            tokens,
            probs: (!params.is_greedy()).then_some(probs),
        })
    }

    fn relative_cost(&self, k: usize) -> f64 {
        self.step_cost * k as f64
    }
}
