//! Complexity routing, pure (no I/O): how likely is the premium model's answer to a chat request
//! meaningfully better than the cheap model's?
//!
//! - [`features`] turns an OpenAI chat request into cheap signals and hashed word n-grams.
//! - [`scorer`] is the linear model over them ([`Scorer::score`] in [0, 1]); the shipped weights
//!   are in `model/` with their provenance, reproduced by `examples/train.rs`.
//! - [`metrics`] scores a router on preference data (APGR, CPT) as RouteLLM does.

pub mod features;
pub mod metrics;
pub mod policy;
pub mod scorer;

pub use scorer::Scorer;
