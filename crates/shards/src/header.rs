//! The shard-set header (everything all partitions share), the teacher identity and dtype choices.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};

/// Version of the on-disk format described in `formats/shards.md`.
pub const FORMAT_VERSION: u32 = 1;

/// Largest vocabulary whose ids fit the `u16` id column.
pub const MAX_U16_VOCAB: u32 = 1 << 16;

/// Storage type of the top-K log-probabilities.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LogprobDtype {
    /// IEEE 754 binary16 (Parquet FIXED_LEN_BYTE_ARRAY(2) + FLOAT16). Relative error <= 2^-11.
    #[default]
    F16,
    /// IEEE 754 binary32 (Parquet FLOAT). Exact.
    F32,
}

impl LogprobDtype {
    /// The lowercase name used in JSON and Parquet key-value metadata (`"f16"` / `"f32"`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogprobDtype::F16 => "f16",
            LogprobDtype::F32 => "f32",
        }
    }
}

/// Storage type of the top-K token ids.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[serde(rename_all = "lowercase")]
pub enum IdDtype {
    /// Parquet INT32 annotated INT(16, unsigned); used iff `vocab_size <= 65536`.
    U16,
    /// Parquet INT32 annotated INT(32, unsigned); used iff `vocab_size > 65536`.
    U32,
}

impl IdDtype {
    /// The id dtype the format prescribes for a vocabulary: `U16` iff `vocab_size <= 65536`.
    pub fn for_vocab(vocab_size: u32) -> IdDtype {
        if vocab_size <= MAX_U16_VOCAB {
            IdDtype::U16
        } else {
            IdDtype::U32
        }
    }

    /// The lowercase name used in JSON and Parquet key-value metadata (`"u16"` / `"u32"`).
    pub fn as_str(self) -> &'static str {
        match self {
            IdDtype::U16 => "u16",
            IdDtype::U32 => "u32",
        }
    }
}

/// Identity of the teacher that produced the shards.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct TeacherIdentity {
    /// Lowercase hex sha256 over the teacher weights (definition owned by the producer).
    pub weights_sha256: String,
    /// Lowercase hex sha256 of the tokenizer file.
    pub tokenizer_sha256: String,
    /// Size of the output vocabulary (rows of the LM head); all ids are `< vocab_size`.
    pub vocab_size: u32,
    /// The model's `config.json` as parsed.
    pub config: serde_json::Value,
    /// Informational only (e.g. model directory); never compared, written as `""` inside shard files.
    pub source: String,
}

/// Everything about a shard set that all partitions share (compared when merging/resuming).
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct ShardSetHeader {
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Producing tool and version, e.g. `"qat-sample 0.1.0"` (not compared between partitions).
    pub tool: String,
    /// The teacher.
    pub teacher: TeacherIdentity,
    /// Full resolved sampling configuration (opaque here).
    pub sampling: serde_json::Value,
    /// Base seed of the generation.
    pub seed: u64,
    /// K: number of (id, logprob) pairs stored per position, `1..=vocab_size`.
    pub top_k: u32,
    /// Storage type of log-probabilities.
    pub logprob_dtype: LogprobDtype,
    /// Storage type of ids; must equal `IdDtype::for_vocab(teacher.vocab_size)`.
    pub id_dtype: IdDtype,
    /// Total number of sequences over all partitions; seq ids are `0..num_sequences`.
    pub num_sequences: u64,
    /// File `f` holds seq ids `f*S .. min((f+1)*S, num_sequences)`.
    pub seqs_per_file: u32,
    /// `ceil(num_sequences / seqs_per_file)`, over all partitions.
    pub num_files: u32,
}

/// `ceil(num_sequences / seqs_per_file)` as a `u32`, or an error if it does not fit or S is 0.
pub fn num_files_for(num_sequences: u64, seqs_per_file: u32) -> Result<u32> {
    if seqs_per_file == 0 {
        return Err(ShardError::InvalidHeader(
            "seqs_per_file must be >= 1, got 0".into(),
        ));
    }
    let n = num_sequences.div_ceil(u64::from(seqs_per_file));
    u32::try_from(n).map_err(|_| {
        ShardError::InvalidHeader(format!(
            "num_sequences {num_sequences} / seqs_per_file {seqs_per_file} gives {n} files, more than u32::MAX"
        ))
    })
}

/// File name of the shard with global index `file_index`: `shard-{file_index:05}.parquet`.
pub fn shard_file_name(file_index: u32) -> String {
    format!("shard-{file_index:05}.parquet")
}

