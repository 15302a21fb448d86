//! Where each path of a YAML document starts (`backends[0].base_url` -> line 7, column 5), so
//! that every configuration error can point at its line and column.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Default)]
pub struct PositionIndex {
    paths: HashMap<String, Position>,
}

impl PositionIndex {
    /// Indexes a document; a document that does not parse yields an empty index (the syntax
    /// error itself is reported by the deserializer, with its own position).
    pub fn build(text: &str) -> PositionIndex {
        let mut recorder = Recorder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut recorder, false).is_err() {
            return PositionIndex::default();
        }
        PositionIndex {
            paths: recorder.paths,
        }
    }

    /// The position of `path`, or of its closest indexed ancestor.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(position) = self.paths.get(path) {
                return Some(*position);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    /// `located`: a block mapping's start mark sits at its first `:`; its first key is a
    /// better position, so the mapping is recorded when that key arrives.
    Map {
        path: String,
        key: Option<String>,
        located: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    paths: HashMap<String, Position>,
}

impl Recorder {
    /// The path of the node that starts now, or `None` when the node is a mapping key.
    fn next_value_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key, .. }) => {
                let key = key.take()?;
                Some(if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                })
            }
            Some(Frame::Seq { path, next }) => {
                *next += 1;
                Some(format!("{path}[{}]", *next - 1))
            }
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.paths.entry(path.to_string()).or_insert(Position {
            line: mark.line(),
            col: mark.col() + 1,
        });
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(value, ..) => match self.next_value_path() {
                Some(path) => self.record(&path, mark),
                None => {
                    // A mapping key: remember it, and point its path at the key itself.
                    if let Some(Frame::Map { path, key, located }) = self.stack.last_mut() {
                        let full = if path.is_empty() {
                            value.clone()
                        } else {
                            format!("{path}.{value}")
                        };
                        let map_path = (!std::mem::replace(located, true)).then(|| path.clone());
                        *key = Some(value);
                        if let Some(map_path) = map_path {
                            self.record(&map_path, mark);
                        }
                        self.record(&full, mark);
                    }
                }
            },
            Event::Alias(_) => {
                self.next_value_path();
            }
            Event::MappingStart(..) => {
                let path = self.next_value_path().unwrap_or_default();
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    located: false,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.next_value_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_ancestors() {
        let text = "listen: [\"a\"]\nbackends:\n  - name: x\n    base_url: y\n  - name: z\n";
        let index = PositionIndex::build(text);
        assert_eq!(index.find("listen"), Some(Position { line: 1, col: 1 }));
        assert_eq!(
            index.find("backends[0].base_url"),
            Some(Position { line: 4, col: 5 })
        );
        assert_eq!(
            index.find("backends[1].name"),
            Some(Position { line: 5, col: 5 })
        );
        assert_eq!(
            index.find("backends[1].missing"),
            Some(Position { line: 5, col: 5 })
        );
    }
}
