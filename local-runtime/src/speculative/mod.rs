//! Speculative decoding: a cheap proposer drafts a block of tokens, the target model
//! scores the whole block in one forward pass, and the verifier keeps the longest prefix
//! the target agrees with, plus one token from the target itself.
//!
//! Greedy requests get exactly the tokens plain greedy decoding gives; sampled requests
//! use the Leviathan/Chen rule, so the output follows the target's distribution.

mod adapt;
mod draft_model;
mod ngram;
mod verify;

pub use adapt::{CostCurve, DraftLength};
pub use draft_model::DraftModelProposer;
pub use ngram::NgramProposer;
pub use verify::{verify, Verdict};

use crate::sampling::SamplingParams;
use anyhow::Result;

/// Which proposer a server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpeculationMode {
    Off,
    Ngram,
    Draft,
}

impl std::str::FromStr for SpeculationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "ngram" => Ok(Self::Ngram),
            "draft" => Ok(Self::Draft),
            _ => Err(format!(
                "unknown speculation mode `{s}` (off, ngram, draft)"
            )),
        }
    }
}

/// A drafted block. `probs[i]` is the distribution `tokens[i]` was drawn from; `None`
/// means the proposer is deterministic (a point mass on each token).
#[derive(Debug, Default)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Option<Vec<Vec<f32>>>,
}

/// Something that guesses what the target will say next.
pub trait Proposer: Send {
    /// Drafts up to `max` tokens following `context` (the prompt and everything emitted).
    fn propose(
        &mut self,
        context: &[u32],
        max: usize,
        params: SamplingParams,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<Draft>;

    /// Cost of drafting `k` tokens, in target-forward units, for choosing the draft length.
    fn relative_cost(&self, k: usize) -> f64;
}

/// Per-request speculation counters, reported in usage, metrics and the ledger.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct SpecStats {
    pub drafted: u64,
    pub accepted: u64,
    pub target_passes: u64,
}

impl SpecStats {
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}
