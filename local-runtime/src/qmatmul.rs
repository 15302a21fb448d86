//! Quantized matrix products for CPU inference: Q4_0, Q4_1 and Q8_0 weights against
//! activations quantized to 8 bits per 32-value block, as llama.cpp does.
//!
//! Two properties matter here. Each weight block is unpacked once and used against up to
//! four activation rows, so verifying a drafted block costs much less than one pass per
//! token. And every output element is summed in the same order whatever the number of
//! rows, so a batched verify pass is bit-identical to one-token steps.

use rayon::prelude::*;

const QK: usize = 32;
/// Activation rows that share one unpacked weight block.
const ROW_TILE: usize = 4;
/// Below this many multiply-adds a product stays on the calling thread: waking the pool
/// costs more than it saves on small matrices.
const PARALLEL_MIN_MACS: usize = 4 << 20;

/// A weight matrix `[n][k]` (one row per output), blocks of 32 along k.
pub struct QWeights {
    n: usize,
    k: usize,
    kind: Kind,
    /// Per block: scale `d`.
    d: Vec<f32>,
    /// Per block: offset `m` (value = d*q + m); Q4_0 stores -8d, Q8_0 none.
    m: Vec<f32>,
    /// Q4: 16 bytes per block (element j in the low nibble of byte j, j+16 in the high);
    /// Q8: 32 signed bytes per block.
    qs: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Q4,
    Q8,
}

impl QWeights {
    /// From GGML block bytes. `None` for a type this kernel does not handle.
    pub fn from_ggml(
        dtype: candle_core::quantized::GgmlDType,
        raw: &[u8],
        n: usize,
        k: usize,
    ) -> Option<Self> {
        use candle_core::quantized::GgmlDType as T;
        if !k.is_multiple_of(QK) {
            return None;
        }
        let blocks = n * k / QK;
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let (kind, stride) = match dtype {
            T::Q4_0 => (Kind::Q4, 18),
            T::Q4_1 => (Kind::Q4, 20),
            T::Q8_0 => (Kind::Q8, 34),
            _ => return None,
        };
        if raw.len() != blocks * stride {
            return None;
        }
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * if kind == Kind::Q4 { 16 } else { 32 });
        for b in raw.chunks_exact(stride) {
            let scale = f16(&b[0..2]);
            d.push(scale);
            match dtype {
                T::Q4_0 => {
                    m.push(-8.0 * scale);
                    qs.extend_from_slice(&b[2..18]);
                }
                T::Q4_1 => {
                    m.push(f16(&b[2..4]));
                    qs.extend_from_slice(&b[4..20]);
                }
                _ => {
                    m.push(0.0);
                    qs.extend_from_slice(&b[2..34]);
                }
            }
        }
        Some(Self {
            n,
            k,
            kind,
            d,
            m,
            qs,
        })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `x`: `[rows][k]`; returns `[rows][n]`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.k;
        let act = Activations::quantize(x, self.k);
        let mut out = vec![0f32; rows * self.n];
        if rows * self.n * self.k < PARALLEL_MIN_MACS {
            // The decode path: one pass, straight into the output.
            self.columns(&act, 0, self.n, &mut out);
            return out;
        }
        // Work items are column ranges; each computes every row for its columns.
        const COLS_PER_ITEM: usize = 64;
        let starts: Vec<usize> = (0..self.n).step_by(COLS_PER_ITEM).collect();
        let parts: Vec<(usize, Vec<f32>)> = starts
            .par_iter()
            .map(|&start| {
                let end = (start + COLS_PER_ITEM).min(self.n);
                let mut part = vec![0f32; rows * (end - start)];
                self.columns(&act, start, end, &mut part);
                (start, part)
            })
            .collect();
        for (start, part) in parts {
            let width = part.len() / rows.max(1);
            for r in 0..rows {
                out[r * self.n + start..r * self.n + start + width]
                    .copy_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        out
    }

    /// Columns `start..end` for every row, into `out` (`[rows][end-start]`).
    fn columns(&self, act: &Activations, start: usize, end: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        for tile in (0..act.rows).step_by(ROW_TILE) {
            let rows = (act.rows - tile).min(ROW_TILE);
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: AVX2 and FMA are present (checked once at start-up).
                unsafe { simd::columns(self, act, tile, rows, start, end, out) };
                continue;
            }
            let width = end - start;
            for j in start..end {
                for r in 0..rows {
                    out[(tile + r) * width + (j - start)] = self.dot_scalar(act, tile + r, j, kb);
                }
            }
        }
    }

    /// The reference: same block-wise arithmetic, no SIMD.
    fn dot_scalar(&self, act: &Activations, row: usize, j: usize, kb: usize) -> f32 {
        let mut acc = 0f32;
        let mut offset = 0f32;
        for b in 0..kb {
            let wb = j * kb + b;
            let ab = row * kb + b;
            let aq = &act.q[ab * QK..(ab + 1) * QK];
            let isum: i32 = match self.kind {
                Kind::Q4 => {
                    let q = &self.qs[wb * 16..(wb + 1) * 16];
                    (0..16)
                        .map(|e| {
                            (q[e] & 0x0F) as i32 * aq[e] as i32
                                + (q[e] >> 4) as i32 * aq[e + 16] as i32
                        })
                        .sum()
                }
                Kind::Q8 => {
                    let q = &self.qs[wb * 32..(wb + 1) * 32];
                    (0..32).map(|e| q[e] as i8 as i32 * aq[e] as i32).sum()
                }
            };
            acc += isum as f32 * (self.d[wb] * act.d[ab]);
            if self.kind == Kind::Q4 {
                offset += self.m[wb] * act.s[ab];
            }
        }
        acc + offset
    }
}

