//! The one YAML entry point of asimov. Text goes in, JSON values with the line and column
//! of every key and value come out; output YAML is rendered here too. Swapping the YAML
//! crate is a change to this file only.

use serde::Serialize;
use serde_json::{Map, Number, Value};
use std::collections::{BTreeMap, HashMap};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a manifest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(m: &Marker) -> Pos {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// Where a node sits in the text: its key (absent for sequence items and the root) and
/// its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spans {
    pub key: Option<Pos>,
    pub value: Pos,
}

/// One YAML document as a JSON value, with positions keyed by JSON pointer
/// (`/spec/placement/0/provider`; the root is the empty string).
#[derive(Debug, Clone, PartialEq)]
pub struct YamlDocument {
    pub value: Value,
    pub positions: BTreeMap<String, Spans>,
    /// Position of the document's root node.
    pub start: Pos,
}

impl YamlDocument {
    /// Position of the value at `pointer`, or of its nearest ancestor that has one
    /// (values reached through an alias have no position of their own).
    pub fn value_pos(&self, pointer: &str) -> Pos {
        self.spans(pointer).value
    }

    /// Position of the key naming the value at `pointer` (the value's position for
    /// sequence items and the root), with the same fallback as [`Self::value_pos`].
    pub fn key_pos(&self, pointer: &str) -> Pos {
        let spans = self.spans(pointer);
        spans.key.unwrap_or(spans.value)
    }

    fn spans(&self, pointer: &str) -> Spans {
        let mut p = pointer;
        loop {
            if let Some(s) = self.positions.get(p) {
                return *s;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => {
                    return Spans {
                        key: None,
                        value: self.start,
                    };
                }
            }
        }
    }
}

/// A problem found while reading YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// Escapes one JSON pointer segment (RFC 6901).
pub fn escape_pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Deepest nesting of mappings and lists a document may have, counting what aliases
/// bring in. Manifests need about six levels; the bound keeps every recursive walk of the
/// value (serde, the schema check, dropping it) far from the end of a thread's stack.
pub const MAX_DEPTH: usize = 64;

/// Most a document may grow through anchors and aliases, in estimated bytes of the
/// parsed value. A few aliases in a manifest add kilobytes; an alias bomb (aliases of
/// aliases, each level multiplying the last) would add gigabytes from a few lines.
pub const MAX_ALIAS_EXPANSION: usize = 2 << 20;

/// Parses every document in `text` (separated by `---`; a leading UTF-8 byte-order mark
/// is ignored). Empty documents come back as `Value::Null`. Fails with every duplicate
/// key found, or with the first syntax error, or as soon as a document nests deeper
/// than [`MAX_DEPTH`] or its aliases expand beyond [`MAX_ALIAS_EXPANSION`].
pub fn parse_documents(text: &str) -> Result<Vec<YamlDocument>, Vec<YamlError>> {
    // Some Windows editors begin every file with a byte-order mark. Dropping it keeps
    // columns as an editor shows them (it shows no mark).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Events are pulled one at a time rather than through `Parser::load`, whose node
    // loading recurses once per nesting level: a deeply nested file would overflow the
    // stack before any bound here could refuse it.
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((event, mark)) => {
                builder.on_event(event, mark);
                if builder.refused {
                    break;
                }
            }
            Err(e) => {
                builder.errors.push(YamlError {
                    pos: Pos::from_marker(e.marker()),
                    message: format!("invalid YAML: {}", e.info()),
                });
                break;
            }
        }
    }
    if builder.errors.is_empty() {
        Ok(builder.documents)
    } else {
        Err(builder.errors)
    }
}

/// Renders any serializable value as YAML, for output and for stored manifests.
pub fn to_yaml_string(value: &impl Serialize) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(value)
}

enum Frame {
    Seq {
        pointer: String,
        anchor: usize,
        items: Vec<Value>,
    },
    Map {
        pointer: String,
        anchor: usize,
        map: Map<String, Value>,
        /// The key waiting for its value, with its position.
        pending: Option<(String, Pos)>,
        seen: HashMap<String, Pos>,
    },
}

