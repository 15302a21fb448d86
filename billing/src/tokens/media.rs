//! Prompt tokens of content parts that are not text.
//!
//! Images are counted with the provider's published formula from their size, which is read from
//! the image header of a `data:` URL; an image whose size cannot be read (a remote URL, a header
//! the reader does not know) is counted at the formula's largest value, so the count is always an
//! upper bound. Audio and files cannot be sized before the provider answers: they are only
//! counted, for the caller to bound (see `unsized_part_tokens` in the policy file).

use base64::Engine;
use serde_json::Value;

/// How a model counts an image's prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImageCost {
    /// GPT-4o-style: `base` for every image, plus `tile` per 512-px tile of the image scaled to
    /// fit 2048x2048 and then to 768 px on its short side (`detail: low` costs `base` only).
    Tiles { base: u64, tile: u64 },
    /// GPT-4.1-mini-style: one token per 32-px patch (at most `max_patches`, the image scaled down
    /// to fit), times `multiplier`.
    Patches { max_patches: u64, multiplier: f64 },
}

impl Default for ImageCost {
    /// GPT-4o's published figures.
    fn default() -> ImageCost {
        ImageCost::Tiles {
            base: 85,
            tile: 170,
        }
    }
}

/// Most tiles an image can make after scaling (2048x768 and its like: 4 x 2).
const MAX_TILES: u64 = 8;
/// Base64 characters decoded to find an image's size in its header (48 KiB of image).
const HEADER_PREFIX: usize = 64 << 10;

impl ImageCost {
    /// Tokens of one image of `size` (width, height; `None` when unknown), at `detail`.
    pub fn tokens(&self, size: Option<(u64, u64)>, detail: Option<&str>) -> u64 {
        match *self {
            ImageCost::Tiles { base, tile } => {
                if detail == Some("low") {
                    return base;
                }
                let tiles = size.map_or(MAX_TILES, |(w, h)| tiles(w, h).min(MAX_TILES));
                base.saturating_add(tile.saturating_mul(tiles))
            }
            ImageCost::Patches {
                max_patches,
                multiplier,
            } => {
                let patches = size.map_or(max_patches, |(w, h)| patches(w, h, max_patches));
                (patches as f64 * multiplier).ceil() as u64
            }
        }
    }
}

fn tiles(width: u64, height: u64) -> u64 {
    let (mut w, mut h) = (width.max(1) as f64, height.max(1) as f64);
    if w.max(h) > 2048.0 {
        let scale = 2048.0 / w.max(h);
        (w, h) = (w * scale, h * scale);
    }
    if w.min(h) > 768.0 {
        let scale = 768.0 / w.min(h);
        (w, h) = (w * scale, h * scale);
    }
    (w / 512.0).ceil() as u64 * (h / 512.0).ceil() as u64
}

fn patches(width: u64, height: u64, max_patches: u64) -> u64 {
    let (w, h) = (width.max(1) as f64, height.max(1) as f64);
    let count = |w: f64, h: f64| (w / 32.0).ceil() * (h / 32.0).ceil();
    if count(w, h) <= max_patches as f64 {
        return count(w, h) as u64;
    }
    // Scaled down so that the patches fit, as the provider does; never above the cap.
    let scale = (32.0 * 32.0 * max_patches as f64 / (w * h)).sqrt();
    (count(w * scale, h * scale) as u64).min(max_patches)
}

/// What the non-text parts of a chat request's messages add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Media {
    /// Images, and their prompt tokens (an upper bound).
    pub images: u64,
    pub image_tokens: u64,
    /// `input_audio` parts: priced as audio, sized only by the provider.
    pub audio_parts: u64,
    /// `file` parts (PDFs and the like): sized only by the provider.
    pub file_parts: u64,
    /// Parts of a type the gateway does not know, which may cost anything.
    pub unknown_parts: u64,
}

impl Media {
    /// Parts whose tokens cannot be known before the provider answers.
    pub fn unsized_parts(&self) -> u64 {
        self.audio_parts
            .saturating_add(self.file_parts)
            .saturating_add(self.unknown_parts)
    }
}

