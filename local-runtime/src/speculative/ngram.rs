//! Prompt-lookup drafting: when the text being written repeats something already in the
//! context (summaries, code edits, quotes), the continuation of the earlier occurrence is
//! a good guess. No extra model; the cost is a scan of the context.

use super::{Draft, Proposer};
use crate::sampling::SamplingParams;
use anyhow::Result;

pub struct NgramProposer {
    /// Longest suffix tried first; shorter suffixes are tried down to `min_ngram`.
    pub max_ngram: usize,
    pub min_ngram: usize,
}

impl Default for NgramProposer {
    fn default() -> Self {
        Self {
            max_ngram: 4,
            min_ngram: 2,
        }
    }
}

impl NgramProposer {
    /// The tokens that followed the most recent earlier occurrence of the context's suffix.
    pub fn lookup(&self, context: &[u32], max: usize) -> Vec<u32> {
        let len = context.len();
        for n in (self.min_ngram..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let suffix = &context[len - n..];
            // Latest match first: recent text predicts best. The match may not be the suffix itself.
            for start in (0..len - n).rev() {
                if &context[start..start + n] == suffix {
                    let from = start + n;
                    let to = (from + max).min(len);
                    if to > from {
                        return context[from..to].to_vec();
                    }
                }
            }
        }
        Vec::new()
    }
}

impl Proposer for NgramProposer {
    fn propose(
        &mut self,
        context: &[u32],
        max: usize,
        _: SamplingParams,
        _: &mut rand::rngs::StdRng,
    ) -> Result<Draft> {
        Ok(Draft {
            tokens: self.lookup(context, max),
            probs: None,
        })
    }

    fn relative_cost(&self, _: usize) -> f64 {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_latest_earlier_occurrence() {
        let p = NgramProposer::default();
        // "1 2 3 4 9 ... 1 2 3 5 6 ... 1 2 3" -> the latest "1 2 3" was followed by 5 6.
        let ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3];
        assert_eq!(p.lookup(&ctx, 2), vec![5, 6]);
        assert_eq!(p.lookup(&ctx, 10), vec![5, 6, 7, 1, 2, 3]);
        assert!(p.lookup(&[1, 2, 3, 4], 4).is_empty());
    }
}