#[derive(Default)]
struct Builder {
    documents: Vec<YamlDocument>,
    errors: Vec<YamlError>,
    stack: Vec<Frame>,
    positions: BTreeMap<String, Spans>,
    /// Anchored values by id, with their [`Extent`].
    anchors: HashMap<usize, (Value, Extent)>,
    root: Option<Value>,
    start: Option<Pos>,
    /// Estimated bytes the current document has gained from anchors and aliases.
    expanded: usize,
    /// A bound was crossed: the error is recorded and parsing stops.
    refused: bool,
}

/// How big and how deep a value is, for the bounds on aliases.
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// Estimated bytes in memory: one `Value` per node plus the text of strings and keys.
    bytes: usize,
    /// Levels of mappings and lists, 0 for a scalar.
    depth: usize,
}

impl Extent {
    /// Walks the value; its depth is bounded by [`MAX_DEPTH`], so the recursion is too.
    fn of(value: &Value) -> Extent {
        const NODE: usize = std::mem::size_of::<Value>();
        match value {
            Value::Null | Value::Bool(_) | Value::Number(_) => Extent {
                bytes: NODE,
                depth: 0,
            },
            Value::String(s) => Extent {
                bytes: NODE + s.len(),
                depth: 0,
            },
            Value::Array(items) => {
                let mut e = Extent {
                    bytes: NODE,
                    depth: 1,
                };
                for item in items {
                    let i = Extent::of(item);
                    e.bytes = e.bytes.saturating_add(i.bytes);
                    e.depth = e.depth.max(i.depth + 1);
                }
                e
            }
            Value::Object(map) => {
                let mut e = Extent {
                    bytes: NODE,
                    depth: 1,
                };
                for (key, item) in map {
                    let i = Extent::of(item);
                    e.bytes = e.bytes.saturating_add(i.bytes + key.len() + NODE);
                    e.depth = e.depth.max(i.depth + 1);
                }
                e
            }
        }
    }
}

/// What the next node means to its parent.
enum Slot {
    Root,
    /// The next node is a mapping key.
    Key,
    /// The next node is a value at this pointer, named by a key at this position.
    Value(String, Option<Pos>),
}

impl Builder {
    fn slot(&self) -> Slot {
        match self.stack.last() {
            None => Slot::Root,
            Some(Frame::Seq { pointer, items, .. }) => {
                Slot::Value(format!("{pointer}/{}", items.len()), None)
            }
            Some(Frame::Map {
                pointer, pending, ..
            }) => match pending {
                None => Slot::Key,
                Some((k, pos)) => Slot::Value(
                    format!("{pointer}/{}", escape_pointer_segment(k)),
                    Some(*pos),
                ),
            },
        }
    }

    /// Records where a node at `slot` starts; returns its pointer.
    fn begin(&mut self, slot: &Slot, at: Pos) -> String {
        match slot {
            Slot::Root => {
                self.start = Some(at);
                self.positions.insert(
                    String::new(),
                    Spans {
                        key: None,
                        value: at,
                    },
                );
                String::new()
            }
            Slot::Value(pointer, key) => {
                self.positions.insert(
                    pointer.clone(),
                    Spans {
                        key: *key,
                        value: at,
                    },
                );
                pointer.clone()
            }
            // A mapping or sequence used as a key: reported by the caller.
            Slot::Key => String::from("/?"),
        }
    }

