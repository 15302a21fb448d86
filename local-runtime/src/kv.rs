//! Per-sequence key/value cache. Appends are amortised O(1) and rolling back to any
//! length is O(1): speculative decoding drops the rejected tail after every verify pass.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// One layer's keys and values.
pub(crate) enum LayerKv {
    /// Host memory, laid out `[position][kv_head][head_dim]` so a step appends at the end.
    Host { k: Vec<f32>, v: Vec<f32> },
    /// Accelerator memory: `[kv_head][capacity][head_dim]`, written in place, grown by doubling.
    Device { k: Tensor, v: Tensor },
}

pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    len: usize,
    /// Floats per position and layer: `kv_heads * head_dim`.
    width: usize,
    pub(crate) capacity: usize,
}

impl KvCache {
    pub(crate) fn new(
        n_layer: usize,
        n_kv: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let capacity = if device.is_cpu() { 0 } else { 256 };
        let mut layers = Vec::with_capacity(n_layer);
        for _ in 0..n_layer {
            layers.push(if device.is_cpu() {
                LayerKv::Host {
                    k: Vec::new(),
                    v: Vec::new(),
                }
            } else {
                let zeros = || Tensor::zeros((n_kv, capacity, head_dim), DType::F32, device);
                LayerKv::Device {
                    k: zeros()?,
                    v: zeros()?,
                }
            });
        }
        Ok(Self {
            layers,
            len: 0,
            width: n_kv * head_dim,
            capacity,
        })
    }

    /// Number of positions whose keys and values are cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position at or after `len`. O(1): nothing is freed or copied; the
    /// next step overwrites the memory.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        for layer in &mut self.layers {
            if let LayerKv::Host { k, v } = layer {
                k.truncate(len * self.width);
                v.truncate(len * self.width);
            }
        }
    }

    /// Called by the model once every layer holds `n` more positions.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes held, for admission control.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerKv::Host { k, v } => (k.capacity() + v.capacity()) * 4,
                LayerKv::Device { k, .. } => k.elem_count() * 8,
            })
            .sum()
    }
}
