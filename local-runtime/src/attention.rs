//! Causal attention over a host KV cache.
//!
//! Each (query row, head) output depends only on that row and the cache, in a fixed
//! summation order, so verifying k drafted tokens in one pass gives bit-for-bit the
//! logits that k one-token steps give. A batched GEMM does not promise that, and a
//! last-bit difference can flip a greedy choice.

/// Shapes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_head: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

/// `q`: `[n][n_head][head_dim]` for positions `start..start+n`; `k`, `v`:
/// `[start+n][n_kv][head_dim]`. Returns `[n][n_head][head_dim]`.
pub(crate) fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    s: AttnShape,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { attention_avx2(q, k, v, start, s) };
    }
    attention_generic(q, k, v, start, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attention_avx2(q: &[f32], k: &[f32], v: &[f32], start: usize, s: AttnShape) -> Vec<f32> {
    attention_generic(q, k, v, start, s)
}

#[inline(always)]
fn attention_generic(q: &[f32], k: &[f32], v: &[f32], start: usize, s: AttnShape) -> Vec<f32> {
    let AttnShape {
        n_head,
        n_kv,
        head_dim: d,
    } = s;
    let n = q.len() / (n_head * d);
    let group = n_head / n_kv;
    let row = n_kv * d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    let mut scores = vec![0f32; start + n];
    for i in 0..n {
        let visible = start + i + 1;
        for h in 0..n_head {
            let g = h / group;
            let qh = &q[(i * n_head + h) * d..][..d];
            let mut max = f32::NEG_INFINITY;
            for (j, score) in scores[..visible].iter_mut().enumerate() {
                *score = dot(qh, &k[j * row + g * d..][..d]) * scale;
                max = max.max(*score);
            }
            let mut sum = 0f32;
            for score in &mut scores[..visible] {
                *score = (*score - max).exp();
                sum += *score;
            }
            let inv = 1.0 / sum;
            let oh = &mut out[(i * n_head + h) * d..][..d];
            for (j, w) in scores[..visible].iter().enumerate() {
                axpy(oh, &v[j * row + g * d..][..d], w * inv);
            }
        }
    }
    out
}

/// Dot product with eight independent lanes, which the compiler keeps in one vector register.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

#[inline(always)]
fn axpy(out: &mut [f32], x: &[f32], a: f32) {
    for (o, x) in out.iter_mut().zip(x) {
        *o = x.mul_add(a, *o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention, written the obvious way, as the oracle.
    fn reference(q: &[f32], k: &[f32], v: &[f32], start: usize, s: AttnShape) -> Vec<f32> {
        let d = s.head_dim;
        let n = q.len() / (s.n_head * d);
        let mut out = vec![0f32; q.len()];
        for i in 0..n {
            for h in 0..s.n_head {
                let g = h / (s.n_head / s.n_kv);
                let qv = &q[(i * s.n_head + h) * d..][..d];
                let ws: Vec<f64> = (0..=start + i)
                    .map(|j| {
                        let kv = &k[(j * s.n_kv + g) * d..][..d];
                        qv.iter()
                            .zip(kv)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = ws.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = ws.iter().map(|w| (w - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for t in 0..d {
                        out[(i * s.n_head + h) * d + t] +=
                            (w / z * v[(j * s.n_kv + g) * d + t] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_reference_and_is_batch_invariant() {
        let s = AttnShape {
            n_head: 6,
            n_kv: 2,
            head_dim: 20,
        };
        let (start, n) = (5, 4);
        let q = pseudo(n * 6 * 20, 1);
        let k = pseudo((start + n) * 2 * 20, 2);
        let v = pseudo((start + n) * 2 * 20, 3);
        let batched = causal_attention(&q, &k, &v, start, s);
        for (a, b) in batched.iter().zip(reference(&q, &k, &v, start, s)) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // Row by row, each with only the cache it would have had: identical bits.
        for i in 0..n {
            let qi = &q[i * 120..(i + 1) * 120];
            let one = causal_attention(
                qi,
                &k[..(start + i + 1) * 40],
                &v[..(start + i + 1) * 40],
                start + i,
                s,
            );
            assert_eq!(one, batched[i * 120..(i + 1) * 120]);
        }
    }
}
