//! The llama-family transformer (Llama, SmolLM2, Mistral, Qwen2) over quantized weights.
//!
//! Unlike a plain decoder, `forward` takes any number of new tokens and returns the
//! logits of every one of them: speculative decoding verifies a whole drafted block in
//! one pass. Its cache (`KvCache`) rolls back in O(1).

use crate::attention::{causal_attention, AttnShape};
use crate::gguf::{GgufFile, ModelConfig};
use crate::kv::{KvCache, LayerKv};
use crate::qmatmul::QWeights;
use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

enum Weight {
    /// This crate's CPU kernel (Q4_0, Q4_1, Q8_0): batch-invariant, reuses weights across rows.
    Host(QWeights),
    /// candle's quantized matmul: other types, and accelerators.
    Candle(QMatMul),
}

struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(g: &mut GgufFile, name: &str, device: &Device) -> Result<Self> {
        let weight = Self::weight(g.tensor(&format!("{name}.weight"), device)?, device)?;
        let bias_name = format!("{name}.bias");
        let bias = if g.has_tensor(&bias_name) {
            Some(g.tensor(&bias_name, device)?.dequantize(device)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn weight(q: QTensor, device: &Device) -> Result<Weight> {
        if device.is_cpu() {
            let (n, k) = q.shape().dims2()?;
            if let Some(w) = QWeights::from_ggml(q.dtype(), &q.data()?, n, k) {
                return Ok(Weight::Host(w));
            }
        }
        Ok(Weight::Candle(QMatMul::from_qtensor(
            requantize_for_candle(q, device)?,
        )?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(x)?,
            Weight::Host(w) => {
                let rows = x.dim(0)?;
                let out = w.matmul(&x.flatten_all()?.to_vec1::<f32>()?);
                Tensor::from_vec(out, (rows, w.out_features()), x.device())?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

pub struct Model {
    pub config: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
}

impl Model {
    pub fn load(g: &mut GgufFile, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_gguf(g)?;
        let vec = |g: &mut GgufFile, name: &str| -> Result<Tensor> {
            Ok(g.tensor(name, device)?.dequantize(device)?)
        };
        let embed_q = g.tensor("token_embd.weight", device)?;
        let embed = embed_q.dequantize(device)?;
        let output = if g.has_tensor("output.weight") {
            Linear::load(g, "output", device)?
        } else {
            // Tied embeddings (SmolLM2, small Qwen2): the output projection is the embedding matrix.
            Linear {
                weight: Linear::weight(embed_q, device)?,
                bias: None,
            }
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: vec(g, &format!("{p}.attn_norm.weight"))?,
                wq: Linear::load(g, &format!("{p}.attn_q"), device)?,
                wk: Linear::load(g, &format!("{p}.attn_k"), device)?,
                wv: Linear::load(g, &format!("{p}.attn_v"), device)?,
                wo: Linear::load(g, &format!("{p}.attn_output"), device)?,
                ffn_norm: vec(g, &format!("{p}.ffn_norm.weight"))?,
                w_gate: Linear::load(g, &format!("{p}.ffn_gate"), device)?,
                w_up: Linear::load(g, &format!("{p}.ffn_up"), device)?,
                w_down: Linear::load(g, &format!("{p}.ffn_down"), device)?,
            });
        }
        let norm = vec(g, "output_norm.weight")?;
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        KvCache::new(
            self.config.n_layer,
            self.config.n_head_kv,
            self.config.head_dim,
            &self.device,
        )
    }

    /// Runs `tokens` at positions `cache.len()..` and returns their logits, `[n, vocab]`, on
    /// the host. The cache grows by `tokens.len()`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let n = tokens.len();
        let start = cache.len();
        anyhow::ensure!(n > 0, "forward needs at least one token");
        anyhow::ensure!(
            start + n <= c.context_length,
            "context length {} exceeded",
            c.context_length
        );
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, start, n)?;
        let sin = self.sin.narrow(0, start, n)?;
        let shape = AttnShape {
            n_head: c.n_head,
            n_kv: c.n_head_kv,
            head_dim: c.head_dim,
        };
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
            let q = self.rope(&layer.wq.forward(&h)?, c.n_head, &cos, &sin)?;
            let k = self.rope(&layer.wk.forward(&h)?, c.n_head_kv, &cos, &sin)?;
            let v = layer.wv.forward(&h)?;
            let attn = match kv {
                LayerKv::Host { k: kc, v: vc } => {
                    kc.extend(k.flatten_all()?.to_vec1::<f32>()?);
                    vc.extend(v.flatten_all()?.to_vec1::<f32>()?);
                    let out =
                        causal_attention(&q.flatten_all()?.to_vec1::<f32>()?, kc, vc, start, shape);
                    Tensor::from_vec(out, (n, c.n_head * c.head_dim), &self.device)?
                }
                LayerKv::Device { k: kc, v: vc } => {
                    device_attention(&q, &k, &v, (kc, vc), start, cache.capacity, c)?
                }
            };
            let x1 = (&x + layer.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, c.rms_eps as f32)?;
            let ff =
                (candle_nn::ops::silu(&layer.w_gate.forward(&h)?)? * layer.w_up.forward(&h)?)?;
            x = (x1 + layer.w_down.forward(&ff)?)?;
        }
        if let Some(LayerKv::Device { .. }) = cache.layers.first() {
            cache.capacity = cache.capacity.max(start + n);
        }
        cache.advance(n);
        let x = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps as f32)?;
        let logits = self.output.forward(&x)?.to_dtype(DType::F32)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    /// `[n, heads*head_dim]` to the same layout with rotary position embedding applied.
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let d = self.config.head_dim;
        let x = x.reshape((1, n, heads, d))?.transpose(1, 2)?.contiguous()?;
        let x = if self.config.rope_interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        Ok(x.transpose(1, 2)?.reshape((n, heads * d))?)
    }
}

/// Attention on an accelerator: keys and values written in place into the cache tensors,
/// grouped-query heads batched against their shared kv head.
fn device_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (kc, vc): (&mut Tensor, &mut Tensor),
    start: usize,
    capacity: usize,
    c: &ModelConfig,
) -> Result<Tensor> {
    let (n, _) = q.dims2()?;
    let d = c.head_dim;
    let total = start + n;
    if total > kc.dim(1)? {
        let grow = |t: &Tensor| -> Result<Tensor> {
            let bigger = Tensor::zeros(
                (c.n_head_kv, (total * 2).max(capacity), d),
                DType::F32,
                t.device(),
            )?;
            bigger.slice_set(&t.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
            Ok(bigger)
        };
        *kc = grow(kc)?;
        *vc = grow(vc)?;
    }
    let to_heads = |t: &Tensor, h: usize| -> Result<Tensor> {
        Ok(t.reshape((n, h, d))?.transpose(0, 1)?.contiguous()?)
    };
    kc.slice_set(&to_heads(k, c.n_head_kv)?, 1, start)?;
    vc.slice_set(&to_heads(v, c.n_head_kv)?, 1, start)?;
    let keys = kc.narrow(1, 0, total)?.contiguous()?;
    let values = vc.narrow(1, 0, total)?.contiguous()?;
    let group = c.n_head / c.n_head_kv;
    let q = to_heads(q, c.n_head)?.reshape((c.n_head_kv, group * n, d))?;
    let scores =
        (q.matmul(&keys.t()?)? / (d as f64).sqrt())?.reshape((c.n_head_kv, group, n, total))?;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (n, total), q.device())?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    let out = probs
        .reshape((c.n_head_kv, group * n, total))?
        .matmul(&values)?;
    Ok(out
        .reshape((c.n_head, n, d))?
        .transpose(0, 1)?
        .reshape((n, c.n_head * d))?)
}

/// candle has no SIMD kernel for Q4_1/Q5_x on CPU; Q8_0 was measured about 3.7x faster.
fn requantize_for_candle(q: QTensor, device: &Device) -> Result<QTensor> {
    let slow = matches!(
        q.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    );
    if device.is_cpu() && slow && q.shape().dims().last().is_some_and(|k| k % 32 == 0) {
        return Ok(QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?);
    }
    Ok(q)
}

fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / c.head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, c.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((c.context_length, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Index of the largest logit; ties go to the lowest index, as in every reference decoder.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
