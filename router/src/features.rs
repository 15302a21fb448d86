//! Features of a chat request: a few dense signals (length, digits, math, code, structure,
//! conversation depth, tools) and hashed word unigrams and bigrams. Linear in the request size.

use serde_json::Value;

/// Buckets of the hashed n-gram space.
pub const HASH_BUCKETS: usize = 1 << 16;
/// Dense signals, in [`Features::dense`] order.
pub const DENSE: usize = 16;

pub struct Features {
    pub dense: [f32; DENSE],
    /// (bucket, value) pairs; a bucket repeats as often as its n-gram occurs.
    pub hashed: Vec<(u32, f32)>,
}

/// All text a router sees: message contents (strings or text parts), in order.
pub fn request_text(request: &Value) -> String {
    messages_text(request.get("messages"))
}

fn messages_text(messages: Option<&Value>) -> String {
    let mut text = String::new();
    for message in messages.and_then(Value::as_array).into_iter().flatten() {
        match message.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(s) = part.get("text").and_then(Value::as_str) {
                        text.push_str(s);
                        text.push('\n');
                    }
                }
            }
            _ => {}
        }
        text.push('\n');
    }
    text
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf29ce484222325u64 ^ seed;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    hash
}

/// Phrases and markers found in one pass (Aho-Corasick over the ASCII-lowercased text):
/// reasoning cues, code markers, multiple-choice options.
const CUES: [&str; 12] = [
    "how many",
    "calculate",
    "total",
    "prove",
    "step",
    "explain",
    "why",
    "derive",
    "compute",
    "solve",
    "percent",
    "each",
];
const CODE: [&str; 8] = [
    "```", "def ", "function", "{", "};", "#include", "import ", "=>",
];
const OPTIONS: [&str; 4] = ["\na.", "\nb.", "\nc.", "\nd."];

fn markers() -> &'static aho_corasick::AhoCorasick {
    static MARKERS: std::sync::OnceLock<aho_corasick::AhoCorasick> = std::sync::OnceLock::new();
    MARKERS.get_or_init(|| {
        let patterns = CUES.iter().chain(&CODE).chain(&OPTIONS);
        aho_corasick::AhoCorasick::new(patterns).expect("static patterns")
    })
}

const DIGIT: u8 = 1;
const MATH: u8 = 2;
const WORD: u8 = 4;
const NEWLINE: u8 = 8;
const QUESTION: u8 = 16;
const CONTINUATION: u8 = 32;
const NON_ASCII_LEAD: u8 = 64;

/// Class bits of every byte value, so the scan does one table lookup per byte.
const CLASSES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut class = 0;
        if c.is_ascii_digit() {
            class |= DIGIT | WORD;
        }
        if c.is_ascii_alphabetic() {
            class |= WORD;
        }
        if matches!(
            c,
            b'+' | b'-' | b'*' | b'/' | b'=' | b'^' | b'%' | b'<' | b'>'
        ) {
            class |= MATH;
        }
        if c == b'\n' {
            class |= NEWLINE;
        }
        if c == b'?' {
            class |= QUESTION;
        }
        if c >= 0x80 {
            class |= WORD
                | if c & 0xC0 == 0x80 {
                    CONTINUATION
                } else {
                    NON_ASCII_LEAD
                };
        }
        table[b] = class;
        b += 1;
    }
    table
};

/// Extracts features (for training): the dense signals and every n-gram bucket, scaled.
pub fn extract(request: &Value) -> Features {
    let mut buckets = Vec::new();
    let dense = scan(request, |b| buckets.push(b));
    let scale = 1.0 / (buckets.len().max(1) as f32).sqrt();
    Features {
        dense,
        hashed: buckets.into_iter().map(|b| (b, scale)).collect(),
    }
}

/// Two linear passes (bytes, then markers), no allocation beyond the text: computes the dense
/// signals and hands each n-gram occurrence's bucket to `on_bucket`. Each bucket counts
/// `1/sqrt(total occurrences)` in the model, so a text's n-gram vector has a comparable norm at
/// any length.
pub fn scan(request: &Value, on_bucket: impl FnMut(u32)) -> [f32; DENSE] {
    let field = |name: &str| request.get(name);
    scan_fields(&field, on_bucket)
}