/// Scans the content parts of chat `messages`.
pub fn scan(messages: &[Value], cost: &ImageCost) -> Media {
    let mut media = Media::default();
    for message in messages {
        let Some(Value::Array(parts)) = message.get("content") else {
            continue;
        };
        for part in parts {
            match part.get("type").and_then(Value::as_str) {
                Some("text") | Some("refusal") => {}
                Some("image_url") => {
                    let image = part.get("image_url");
                    let url = image.and_then(|i| i.get("url")).and_then(Value::as_str);
                    let detail = image.and_then(|i| i.get("detail")).and_then(Value::as_str);
                    let size = url.and_then(data_url_image_size);
                    media.images += 1;
                    media.image_tokens =
                        media.image_tokens.saturating_add(cost.tokens(size, detail));
                }
                Some("input_audio") => media.audio_parts += 1,
                Some("file") => media.file_parts += 1,
                _ => media.unknown_parts += 1,
            }
        }
    }
    media
}

/// Width and height of an image given inline as `data:<type>;base64,<data>`.
fn data_url_image_size(url: &str) -> Option<(u64, u64)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    if !meta.ends_with(";base64") {
        return None;
    }
    let data = data.trim();
    let engine = base64::engine::general_purpose::STANDARD;
    // The header is at the front; only a JPEG with large metadata needs more.
    let prefix = &data[..data.len().min(HEADER_PREFIX) / 4 * 4];
    let size = engine
        .decode(prefix)
        .ok()
        .and_then(|bytes| imagesize::blob_size(&bytes).ok())
        .or_else(|| {
            (prefix.len() < data.len())
                .then(|| engine.decode(data).ok())
                .flatten()
                .and_then(|bytes| imagesize::blob_size(&bytes).ok())
        })?;
    Some((size.width as u64, size.height as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gpt4o() -> ImageCost {
        ImageCost::default()
    }

    #[test]
    fn tile_formula_matches_the_published_examples() {
        // OpenAI's examples: 1024x1024 high = 765; 2048x4096 high = 1105; any image low = 85.
        assert_eq!(gpt4o().tokens(Some((1024, 1024)), Some("high")), 765);
        assert_eq!(gpt4o().tokens(Some((2048, 4096)), Some("high")), 1105);
        assert_eq!(gpt4o().tokens(Some((4096, 8192)), Some("low")), 85);
        // auto is counted as high (its upper bound); a small image is one tile.
        assert_eq!(gpt4o().tokens(Some((512, 512)), Some("auto")), 255);
        assert_eq!(gpt4o().tokens(Some((100, 100)), None), 255);
        // Unknown size: the largest the formula gives (8 tiles), never less than any real image.
        let worst = gpt4o().tokens(None, None);
        assert_eq!(worst, 85 + 8 * 170);
        for (w, h) in [
            (2048, 768),
            (768, 2048),
            (2048, 767),
            (10_000, 3000),
            (1, 60_000),
        ] {
            assert!(gpt4o().tokens(Some((w, h)), None) <= worst, "{w}x{h}");
        }
    }

    #[test]
    fn patch_formula_caps_and_scales() {
        let mini = ImageCost::Patches {
            max_patches: 1536,
            multiplier: 1.62,
        };
        // OpenAI's examples: 1024x1024 -> 1024 patches; 1800x2400 -> scaled to 1536 patches.
        assert_eq!(mini.tokens(Some((1024, 1024)), None), 1659);
        assert!(mini.tokens(Some((1800, 2400)), None) <= 2489);
        assert_eq!(mini.tokens(None, None), 2489);
    }

    fn png(width: u32, height: u32) -> String {
        // A PNG signature and IHDR chunk: all a size reader needs.
        let mut bytes = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        bytes.extend_from_slice(&13u32.to_be_bytes());
        bytes.extend_from_slice(b"IHDR");
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        format!("data:image/png;base64,{data}")
    }

    #[test]
    fn scans_parts_and_sizes_inline_images() {
        let messages = vec![
            json!({"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": png(1024, 1024), "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "image_url", "image_url": {"url": png(4000, 3000), "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-1"}},
                {"type": "video", "video": {}},
            ]}),
            json!({"role": "assistant", "content": "plain"}),
        ];
        let media = scan(&messages, &gpt4o());
        assert_eq!(
            media,
            Media {
                images: 3,
                image_tokens: 765 + 1445 + 85,
                audio_parts: 1,
                file_parts: 1,
                unknown_parts: 1,
            }
        );
        assert_eq!(media.unsized_parts(), 3);
        // A data URL that is not an image, or not base64, counts as an image of unknown size.
        assert_eq!(data_url_image_size("data:image/png;base64,!!!!"), None);
        assert_eq!(data_url_image_size("data:text/plain,hello"), None);
        assert_eq!(data_url_image_size(&png(7, 9)), Some((7, 9)));
    }
}