    /// Hands a finished node to its parent.
    fn finish(&mut self, value: Value, at: Pos) {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map {
                map, pending, seen, ..
            }) => match pending.take() {
                Some((k, _)) => {
                    map.insert(k, value);
                }
                None => {
                    let key = match value {
                        Value::String(s) => s,
                        Value::Null => String::new(),
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        Value::Array(_) | Value::Object(_) => {
                            self.errors.push(YamlError {
                                pos: at,
                                message: "expected a plain key, found a mapping or list"
                                    .to_string(),
                            });
                            String::from("?")
                        }
                    };
                    if let Some(first) = seen.get(&key) {
                        self.errors.push(YamlError {
                            pos: at,
                            message: format!(
                                "duplicate key `{key}` (first at line {} column {})",
                                first.line, first.column
                            ),
                        });
                    } else {
                        seen.insert(key.clone(), at);
                    }
                    *pending = Some((key, at));
                }
            },
        }
    }

    /// yaml-rust2 marks a block mapping's start after its first key; the first key's
    /// own position is where a reader sees the mapping begin.
    fn first_key_starts_block_mapping(&mut self, key_at: Pos) {
        if let Some(Frame::Map { pointer, seen, .. }) = self.stack.last() {
            if !seen.is_empty() {
                return;
            }
            if let Some(spans) = self.positions.get_mut(pointer)
                && key_at < spans.value
            {
                spans.value = key_at;
                if pointer.is_empty() {
                    self.start = Some(key_at);
                }
            }
        }
    }

    /// Keeps a copy of an anchored value for its aliases; the copy counts towards
    /// [`MAX_ALIAS_EXPANSION`] (nested anchors copy the same nodes again).
    fn remember_anchor(&mut self, anchor: usize, value: &Value, at: Pos) {
        if anchor > 0 {
            let extent = Extent::of(value);
            if self.grow(extent.bytes, at) {
                self.anchors.insert(anchor, (value.clone(), extent));
            }
        }
    }

    /// Adds `bytes` to what the document gained from anchors and aliases; false, with the
    /// error recorded, when that crosses the bound.
    fn grow(&mut self, bytes: usize, at: Pos) -> bool {
        self.expanded = self.expanded.saturating_add(bytes);
        if self.expanded <= MAX_ALIAS_EXPANSION {
            return true;
        }
        self.refuse(
            at,
            format!(
                "anchors and aliases expand this document beyond {} MiB (an alias bomb?); \
                 write the repeated part out, or repeat it less",
                MAX_ALIAS_EXPANSION >> 20
            ),
        );
        false
    }

    fn refuse(&mut self, at: Pos, message: String) {
        self.errors.push(YamlError { pos: at, message });
        self.refused = true;
    }

    /// False, with the error recorded, when a node `depth` levels deep would start at
    /// the current position.
    fn fits_depth(&mut self, depth: usize, at: Pos) -> bool {
        if self.stack.len() + depth <= MAX_DEPTH {
            return true;
        }
        self.refuse(
            at,
            format!("expected at most {MAX_DEPTH} levels of nested mappings and lists"),
        );
        false
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = Pos::from_marker(&mark);
        match ev {
            Event::Nothing | Event::StreamStart | Event::StreamEnd => {}
            Event::DocumentStart => {
                self.positions.clear();
                self.root = None;
                self.start = None;
                self.expanded = 0;
            }
            Event::DocumentEnd => {
                let value = self.root.take().unwrap_or(Value::Null);
                self.documents.push(YamlDocument {
                    value,
                    positions: std::mem::take(&mut self.positions),
                    start: self.start.take().unwrap_or(at),
                });
                // Anchors do not cross documents.
                self.anchors.clear();
            }
            Event::Scalar(text, style, anchor, tag) => {
                let value = resolve_scalar(text, style, tag.as_ref());
                let slot = self.slot();
                if matches!(slot, Slot::Key) {
                    self.first_key_starts_block_mapping(at);
                } else {
                    self.begin(&slot, at);
                }
                self.remember_anchor(anchor, &value, at);
                self.finish(value, at);
            }
            Event::Alias(id) => {
                let slot = self.slot();
                if !matches!(slot, Slot::Key) {
                    self.begin(&slot, at);
                }
                let value = match self.anchors.get(&id).map(|(_, extent)| *extent) {
                    Some(extent) => {
                        if !self.fits_depth(extent.depth, at) || !self.grow(extent.bytes, at) {
                            return;
                        }
                        self.anchors
                            .get(&id)
                            .map(|(v, _)| v.clone())
                            .unwrap_or_default()
                    }
                    None => {
                        self.errors.push(YamlError {
                            pos: at,
                            message: "alias refers to an unknown anchor".to_string(),
                        });
                        Value::Null
                    }
                };
                self.finish(value, at);
            }
            Event::SequenceStart(anchor, _) => {
                if !self.fits_depth(1, at) {
                    return;
                }
                let slot = self.slot();
                let pointer = self.begin(&slot, at);
                self.stack.push(Frame::Seq {
                    pointer,
                    anchor,
                    items: Vec::new(),
                });
            }
            Event::MappingStart(anchor, _) => {
                if !self.fits_depth(1, at) {
                    return;
                }
                let slot = self.slot();
                let pointer = self.begin(&slot, at);
                self.stack.push(Frame::Map {
                    pointer,
                    anchor,
                    map: Map::new(),
                    pending: None,
                    seen: HashMap::new(),
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor, pointer) = match self.stack.pop() {
                    Some(Frame::Seq {
                        items,
                        anchor,
                        pointer,
                    }) => (Value::Array(items), anchor, pointer),
                    Some(Frame::Map {
                        map,
                        anchor,
                        pointer,
                        ..
                    }) => (Value::Object(map), anchor, pointer),
                    None => return,
                };
                self.remember_anchor(anchor, &value, at);
                // The node's position is where it started, not where it ended.
                let start = self.positions.get(&pointer).map(|s| s.value).unwrap_or(at);
                self.finish(value, start);
            }
        }
    }
}

