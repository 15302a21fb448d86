//! Accepting or rejecting a drafted block against the target's distributions.

use crate::model::argmax;
use crate::sampling::{distribution, sample, SamplingParams};
use rand::Rng;

/// How many drafted tokens the target keeps, and the token it adds after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: usize,
    pub next: u32,
}

/// `logits[i]` is the target's prediction after the context and `draft.tokens[..i]`; there
/// are `draft.tokens.len() + 1` rows.
///
/// Greedy: keep drafted tokens while they are the target's argmax; `next` is the argmax
/// where they stop agreeing (or after the block). Sampled (Leviathan et al. 2023, Chen et
/// al. 2023): keep token x with probability min(1, p(x)/q(x)); on the first rejection draw
/// from max(0, p - q) renormalised; if all are kept, draw a bonus token from p.
pub fn verify(
    logits: &[Vec<f32>],
    draft: &super::Draft,
    params: SamplingParams,
    rng: &mut impl Rng,
) -> Verdict {
    let k = draft.tokens.len();
    debug_assert_eq!(logits.len(), k + 1);
    if params.is_greedy() {
        for (i, &t) in draft.tokens.iter().enumerate() {
            let best = argmax(&logits[i]);
            if best != t {
                return Verdict {
                    accepted: i,
                    next: best,
                };
            }
        }
        return Verdict {
            accepted: k,
            next: argmax(&logits[k]),
        };
    }
    for (i, &x) in draft.tokens.iter().enumerate() {
        let p = distribution(&logits[i], params);
        let q_x = draft.probs.as_ref().map_or(1.0, |q| q[i][x as usize]);
        let p_x = p[x as usize];
        if q_x > 0.0 && rng.gen::<f32>() < (p_x / q_x).min(1.0) {
            continue;
        }
        return Verdict {
            accepted: i,
            next: sample(
                &residual(&p, draft.probs.as_ref().map(|q| &q[i][..]), x),
                rng,
            ),
        };
    }
    Verdict {
        accepted: k,
        next: sample(&distribution(&logits[k], params), rng),
    }
}

/// max(0, p - q), renormalised. A deterministic proposer's q is a point mass on `x`.
fn residual(p: &[f32], q: Option<&[f32]>, x: u32) -> Vec<f32> {
    let mut r: Vec<f32> = match q {
        Some(q) => p.iter().zip(q).map(|(p, q)| (p - q).max(0.0)).collect(),
        None => {
            let mut r = p.to_vec();
            r[x as usize] = 0.0;
            r
        }
    };
    let total: f32 = r.iter().sum();
    if total <= 0.0 {
        // p == q: any rejection here has probability zero; fall back to p.
        return p.to_vec();
    }
    r.iter_mut().for_each(|v| *v /= total);
    r
}

#[cfg(test)]
mod tests {
    use super::super::Draft;
    use super::*;
    use rand::SeedableRng;

    fn logits_of(p: &[f32]) -> Vec<f32> {
        p.iter().map(|p| p.ln()).collect()
    }

    /// Pearson's chi-square statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[u64], p: &[f32]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &p)| {
                let e = n as f64 * p as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// With draft tokens drawn from q, the tokens the verifier emits at each of the first two
    /// positions follow the target p. 5 categories: 4 degrees of freedom; the 0.999 quantile
    /// of chi-square(4) is 18.47, so a correct verifier fails with probability 1e-3 per check
    /// (the seed is fixed, so the test is deterministic). A verifier that, say, always kept the
    /// draft would score in the thousands.
    #[test]
    fn stochastic_verifier_reproduces_the_target_distribution() {
        let p = [0.40f32, 0.25, 0.20, 0.10, 0.05];
        let q = [0.10f32, 0.10, 0.30, 0.30, 0.20];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut first = [0u64; 5];
        let mut second = [0u64; 5];
        let trials = 60_000;
        for _ in 0..trials {
            let d0 = sample(&q, &mut rng);
            let d1 = sample(&q, &mut rng);
            let draft = Draft {
                tokens: vec![d0, d1],
                probs: Some(vec![q.to_vec(), q.to_vec()]),
            };
            let rows = vec![logits_of(&p), logits_of(&p), logits_of(&p)];
            let v = verify(&rows, &draft, params, &mut rng);
            let emitted: Vec<u32> = draft.tokens[..v.accepted]
                .iter()
                .copied()
                .chain([v.next])
                .collect();
            first[emitted[0] as usize] += 1;
            if emitted.len() > 1 {
                second[emitted[1] as usize] += 1;
            }
        }
        assert!(chi_square(&first, &p) < 18.47, "first token: {first:?}");
        assert!(chi_square(&second, &p) < 18.47, "second token: {second:?}");
        // Deterministic drafts (n-gram): q is a point mass.
        let mut counts = [0u64; 5];
        for _ in 0..trials {
            let draft = Draft {
                tokens: vec![3],
                probs: None,
            };
            let v = verify(&[logits_of(&p), logits_of(&p)], &draft, params, &mut rng);
            counts[if v.accepted == 1 { 3 } else { v.next as usize }] += 1;
        }
        assert!(
            chi_square(&counts, &p) < 18.47,
            "point-mass draft: {counts:?}"
        );
        // And the statistic does catch a biased sampler.
        let biased = [first[0] * 2, first[1], first[2], first[3], first[4]];
        assert!(chi_square(&biased, &p) > 100.0);
    }

    #[test]
    fn greedy_keeps_the_agreeing_prefix() {
        let rows = vec![
            vec![0.0, 5.0, 1.0],
            vec![3.0, 0.0, 1.0],
            vec![0.0, 0.0, 9.0],
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let d = Draft {
            tokens: vec![1, 2],
            probs: None,
        };
        assert_eq!(
            verify(&rows, &d, SamplingParams::GREEDY, &mut rng),
            Verdict {
                accepted: 1,
                next: 0
            }
        );
        let d = Draft {
            tokens: vec![1, 0],
            probs: None,
        };
        assert_eq!(
            verify(&rows, &d, SamplingParams::GREEDY, &mut rng),
            Verdict {
                accepted: 2,
                next: 2
            }
        );
    }
}
