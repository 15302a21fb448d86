//! Turning generated token bytes into text deltas: never splits a UTF-8 character, and
//! holds back text that might be the start of a stop sequence until it is known not to be.

pub struct TextStream {
    /// Bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    /// Decoded text not yet released because it could begin a stop sequence.
    held: String,
    stops: Vec<String>,
}

/// What one push released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop sequence matched; `text` ends just before it.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            partial: Vec::new(),
            held: String::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Released {
        self.partial.extend_from_slice(bytes);
        let complete = complete_prefix(&self.partial);
        let decoded = String::from_utf8_lossy(&self.partial[..complete]).into_owned();
        self.partial.drain(..complete);
        self.held.push_str(&decoded);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..pos].to_string();
            self.held.clear();
            self.partial.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_match(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Everything still held, at the end of generation.
    pub fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
        text
    }
}

/// Length of the longest prefix of `b` that does not end inside a UTF-8 character.
fn complete_prefix(b: &[u8]) -> usize {
    // A character is at most 4 bytes: only the last 3 can be an unfinished one.
    for back in 1..=b.len().min(3) {
        let byte = b[b.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // continuation byte: look further back for the lead byte
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { b.len() - back } else { b.len() };
    }
    b.len()
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_match(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            stop.is_char_boundary(n)
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_splits_a_character() {
        let mut s = TextStream::new(vec![]);
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(s.push(&euro[..1]).text, "");
        assert_eq!(s.push(&euro[1..2]).text, "");
        assert_eq!(s.push(&[euro[2], b'a']).text, "€a");
        let crab = "🦀".as_bytes();
        assert_eq!(s.push(&crab[..3]).text, "");
        assert_eq!(s.push(&crab[3..]).text, "🦀");
    }

    #[test]
    fn stop_sequences_across_pushes() {
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.push(b"hello E").text, "hello ");
        assert_eq!(s.push(b"N").text, "");
        assert_eq!(
            s.push(b"D and more"),
            Released {
                text: String::new(),
                stopped: true
            }
        );
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.push(b"hello EN").text, "hello ");
        assert_eq!(
            s.push(b"d"),
            Released {
                text: "ENd".into(),
                stopped: false
            }
        );
        assert_eq!(s.push(b"x E").text, "x ");
        assert_eq!(s.finish(), "E");
    }
}
