//! Choosing the draft length from what speculation actually buys.
//!
//! With per-token acceptance rate a, a block of k drafts yields (1 - a^(k+1)) / (1 - a)
//! tokens per target pass, and a pass over k+1 tokens costs `curve.cost(k+1)` one-token
//! passes, plus the proposer's own cost. The chosen k maximises tokens per unit of cost;
//! k = 0 is plain decoding, so speculation switches itself off where it does not pay.

/// Cost of one target forward pass over n tokens, relative to a pass over one token,
/// measured on this machine when the model loads.
#[derive(Debug, Clone)]
pub struct CostCurve {
    /// `relative[n - 1]` for n = 1..=len; `relative[0] == 1`.
    pub relative: Vec<f64>,
}

impl CostCurve {
    pub fn cost(&self, n: usize) -> f64 {
        match self.relative.get(n.saturating_sub(1)) {
            Some(c) => *c,
            // Beyond what was measured: extrapolate linearly from the last two points.
            None => {
                let l = self.relative.len();
                let (a, b) = (self.relative[l.saturating_sub(2)], self.relative[l - 1]);
                b + (b - a).max(0.0) * (n - l) as f64
            }
        }
    }

    /// The longest block worth measuring and drafting.
    pub fn max_block(&self) -> usize {
        self.relative.len()
    }
}

/// Per-sequence draft length controller.
#[derive(Debug, Clone)]
pub struct DraftLength {
    /// Exponentially decayed counts of accepted and of tried drafted tokens.
    accepted: f64,
    tried: f64,
    max_k: usize,
    steps_off: u32,
}

/// Decay per verify pass: about the last 10 passes dominate the estimate.
const DECAY: f64 = 0.9;
/// While off, probe with a short draft this often so a change in the text is noticed.
const PROBE_EVERY: u32 = 16;

impl DraftLength {
    pub fn new(max_k: usize) -> Self {
        // Prior: one accepted of two tried (a = 0.5).
        Self {
            accepted: 1.0,
            tried: 2.0,
            max_k,
            steps_off: 0,
        }
    }

    pub fn acceptance(&self) -> f64 {
        self.accepted / self.tried
    }

    /// Expected tokens per target pass with k drafted tokens.
    pub fn expected_tokens(a: f64, k: usize) -> f64 {
        if a >= 0.999_999 {
            return (k + 1) as f64;
        }
        (1.0 - a.powi(k as i32 + 1)) / (1.0 - a)
    }

    /// The draft length for the next pass.
    pub fn choose(&mut self, curve: &CostCurve, proposer_cost: impl Fn(usize) -> f64) -> usize {
        let a = self.acceptance();
        let max_k = self.max_k.min(curve.max_block().saturating_sub(1));
        let mut best = (0, 1.0);
        let mut best_if_perfect = 1.0f64;
        for k in 1..=max_k {
            let cost = curve.cost(k + 1) + proposer_cost(k);
            let rate = Self::expected_tokens(a, k) / cost;
            if rate > best.1 * 1.02 {
                best = (k, rate);
            }
            best_if_perfect = best_if_perfect.max((k + 1) as f64 / cost);
        }
        if best_if_perfect <= 1.02 {
            // Even a proposer that is always right would not pay for itself here: never probe.
            return 0;
        }
        if best.0 == 0 {
            self.steps_off += 1;
            if self.steps_off.is_multiple_of(PROBE_EVERY) {
                return 2.min(self.max_k);
            }
        } else {
            self.steps_off = 0;
        }
        best.0
    }

    /// Records a verified block: `accepted` of `drafted` kept.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        // Geometric model: each kept token is a success; the first rejection is one failure.
        let failures = usize::from(accepted < drafted);
        self.accepted = self.accepted * DECAY + accepted as f64;
        self.tried = self.tried * DECAY + (accepted + failures) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculates_when_cheap_and_accepted_and_stops_when_not() {
        let flat = CostCurve {
            relative: vec![1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4],
        };
        let mut d = DraftLength::new(8);
        for _ in 0..20 {
            d.observe(8, 8);
        }
        assert!(
            d.choose(&flat, |_| 0.0) >= 6,
            "high acceptance, flat cost: long drafts"
        );
        for _ in 0..100 {
            d.observe(4, 0);
        }
        assert_eq!(d.choose(&flat, |_| 0.0), 0, "nothing accepted: off");
        // A verify pass that costs as much as the tokens it checks never pays.
        let linear = CostCurve {
            relative: (1..=9).map(|n| n as f64).collect(),
        };
        let mut d = DraftLength::new(8);
        for _ in 0..20 {
            d.observe(8, 7);
        }
        assert_eq!(d.choose(&linear, |_| 0.0), 0);
        // Where even a perfect proposer cannot pay, it is not even probed.
        let probes = (0..4 * PROBE_EVERY)
            .filter(|_| d.choose(&linear, |_| 0.0) > 0)
            .count();
        assert_eq!(probes, 0);
        // Where a good proposer would pay but this one is not accepted, it probes now and then.
        let mut d = DraftLength::new(8);
        for _ in 0..100 {
            d.observe(4, 0);
        }
        let probes = (0..PROBE_EVERY)
            .filter(|_| d.choose(&flat, |_| 0.0) > 0)
            .count();
        assert_eq!(probes, 1);
    }
}
