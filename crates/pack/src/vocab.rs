//! The vocabulary a GGUF file carries for llama.cpp's `llama` (SentencePiece) tokenizer: token
//! strings, scores and types, read from the model directory's SentencePiece `tokenizer.model`
//! (a tiny protobuf reader for `ModelProto.pieces`), or, without one, from `tokenizer.json`.
//!
//! Token types are SentencePiece's (and llama.cpp's `llama_token_type`): 1 normal, 2 unknown,
//! 3 control, 4 user defined, 5 unused, 6 byte.

use crate::error::{PackError, Result};
use std::path::Path;

pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_BYTE: i32 = 6;

/// Tokens in id order, with their scores and types.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
    /// SentencePiece's `normalizer_spec.add_dummy_prefix` (a space before the text); `true`
    /// when read from `tokenizer.json` with a `Prepend "▁"` normalizer or without a normalizer spec.
    pub add_space_prefix: bool,
    /// SentencePiece's `normalizer_spec.remove_extra_whitespaces` (runs of spaces collapse to
    /// one, leading and trailing ones go; protobuf default `true`); from `tokenizer.json`: a
    /// normalizer replacing the regex ` {2,}`. llama.cpp's `llama` tokenizer does not apply it.
    pub remove_extra_whitespaces: bool,
    /// Where it came from: `tokenizer.model` or `tokenizer.json`.
    pub source: &'static str,
}

impl Vocab {
    /// The id of the first token of type `ty`.
    pub fn first_of_type(&self, ty: i32) -> Option<u32> {
        self.types.iter().position(|&t| t == ty).map(|i| i as u32)
    }

    /// `dir/tokenizer.model` if it exists, else `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let sp = dir.join("tokenizer.model");
        if sp.is_file() {
            let bytes = std::fs::read(&sp).map_err(PackError::io(&sp, "read"))?;
            return parse_sentencepiece(&bytes)
                .map_err(|what| PackError::Tokenizer { path: sp, what });
        }
        let tj = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tj).map_err(PackError::io(&tj, "read"))?;
        parse_tokenizer_json(&text).map_err(|what| PackError::Tokenizer { path: tj, what })
    }
}

/// A protobuf reader over one message's bytes.
struct Pb<'a> {
    b: &'a [u8],
    pos: usize,
}

/// A field's value: varint, fixed 32 bits, or length-delimited bytes (fixed 64 is skipped).
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Pb<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at byte {} runs past the end ({} bytes)",
                    self.pos,
                    self.b.len()
                )
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, value), or `None` at the end.
    fn next(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Other
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            w => {
                return Err(format!(
                    "unsupported protobuf wire type {w} at byte {}",
                    self.pos
                ))
            }
        };
        Ok(Some((key >> 3, field)))
    }
}

