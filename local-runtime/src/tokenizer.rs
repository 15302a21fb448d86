//! The model's own tokenizer, built from the GGUF metadata (or a `tokenizer.json` beside
//! the file), so usage counts are exact for the model that served the request.

use crate::gguf::{value_u32, GgufFile};
use anyhow::{bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: u32 = 3;
const TOKEN_USER_DEFINED: u32 = 4;

pub struct ModelTokenizer {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Every end-of-generation id: EOS plus control tokens such as `<|im_end|>`, `<|eot_id|>`.
    pub stop_ids: Vec<u32>,
    vocab: Vec<String>,
    /// Control tokens: their text is literal, not byte-level encoded.
    special: Vec<bool>,
    byte_level: bool,
    unicode_to_byte: std::collections::HashMap<char, u8>,
}

impl ModelTokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let tokens: Vec<String> = g
            .get("tokenizer.ggml.tokens")
            .context("GGUF has no tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<u32> = match g.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| value_u32(t).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let beside = g.path.with_file_name("tokenizer.json");
        let inner = if beside.exists() {
            Tokenizer::from_file(&beside)
                .map_err(|e| anyhow::anyhow!("{}: {e}", beside.display()))?
        } else {
            build_bpe(g, &tokens, &types)?
        };
        let bos = g.u32("tokenizer.ggml.bos_token_id");
        let eos = g.u32("tokenizer.ggml.eos_token_id");
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for (i, t) in tokens.iter().enumerate() {
            let end_marker = matches!(
                t.as_str(),
                "<|im_end|>" | "<|eot_id|>" | "<|end|>" | "<|endoftext|>" | "</s>"
            );
            if end_marker
                && types.get(i).copied() == Some(TOKEN_CONTROL)
                && !stop_ids.contains(&(i as u32))
            {
                stop_ids.push(i as u32);
            }
        }
        if let Some(eot) = g.u32("tokenizer.ggml.eot_token_id") {
            if !stop_ids.contains(&eot) {
                stop_ids.push(eot);
            }
        }
        let special = types
            .iter()
            .map(|t| *t == TOKEN_CONTROL || *t == TOKEN_USER_DEFINED)
            .collect();
        let byte_level = g.string("tokenizer.ggml.model").as_deref() == Some("gpt2");
        let unicode_to_byte = byte_level_alphabet()
            .into_iter()
            .map(|(b, c)| (c, b))
            .collect();
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            stop_ids,
            vocab: tokens,
            special,
            byte_level,
            unicode_to_byte,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (from a chat template) map to
    /// their ids; `add_bos` follows the model's metadata.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Raw bytes of one token as it appears in output text. A token can hold part of a
    /// UTF-8 character, so this is bytes, not a string (`TextStream` reassembles them).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.vocab.get(id as usize) else {
            return Vec::new();
        };
        if self.special.get(id as usize).copied().unwrap_or(false) {
            return piece.as_bytes().to_vec();
        }
        if self.byte_level {
            return piece
                .chars()
                .map(|c| self.unicode_to_byte.get(&c).copied().unwrap_or(b'?'))
                .collect();
        }
        // SentencePiece: U+2581 is a space, `<0xNN>` a raw byte.
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.vocab.get(id as usize).map(|s| s.as_str())
    }

    pub fn vocab(&self) -> &[String] {
        &self.vocab
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}

/// Byte-level BPE as in the model's reference tokenizer. The pre-tokenizer follows
/// `tokenizer.ggml.pre`: SmolLM splits digits one by one and adds no prefix space.
fn build_bpe(g: &GgufFile, tokens: &[String], types: &[u32]) -> Result<Tokenizer> {
    let model = g.string("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "tokenizer model `{model}` is not byte-level BPE; put the model's tokenizer.json beside {}",
            g.path.display()
        );
    }
    let merges: Vec<(String, String)> = g
        .get("tokenizer.ggml.merges")
        .context("GGUF has no tokenizer.ggml.merges")?
        .to_vec()?
        .iter()
        .map(|v| {
            let s = v.to_string()?;
            let (a, b) = s
                .split_once(' ')
                .ok_or_else(|| candle_core::Error::Msg(format!("bad merge `{s}`")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<candle_core::Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("building BPE: {e}"))?;
    let mut tk = Tokenizer::new(bpe);
    let pre = g
        .string("tokenizer.ggml.pre")
        .unwrap_or_else(|| "default".into());
    let byte_level = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let regex_then_bytes = |re: &str| -> Result<Sequence> {
        let split = Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
        Ok(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ]))
    };
    let seq = match pre.as_str() {
        "smollm" | "starcoder" | "refact" | "codeshell" => Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(),
        ]),
        "qwen2" => regex_then_bytes(QWEN2_SPLIT)?,
        "llama-bpe" | "llama3" => regex_then_bytes(LLAMA3_SPLIT)?,
        _ => Sequence::new(vec![byte_level()]),
    };
    tk.with_pre_tokenizer(Some(seq));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| **t == TOKEN_CONTROL || **t == TOKEN_USER_DEFINED)
        .map(|(s, t)| AddedToken::from(s.clone(), *t == TOKEN_CONTROL))
        .collect();
    tk.add_special_tokens(&special);
    Ok(tk)
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's reversible byte-to-character map: printable bytes stand for themselves, the
/// rest are shifted to code points from 256 up, in byte order.
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b, b as char)
            } else {
                let c = char::from_u32(next).expect("valid code point");
                next += 1;
                (b, c)
            }
        })
        .collect()
}