/// [`scan`] over a request given by field lookup (a JSON object not wrapped in a `Value`).
pub fn scan_fields<'v>(
    field: &dyn Fn(&str) -> Option<&'v Value>,
    mut on_bucket: impl FnMut(u32),
) -> [f32; DENSE] {
    let messages = field("messages");
    let mut text = messages_text(messages).into_bytes();
    // Lowercased once: word hashes and marker search both read it.
    text.make_ascii_lowercase();
    let (mut chars, mut digits, mut non_ascii, mut math, mut newlines, mut questions) =
        (0u32, 0u32, 0u32, 0u32, 0u32, 0u32);
    let (mut words, mut numbers) = (0f32, 0f32);
    let mut previous: Option<u64> = None;
    let mut i = 0;
    while i < text.len() {
        let class = CLASSES[text[i] as usize];
        chars += u32::from(class & CONTINUATION == 0);
        non_ascii += u32::from(class & NON_ASCII_LEAD != 0);
        digits += u32::from(class & DIGIT != 0);
        math += u32::from(class & MATH != 0);
        newlines += u32::from(class & NEWLINE != 0);
        questions += u32::from(class & QUESTION != 0);
        if class & WORD == 0 {
            i += 1;
            continue;
        }
        // A word: hash it (ASCII-lowercased) while scanning; digits-only words fold to one
        // feature so numbers generalise ("17" and "42" share it).
        let mut hash = 0xcbf29ce484222325u64 ^ 1;
        let mut all_digits = true;
        while i < text.len() && CLASSES[text[i] as usize] & WORD != 0 {
            let b = text[i];
            let class = CLASSES[b as usize];
            chars += u32::from(class & CONTINUATION == 0);
            non_ascii += u32::from(class & NON_ASCII_LEAD != 0);
            digits += u32::from(class & DIGIT != 0);
            all_digits &= class & DIGIT != 0;
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x100000001b3);
            i += 1;
        }
        if all_digits {
            hash = fnv1a(b"<num>", 1);
        }
        words += 1.0;
        numbers += f32::from(u8::from(all_digits));
        on_bucket((hash as usize % HASH_BUCKETS) as u32);
        if let Some(prev) = previous {
            let bigram = (prev.rotate_left(17) ^ hash).wrapping_mul(0x9E3779B97F4A7C15);
            on_bucket(((bigram >> 16) as usize % HASH_BUCKETS) as u32);
        }
        previous = Some(hash);
    }
    let (chars, digits, non_ascii, math, newlines, questions) = (
        chars as f32,
        digits as f32,
        non_ascii as f32,
        math as f32,
        newlines as f32,
        questions as f32,
    );
    let (mut cues, mut code, mut options) = (
        [false; CUES.len()],
        [false; CODE.len()],
        [false; OPTIONS.len()],
    );
    for found in markers().find_overlapping_iter(&text) {
        let k = found.pattern().as_usize();
        match k {
            k if k < CUES.len() => cues[k] = true,
            k if k < CUES.len() + CODE.len() => code[k - CUES.len()] = true,
            k => options[k - CUES.len() - CODE.len()] = true,
        }
    }
    let count = |flags: &[bool]| flags.iter().filter(|f| **f).count() as f32;
    let chars = chars.max(1.0);
    let messages = messages.and_then(Value::as_array).map_or(0, Vec::len) as f32;
    let tools = f32::from(u8::from(field("tools").is_some_and(|t| !t.is_null())));
    let json_format = f32::from(u8::from(
        field("response_format").is_some_and(|f| !f.is_null()),
    ));
    [
        1.0,
        (1.0 + chars).ln() / 8.0,
        (1.0 + words).ln() / 7.0,
        digits / chars * 10.0,
        (1.0 + numbers).ln() / 3.0,
        (1.0 + math).ln() / 3.0,
        non_ascii / chars * 5.0,
        (1.0 + newlines).ln() / 3.0,
        (1.0 + questions).ln(),
        count(&code) / 2.0,
        count(&options) / 4.0,
        count(&cues) / 3.0,
        messages.ln_1p(),
        tools,
        json_format,
        0.0,
    ]
}
