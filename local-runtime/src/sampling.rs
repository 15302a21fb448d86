//! Turning logits into a next token: greedy, or temperature and nucleus (top-p) sampling.

use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
}

impl SamplingParams {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_p: 1.0,
    };

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 1e-5
    }
}

/// The distribution a token is sampled from: softmax(logits / T), restricted to the
/// smallest set of tokens whose mass reaches `top_p`, renormalised. Greedy is a point mass.
pub fn distribution(logits: &[f32], params: SamplingParams) -> Vec<f32> {
    let mut p = vec![0f32; logits.len()];
    if params.is_greedy() {
        p[crate::model::argmax(logits) as usize] = 1.0;
        return p;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for (pi, &l) in p.iter_mut().zip(logits) {
        *pi = ((l - max) / params.temperature).exp();
        sum += *pi as f64;
    }
    for pi in &mut p {
        *pi = (*pi as f64 / sum) as f32;
    }
    if params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i] > 0.0).collect();
        order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let mut mass = 0f32;
        let mut keep = order.len();
        for (n, &i) in order.iter().enumerate() {
            mass += p[i];
            if mass >= params.top_p {
                keep = n + 1;
                break;
            }
        }
        let kept: f32 = order[..keep].iter().map(|&i| p[i]).sum();
        let mut out = vec![0f32; p.len()];
        for &i in &order[..keep] {
            out[i] = p[i] / kept;
        }
        return out;
    }
    p
}

/// Draws an index from a distribution that sums to 1 (up to rounding).
pub fn sample(p: &[f32], rng: &mut impl Rng) -> u32 {
    let total: f32 = p.iter().sum();
    let mut r = rng.gen::<f32>() * total;
    let mut last = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            if r < pi {
                return i as u32;
            }
            r -= pi;
            last = i;
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        let logits = [2.0f32.ln(), 1.0f32.ln(), 1.0f32.ln(), 0.0];
        // softmax: 0.4, 0.2, 0.2, 0.2 (T = 1); top_p 0.5 keeps the first two.
        let p = distribution(
            &logits,
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
            },
        );
        assert!(
            (p[0] - 2.0 / 3.0).abs() < 1e-6 && (p[1] - 1.0 / 3.0).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(&p[2..], &[0.0, 0.0]);
        let g = distribution(&logits, SamplingParams::GREEDY);
        assert_eq!(g, vec![1.0, 0.0, 0.0, 0.0]);
    }
}
