//! Reading a GGUF file: hyper-parameters from the metadata, weights as quantized tensors.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Device;
use std::fs::File;
use std::path::{Path, PathBuf};

/// An opened GGUF file: its metadata, and the handle its tensors are read from.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("{} is not a GGUF file", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    pub fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.to_string().ok().cloned())
    }

    pub fn u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(value_u32)
    }

    pub fn f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(|v| {
            v.to_f32()
                .ok()
                .or_else(|| v.to_f64().ok().map(|x| x as f32))
        })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads a tensor as stored in the file.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, device)
            .with_context(|| format!("reading tensor {name}"))
    }
}

pub fn value_u32(v: &gguf_file::Value) -> Option<u32> {
    use gguf_file::Value::*;
    Some(match v {
        U8(x) => *x as u32,
        I8(x) => *x as u32,
        U16(x) => *x as u32,
        I16(x) => *x as u32,
        U32(x) => *x,
        I32(x) => *x as u32,
        U64(x) => *x as u32,
        I64(x) => *x as u32,
        _ => return None,
    })
}

/// Hyper-parameters of a llama-family model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub vocab_size: usize,
    /// Llama GGUFs store q/k rotated pairwise (interleaved); Qwen2 keeps the halves layout.
    pub rope_interleaved: bool,
}

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g
            .string("general.architecture")
            .context("general.architecture missing")?;
        let rope_interleaved = match arch.as_str() {
            "llama" | "mistral" => true,
            "qwen2" => false,
            other => bail!("unsupported architecture `{other}` (llama, mistral, qwen2 are)"),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| {
            g.u32(&key(k))
                .with_context(|| format!("{} missing", key(k)))
        };
        let n_embd = need("embedding_length")? as usize;
        let n_head = need("attention.head_count")? as usize;
        let n_head_kv = g
            .u32(&key("attention.head_count_kv"))
            .unwrap_or(n_head as u32) as usize;
        let head_dim = g
            .u32(&key("attention.key_length"))
            .or_else(|| g.u32(&key("rope.dimension_count")))
            .map(|d| d as usize)
            .unwrap_or(n_embd / n_head);
        let vocab_size = match g.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map_or(0, Vec::len),
        };
        Ok(Self {
            name: g.string("general.name").unwrap_or_else(|| arch.clone()),
            n_layer: need("block_count")? as usize,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: need("feed_forward_length")? as usize,
            context_length: g.u32(&key("context_length")).unwrap_or(2048) as usize,
            rope_theta: g.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: g
                .f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f64,
            vocab_size,
            rope_interleaved,
            architecture: arch,
        })
    }
}
