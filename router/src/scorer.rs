//! The linear scorer: `sigmoid(bias + dense·w_dense + hashed·w_hashed)`.
//!
//! Weights file format (little-endian): magic `TGR1`, `u32` dense count, `u32` bucket count,
//! `f32` bias, the dense weights, the bucket weights.

use serde_json::Value;

use crate::features::{scan_fields, DENSE, HASH_BUCKETS};

/// The shipped weights (see `model/PROVENANCE.md`).
const SHIPPED: &[u8] = include_bytes!("../model/scorer.bin");

#[derive(Clone)]
pub struct Scorer {
    pub bias: f32,
    pub dense: [f32; DENSE],
    pub hashed: Vec<f32>,
}

impl Default for Scorer {
    fn default() -> Self {
        Scorer {
            bias: 0.0,
            dense: [0.0; DENSE],
            hashed: vec![0.0; HASH_BUCKETS],
        }
    }
}

impl Scorer {
    /// The model trained on the public preference data and shipped with Tollgate.
    pub fn shipped() -> Scorer {
        Scorer::from_bytes(SHIPPED).expect("the shipped weights are well-formed")
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Scorer> {
        let (magic, rest) = bytes.split_at_checked(4)?;
        if magic != b"TGR1" {
            return None;
        }
        let mut floats = rest.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
        let dense_n = u32::from_le_bytes(floats.next()?) as usize;
        let buckets = u32::from_le_bytes(floats.next()?) as usize;
        if dense_n != DENSE
            || buckets != HASH_BUCKETS
            || rest.len() != 4 * (3 + DENSE + HASH_BUCKETS)
        {
            return None;
        }
        let mut next = || f32::from_le_bytes(floats.next().expect("length checked"));
        let bias = next();
        let mut dense = [0.0; DENSE];
        dense.iter_mut().for_each(|w| *w = next());
        let hashed = (0..HASH_BUCKETS).map(|_| next()).collect();
        Some(Scorer {
            bias,
            dense,
            hashed,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"TGR1".to_vec();
        out.extend((DENSE as u32).to_le_bytes());
        out.extend((HASH_BUCKETS as u32).to_le_bytes());
        out.extend(self.bias.to_le_bytes());
        self.dense
            .iter()
            .chain(&self.hashed)
            .for_each(|w| out.extend(w.to_le_bytes()));
        out
    }

    /// Raw linear score of extracted features (the logit).
    pub fn logit(&self, features: &crate::features::Features) -> f32 {
        let dense: f32 = self
            .dense
            .iter()
            .zip(&features.dense)
            .map(|(w, x)| w * x)
            .sum();
        let hashed: f32 = features
            .hashed
            .iter()
            .map(|(b, x)| self.hashed[*b as usize] * x)
            .sum();
        self.bias + dense + hashed
    }

    /// Probability-like score in [0, 1] that the premium model is needed. Same value as
    /// `logit(&extract(request))` through the sigmoid, without materialising the features.
    pub fn score(&self, request: &Value) -> f32 {
        self.score_fields(&|name| request.get(name))
    }

    /// [`Scorer::score`] of a request given by field lookup.
    pub fn score_fields<'v>(&self, field: &dyn Fn(&str) -> Option<&'v Value>) -> f32 {
        let (mut sum, mut n) = (0.0f32, 0usize);
        let dense = scan_fields(field, |b| {
            sum += self.hashed[b as usize];
            n += 1;
        });
        let dense: f32 = self.dense.iter().zip(&dense).map(|(w, x)| w * x).sum();
        let z = self.bias + dense + sum / (n.max(1) as f32).sqrt();
        1.0 / (1.0 + (-z).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shipped_weights_load_and_score_deterministically() {
        let scorer = Scorer::shipped();
        let easy = json!({"messages": [{"role": "user", "content": "Hi! What is the capital of France?"}]});
        let a = scorer.score(&easy);
        assert_eq!(a, Scorer::shipped().score(&easy));
        assert!((0.0..=1.0).contains(&a));
        assert_eq!(
            Scorer::from_bytes(&scorer.to_bytes()).unwrap().score(&easy),
            a
        );
        // The streaming path equals the materialised features (up to float summation order).
        let z = scorer.logit(&crate::features::extract(&easy));
        assert!((1.0 / (1.0 + (-z).exp()) - a).abs() < 1e-5);
        assert!(Scorer::from_bytes(b"nope").is_none());
        // Empty and odd requests score without panicking.
        for odd in [
            json!({}),
            json!({"messages": "x"}),
            json!({"messages": [{"content": [{"text": 5}]}]}),
        ] {
            assert!((0.0..=1.0).contains(&scorer.score(&odd)));
        }
    }
}