/// Resolves a scalar by the YAML 1.2 core schema: only plain scalars can be null,
/// booleans or numbers; quoted ones are always strings.
fn resolve_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    if style != TScalarStyle::Plain {
        return Value::String(text);
    }
    let str_tag = tag.is_some_and(|t| {
        t.suffix == "str" && (t.handle == "!!" || t.handle == "tag:yaml.org,2002:")
    });
    if str_tag {
        return Value::String(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(n) = parse_int(&text) {
        return Value::Number(n.into());
    }
    if looks_like_float(&text)
        && let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64)
    {
        return Value::Number(n);
    }
    Value::String(text)
}

fn parse_int(s: &str) -> Option<i64> {
    if let Some(hex) = s.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok();
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return i64::from_str_radix(oct, 8).ok();
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The core schema's float form: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
/// Infinity and NaN are left as strings: no manifest field wants them.
fn looks_like_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.find('.') {
        Some(i) => (&mantissa[..i], Some(&mantissa[i + 1..])),
        None => (mantissa, None),
    };
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match frac {
        Some(f) => digits(int) && digits(f) && !(int.is_empty() && f.is_empty()),
        None => !int.is_empty() && digits(int),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && digits(e)
        }
    };
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pos(line: usize, column: usize) -> Pos {
        Pos { line, column }
    }

    #[test]
    fn positions_of_keys_and_values() {
        let text = "a: 1\nspec:\n  placement:\n    - provider: vast\n      x: [1, two]\n";
        let docs = parse_documents(text).expect("valid yaml");
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(
            d.value,
            json!({"a": 1, "spec": {"placement": [{"provider": "vast", "x": [1, "two"]}]}})
        );
        assert_eq!(d.start, pos(1, 1));
        assert_eq!(d.key_pos("/a"), pos(1, 1));
        assert_eq!(d.value_pos("/a"), pos(1, 4));
        assert_eq!(d.key_pos("/spec"), pos(2, 1));
        assert_eq!(d.key_pos("/spec/placement"), pos(3, 3));
        assert_eq!(d.value_pos("/spec/placement/0"), pos(4, 7));
        assert_eq!(d.key_pos("/spec/placement/0/provider"), pos(4, 7));
        assert_eq!(d.value_pos("/spec/placement/0/provider"), pos(4, 17));
        assert_eq!(d.value_pos("/spec/placement/0/x/1"), pos(5, 14));
        // Unknown pointers fall back to the nearest ancestor.
        assert_eq!(d.value_pos("/spec/placement/0/x/9"), pos(5, 10));
    }

    #[test]
    fn several_documents() {
        let text = "a: 1\n---\nb: 2\n---\n# only a comment\n";
        let docs = parse_documents(text).expect("valid yaml");
        let values: Vec<_> = docs.iter().map(|d| d.value.clone()).collect();
        assert_eq!(values, vec![json!({"a": 1}), json!({"b": 2}), Value::Null]);
        assert_eq!(docs[1].key_pos("/b"), pos(3, 1));
    }

    #[test]
    fn duplicate_keys_are_errors_with_position() {
        let text = "a: 1\nb:\n  c: 1\n  c: 2\na: 3\n";
        let errors = parse_documents(text).expect_err("duplicates");
        assert_eq!(
            errors,
            vec![
                YamlError {
                    pos: pos(4, 3),
                    message: "duplicate key `c` (first at line 3 column 3)".into()
                },
                YamlError {
                    pos: pos(5, 1),
                    message: "duplicate key `a` (first at line 1 column 1)".into()
                },
            ]
        );
    }

    #[test]
    fn syntax_errors_carry_position() {
        let errors = parse_documents("a: [1, 2\nb: 3\n").expect_err("unclosed");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.starts_with("invalid YAML"), "{errors:?}");
        assert_eq!(errors[0].pos.line, 2);
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let docs = parse_documents(
            "[~, null, true, False, 12, -3, 0x1f, 1.5, 1e-4, .5, '12', \"true\", yes, 12.1.0, !!str 7, '']",
        )
        .expect("valid");
        assert_eq!(
            docs[0].value,
            json!([
                null, null, true, false, 12, -3, 31, 1.5, 0.0001, 0.5, "12", "true", "yes",
                "12.1.0", "7", ""
            ])
        );
    }

    #[test]
    fn aliases_copy_their_anchor() {
        let docs = parse_documents("a: &x {b: 1}\nc: *x\n").expect("valid");
        assert_eq!(docs[0].value, json!({"a": {"b": 1}, "c": {"b": 1}}));
        assert_eq!(docs[0].value_pos("/c/b"), pos(2, 4));
    }

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        let docs = parse_documents("\u{feff}a: 1\nb: 2\n").expect("valid");
        assert_eq!(docs[0].value, json!({"a": 1, "b": 2}));
        assert_eq!(docs[0].key_pos("/a"), pos(1, 1));
    }

    #[test]
    fn nesting_is_bounded_counting_aliases() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse_documents(&nested(MAX_DEPTH)).is_ok());
        let errors = parse_documents(&nested(MAX_DEPTH + 1)).expect_err("too deep");
        assert_eq!(
            errors,
            vec![YamlError {
                pos: pos(1, MAX_DEPTH + 1),
                message: "expected at most 64 levels of nested mappings and lists".into()
            }]
        );
        // 40 levels, then an alias of 40 more inside a list of 30.
        let text = format!(
            "a: &x {}\nb: {}*x{}\n",
            nested(40),
            "[".repeat(30),
            "]".repeat(30)
        );
        let errors = parse_documents(&text).expect_err("too deep through an alias");
        assert_eq!(errors[0].pos, pos(2, 34));
    }

    #[test]
    fn alias_expansion_is_bounded() {
        // Each level repeats the last one 16 times: 16^5 strings is far past the bound,
        // 16^2 is well within it.
        let mut text = String::from("l0: &l0 [\"lol\"]\n");
        for i in 1..=5 {
            let refs = vec![format!("*l{}", i - 1); 16].join(", ");
            text.push_str(&format!("l{i}: &l{i} [{refs}]\n"));
        }
        let errors = parse_documents(&text).expect_err("alias bomb");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .message
                .starts_with("anchors and aliases expand this document beyond 2 MiB"),
            "{errors:?}"
        );
        assert!(errors[0].pos.line > 3, "{errors:?}");
        let small: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        let docs = parse_documents(&small).expect("a few aliases are fine");
        assert_eq!(docs[0].value["l2"].as_array().map(Vec::len), Some(16));
        // The bound is per document: each document may use it.
        assert!(parse_documents(&format!("{small}---\n{small}")).is_ok());
    }

    #[test]
    fn pointer_segments_are_escaped() {
        let docs = parse_documents("\"a/b~c\": 1\n").expect("valid");
        assert_eq!(docs[0].key_pos("/a~1b~0c"), pos(1, 1));
    }
}