/// `ModelProto`: field 1 = repeated `SentencePiece { piece = 1 (string), score = 2 (float),
/// type = 3 (enum, default NORMAL) }`; field 3 = `NormalizerSpec { add_dummy_prefix = 3,
/// remove_extra_whitespaces = 4 }` (both default true).
pub fn parse_sentencepiece(bytes: &[u8]) -> std::result::Result<Vocab, String> {
    let mut v = Vocab {
        tokens: Vec::new(),
        scores: Vec::new(),
        types: Vec::new(),
        add_space_prefix: true,
        remove_extra_whitespaces: true,
        source: "tokenizer.model",
    };
    let mut pb = Pb { b: bytes, pos: 0 };
    while let Some((num, field)) = pb.next()? {
        match (num, field) {
            (1, Field::Bytes(piece)) => {
                let (mut text, mut score, mut ty) = (None, 0f32, TYPE_NORMAL);
                let mut p = Pb { b: piece, pos: 0 };
                while let Some((n, f)) = p.next()? {
                    match (n, f) {
                        (1, Field::Bytes(s)) => {
                            text =
                                Some(String::from_utf8(s.to_vec()).map_err(|_| {
                                    format!("piece {} is not UTF-8", v.tokens.len())
                                })?)
                        }
                        (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
                        (3, Field::Varint(t)) => ty = t as i32,
                        _ => {}
                    }
                }
                let text = text.ok_or_else(|| format!("piece {} has no string", v.tokens.len()))?;
                v.tokens.push(text);
                v.scores.push(score);
                v.types.push(ty);
            }
            (3, Field::Bytes(spec)) => {
                let mut p = Pb { b: spec, pos: 0 };
                while let Some((n, f)) = p.next()? {
                    match (n, f) {
                        (3, Field::Varint(x)) => v.add_space_prefix = x != 0,
                        (4, Field::Varint(x)) => v.remove_extra_whitespaces = x != 0,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if v.tokens.is_empty() {
        return Err("no pieces (not a SentencePiece model?)".into());
    }
    Ok(v)
}

/// A Hugging Face `tokenizer.json` of a SentencePiece-style model: `Unigram` (pieces with their
/// scores) or `BPE` (the `k`-th normal piece by id scores `-k`, the merge priority a
/// SentencePiece BPE model gives its pieces; others 0). `added_tokens` marked special are
/// control tokens (the `unk_token` is unknown), `<0xNN>` pieces are bytes (score 0).
pub fn parse_tokenizer_json(text: &str) -> std::result::Result<Vocab, String> {
    let j: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let model = &j["model"];
    let bpe = model["type"].as_str() == Some("BPE");
    let mut pieces: Vec<(String, f32)> = match model["type"].as_str() {
        Some("Unigram") => model["vocab"]
            .as_array()
            .ok_or("model.vocab is not an array")?
            .iter()
            .map(|p| Some((p[0].as_str()?.to_string(), p[1].as_f64()? as f32)))
            .collect::<Option<_>>()
            .ok_or("model.vocab entries are not [piece, score]")?,
        Some("BPE") => {
            let vocab = model["vocab"]
                .as_object()
                .ok_or("model.vocab is not an object")?;
            let mut by_id = vec![None; vocab.len()];
            for (tok, id) in vocab {
                let id = id
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .filter(|&i| i < by_id.len());
                let id = id.ok_or_else(|| format!("token {tok:?}: id {id:?} out of range"))?;
                by_id[id] = Some((tok.clone(), 0.0));
            }
            by_id
                .into_iter()
                .collect::<Option<_>>()
                .ok_or("model.vocab ids are not 0..n")?
        }
        other => {
            return Err(format!(
                "model.type {other:?}, expected \"BPE\" or \"Unigram\""
            ))
        }
    };
    let mut types: Vec<i32> = pieces
        .iter()
        .map(|(t, _)| {
            if is_byte_piece(t) {
                TYPE_BYTE
            } else {
                TYPE_NORMAL
            }
        })
        .collect();
    let unk = model["unk_token"].as_str();
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let id = id as usize;
        if id >= pieces.len() {
            pieces.resize(id + 1, (String::new(), 0.0));
            types.resize(id + 1, TYPE_NORMAL);
        }
        pieces[id] = (content.to_string(), 0.0);
        if a["special"].as_bool() == Some(true) {
            types[id] = if Some(content) == unk {
                TYPE_UNKNOWN
            } else {
                TYPE_CONTROL
            };
        }
    }
    let mut rank = 0f32;
    for (i, ty) in types.iter().enumerate() {
        match *ty {
            TYPE_BYTE => pieces[i].1 = 0.0,
            TYPE_NORMAL if bpe => {
                pieces[i].1 = -rank; // -0 for the first, as SentencePiece writes it
                rank += 1.0;
            }
            _ => {}
        }
    }
    let prepends = j["normalizer"].to_string().contains("\"Prepend\"");
    let add_space_prefix = prepends || j["normalizer"].is_null();
    let remove_extra_whitespaces = collapses_spaces(&j["normalizer"]);
    Ok(Vocab {
        scores: pieces.iter().map(|p| p.1).collect(),
        tokens: pieces.into_iter().map(|p| p.0).collect(),
        types,
        add_space_prefix,
        remove_extra_whitespaces,
        source: "tokenizer.json",
    })
}

/// Whether a `tokenizer.json` normalizer (or a `Sequence` of them) replaces runs of two or more
/// spaces by one, as converted SentencePiece models with `remove_extra_whitespaces` do.
fn collapses_spaces(n: &serde_json::Value) -> bool {
    match n["type"].as_str() {
        Some("Sequence") => n["normalizers"]
            .as_array()
            .is_some_and(|v| v.iter().any(collapses_spaces)),
        Some("Replace") => n["pattern"]["Regex"].as_str() == Some(" {2,}") && n["content"] == " ",
        _ => false,
    }
}

fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && u8::from_str_radix(&t[3..5], 16).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_protobuf_by_hand() {
        // ModelProto { pieces: [{piece "ab", score -1.5, type BYTE}, {piece "c"}],
        //              trainer_spec (field 2, skipped), normalizer_spec { add_dummy_prefix: false } }
        let mut b = vec![0x0A, 11, 0x0A, 2, b'a', b'b', 0x15];
        b.extend((-1.5f32).to_le_bytes());
        b.extend([0x18, 6]);
        b.extend([0x0A, 3, 0x0A, 1, b'c']);
        b.extend([0x12, 2, 0x08, 0x96]); // field 2: a truncated varint inside is never parsed
        b.extend([0x1A, 2, 0x18, 0x00]);
        let v = parse_sentencepiece(&b).unwrap();
        assert_eq!(v.tokens, ["ab", "c"]);
        assert_eq!(v.scores, [-1.5, 0.0]);
        assert_eq!(v.types, [TYPE_BYTE, TYPE_NORMAL]);
        assert!(!v.add_space_prefix);
        assert!(
            v.remove_extra_whitespaces,
            "absent: the protobuf default, true"
        );
        // normalizer_spec { remove_extra_whitespaces: false } (field 4, varint 0).
        let n = b.len();
        b.extend([0x1A, 2, 0x20, 0x00]);
        assert!(!parse_sentencepiece(&b).unwrap().remove_extra_whitespaces);
        b.truncate(n);
        let e = parse_sentencepiece(&[0x0A, 5, 0x0A]).unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
    }

    #[test]
    fn tokenizer_json_bpe_scores_follow_sentencepiece() {
        let j = r#"{"model": {"type": "BPE", "unk_token": "<unk>",
            "vocab": {"<unk>": 0, "<s>": 1, "<0x41>": 2, "▁t": 3, "he": 4}},
            "added_tokens": [{"id": 0, "content": "<unk>", "special": true},
                             {"id": 1, "content": "<s>", "special": true}],
            "normalizer": {"type": "Prepend", "prepend": "▁"}}"#;
        let v = parse_tokenizer_json(j).unwrap();
        assert_eq!(v.tokens, ["<unk>", "<s>", "<0x41>", "▁t", "he"]);
        assert_eq!(
            v.types,
            [
                TYPE_UNKNOWN,
                TYPE_CONTROL,
                TYPE_BYTE,
                TYPE_NORMAL,
                TYPE_NORMAL
            ]
        );
        let bits: Vec<u32> = v.scores.iter().map(|s| s.to_bits()).collect();
        assert_eq!(bits, [0, 0, 0, (-0.0f32).to_bits(), (-1.0f32).to_bits()]);
        assert!(v.add_space_prefix);
        assert!(!v.remove_extra_whitespaces);
        // stories260K's converted normalizer: trim, collapse runs of spaces, prepend, escape.
        let collapsing = j.replace(
            r#""normalizer": {"type": "Prepend", "prepend": "▁"}"#,
            r#""normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
                {"type": "Prepend", "prepend": "▁"}]}"#,
        );
        assert_ne!(collapsing, j);
        let v = parse_tokenizer_json(&collapsing).unwrap();
        assert!(v.remove_extra_whitespaces && v.add_space_prefix);
    }
}