impl ShardSetHeader {
    /// Why a model with this `tokenizer.json` sha256 and vocabulary size cannot be trained or
    /// calibrated on these shards (its token ids would mean other tokens), or None if it can.
    pub fn teacher_mismatch(&self, tokenizer_sha256: &str, vocab_size: usize) -> Option<String> {
        let theirs = &self.teacher.tokenizer_sha256;
        if theirs != tokenizer_sha256 {
            let short = |s: &str| s.chars().take(12).collect::<String>();
            return Some(format!(
                "tokenizer.json sha256 {} differs from the shards' teacher tokenizer {}",
                short(tokenizer_sha256),
                short(theirs)
            ));
        }
        if self.teacher.vocab_size as usize != vocab_size {
            return Some(format!(
                "vocab_size {vocab_size} differs from the shards' {}",
                self.teacher.vocab_size
            ));
        }
        None
    }

    /// Check internal consistency (version, K range, id dtype, file count).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ShardError::InvalidHeader(m));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version is {}, expected {FORMAT_VERSION}",
                self.format_version
            ));
        }
        let vocab = self.teacher.vocab_size;
        if vocab == 0 {
            return bad("teacher.vocab_size must be >= 1, got 0".into());
        }
        if self.top_k == 0 || self.top_k > vocab {
            return bad(format!(
                "top_k must be in 1..={vocab} (vocab_size), got {}",
                self.top_k
            ));
        }
        let want = IdDtype::for_vocab(vocab);
        if self.id_dtype != want {
            return bad(format!(
                "id_dtype is {:?} but vocab_size {vocab} requires {:?}",
                self.id_dtype.as_str(),
                want.as_str()
            ));
        }
        if self.num_sequences == 0 {
            return bad("num_sequences must be >= 1, got 0".into());
        }
        let files = num_files_for(self.num_sequences, self.seqs_per_file)?;
        if self.num_files != files {
            return bad(format!(
                "num_files is {} but ceil(num_sequences {} / seqs_per_file {}) = {files}",
                self.num_files, self.num_sequences, self.seqs_per_file
            ));
        }
        Ok(())
    }

    /// Sequence ids held by file `file_index` (empty if out of range).
    pub fn file_seq_range(&self, file_index: u32) -> Range<u64> {
        let s = u64::from(self.seqs_per_file);
        let start = (u64::from(file_index) * s).min(self.num_sequences);
        let end = (start + s).min(self.num_sequences);
        start..end
    }

    /// Number of rows file `file_index` must contain.
    pub fn file_rows(&self, file_index: u32) -> u64 {
        let r = self.file_seq_range(file_index);
        r.end - r.start
    }

    /// The header with the fields that are never compared (`tool`, `teacher.source`) blanked.
    pub fn comparable(&self) -> ShardSetHeader {
        let mut h = self.clone();
        h.tool = String::new();
        h.teacher.source = String::new();
        h
    }

    /// The header as embedded in every shard file (`teacher.source` blanked so that file bytes do
    /// not depend on where the teacher happened to be stored).
    pub fn for_file(&self) -> ShardSetHeader {
        let mut h = self.clone();
        h.teacher.source = String::new();
        h
    }

    /// `Ok` if both headers agree on everything but `tool` and `teacher.source`; otherwise a
    /// message naming the differing fields with both values.
    pub fn check_compatible(&self, other: &ShardSetHeader) -> std::result::Result<(), String> {
        let (a, b) = (self.comparable(), other.comparable());
        if a == b {
            return Ok(());
        }
        let (va, vb) = match (serde_json::to_value(&a), serde_json::to_value(&b)) {
            (Ok(va), Ok(vb)) => (va, vb),
            _ => return Err("headers differ".into()),
        };
        let mut diffs = Vec::new();
        diff_values("", &va, &vb, &mut diffs);
        if diffs.is_empty() {
            diffs.push("headers differ".into());
        }
        Err(diffs.join("; "))
    }
}

/// Collect `path: a vs b` for differing leaves (objects recursed one level deep into `teacher`
/// and `sampling`, whose long JSON would otherwise be cut before the field that differs).
fn diff_values(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(ma), Value::Object(mb))
            if prefix.is_empty() || prefix == "teacher" || prefix == "sampling" =>
        {
            let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let (x, y) = (
                    ma.get(k).unwrap_or(&Value::Null),
                    mb.get(k).unwrap_or(&Value::Null),
                );
                if x != y {
                    diff_values(&name, x, y, out);
                }
            }
        }
        _ => out.push(format!("{prefix}: {} vs {}", short_json(a), short_json(b))),
    }
}

/// A JSON value rendered for an error message, cut at ~120 bytes.
fn short_json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() <= 120 {
        return s;
    }
    let mut i = 117;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    format!("{}...", &s[..i])
}