/// Activation rows quantized to 8 bits per block: scale `d`, values `q`, and `s = d * sum(q)`
/// (what a Q4_1 offset multiplies).
struct Activations {
    rows: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], k: usize) -> Self {
        let blocks = x.len() / QK;
        let mut q = vec![0i8; x.len()];
        let mut d = Vec::with_capacity(blocks);
        let mut s = Vec::with_capacity(blocks);
        for (xb, qb) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (v, o) in xb.iter().zip(qb.iter_mut()) {
                *o = (v * inv).round() as i8;
                sum += *o as i32;
            }
            d.push(scale);
            s.push(scale * sum as f32);
        }
        Self {
            rows: x.len() / k,
            q,
            d,
            s,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Activations, Kind, QWeights, QK};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Every column of `start..end` for rows `tile..tile+rows`. The row count becomes a const
    /// generic so the accumulators live in registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns(
        w: &QWeights,
        act: &Activations,
        tile: usize,
        rows: usize,
        start: usize,
        end: usize,
        out: &mut [f32],
    ) {
        match rows {
            1 => columns_n::<1>(w, act, tile, start, end, out),
            2 => columns_n::<2>(w, act, tile, start, end, out),
            3 => columns_n::<3>(w, act, tile, start, end, out),
            _ => columns_n::<4>(w, act, tile, start, end, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns_n<const R: usize>(
        w: &QWeights,
        act: &Activations,
        tile: usize,
        start: usize,
        end: usize,
        out: &mut [f32],
    ) {
        let width = end - start;
        let kb = w.k / QK;
        for j in start..end {
            let sums = dot_tile::<R>(w, act, tile, j, kb);
            for (r, sum) in sums.iter().enumerate() {
                *out.get_unchecked_mut((tile + r) * width + (j - start)) = *sum;
            }
        }
    }

    #[inline(always)]
    unsafe fn dot_tile<const R: usize>(
        w: &QWeights,
        act: &Activations,
        tile: usize,
        j: usize,
        kb: usize,
    ) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offset = [0f32; R];
        let ones = _mm256_set1_epi16(1);
        let low4 = _mm_set1_epi8(0x0F);
        let aq = act.q.as_ptr();
        let q4 = w.kind == Kind::Q4;
        for b in 0..kb {
            let wb = j * kb + b;
            // The weight block, unpacked once for all rows of the tile. For Q8 the sign trick
            // makes maddubs (unsigned x signed) compute signed x signed: |w| * (a * sign(w)).
            let (wv, wsign) = if q4 {
                let raw = _mm_loadu_si128(w.qs.as_ptr().add(wb * 16) as *const __m128i);
                let lo = _mm_and_si128(raw, low4);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
                (_mm256_set_m128i(hi, lo), _mm256_setzero_si256())
            } else {
                let q = _mm256_loadu_si256(w.qs.as_ptr().add(wb * 32) as *const __m256i);
                (_mm256_sign_epi8(q, q), q)
            };
            let wd = *w.d.get_unchecked(wb);
            let wm = *w.m.get_unchecked(wb);
            for r in 0..R {
                let ab = (tile + r) * kb + b;
                let mut a = _mm256_loadu_si256(aq.add(ab * QK) as *const __m256i);
                if !q4 {
                    a = _mm256_sign_epi8(a, wsign);
                }
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a), ones);
                let scale = _mm256_set1_ps(wd * *act.d.get_unchecked(ab));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
                if q4 {
                    offset[r] = wm.mul_add(*act.s.get_unchecked(ab), offset[r]);
                }
            }
        }
        let mut sums = [0f32; R];
        for r in 0..R {
            sums[r] = hsum(acc[r]) + offset[r];
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn weights(dtype: GgmlDType, n: usize, k: usize) -> (QWeights, Vec<f32>) {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dense = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (
            QWeights::from_ggml(dtype, &q.data().unwrap(), n, k).unwrap(),
            dense,
        )
    }

    #[test]
    fn matches_dense_product_and_is_row_count_invariant() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k) = (70, 96);
            let (w, dense) = weights(dtype, n, k);
            let x: Vec<f32> = (0..6 * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let out = w.matmul(&x);
            // The oracle: the 8-bit activations, dequantized, against the dequantized weights.
            let act = Activations::quantize(&x, k);
            let xq: Vec<f32> = act
                .q
                .iter()
                .enumerate()
                .map(|(e, q)| *q as f32 * act.d[e / QK])
                .collect();
            for r in 0..6 {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|e| xq[r * k + e] as f64 * dense[j * k + e] as f64)
                        .sum();
                    let got = out[r * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                        "{dtype:?} r{r} j{j}: {got} vs {exact}"
                    );
                    // And the 8-bit activations stay close to the float product.
                    let float: f32 = (0..k).map(|e| x[r * k + e] * dense[j * k + e]).sum();
                    assert!(
                        (got as f32 - float).abs() < 0.25,
                        "{dtype:?}: {got} vs {float}"
                    );
                }
                // One row alone: the same bits as inside the batch.
                assert_eq!(
                    w.matmul(&x[r * k..(r + 1) * k]),
                    out[r * n..(r + 1) * n].to_vec(),
                    "{dtype:?} row {r}"
                );
            }
            // SIMD and scalar paths agree to rounding.
            for (j, simd) in out[..n].iter().enumerate() {
                let s = w.dot_scalar(&act, 0, j, k / QK);
                assert!(
                    (s - simd).abs() <= 1e-3 * s.abs().max(1.0),
                    "{dtype:?} {s} vs {simd}"
                );
            }
        }
    }
}
