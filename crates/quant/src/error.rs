//! Typed errors of `qat-quant`; messages give the offending input and the expected values.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// Everything that can go wrong while parsing, loading, validating or applying a scheme.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A short name such as `W4A8KV4` that does not follow the grammar (see `formats/scheme.md`).
    #[error("invalid scheme {input:?}: {what}")]
    InvalidName { input: String, what: String },

    /// The scheme file could not be read or written.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The scheme JSON is malformed or has unknown fields / formats (`path` is empty for inline JSON).
    #[error("{}: invalid scheme JSON: {source}", display_path(path))]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A `format_version` other than the one this build understands.
    #[error("unsupported scheme format_version {found} (this build reads version {expected})")]
    UnsupportedVersion { found: u32, expected: u32 },

    /// A bit width outside the supported range.
    #[error("{location}{quantizer} bits {bits} out of range {min}..={max}")]
    BitsOutOfRange {
        location: String,
        quantizer: &'static str,
        bits: u8,
        min: u8,
        max: u8,
    },

    /// A weight format that fixes the bit width (`nf3`: 3, `nf4`: 4) with other bits.
    #[error("{location}weight format {format} needs bits {expected}, found bits {bits}")]
    FormatBits {
        location: String,
        format: &'static str,
        bits: u8,
        expected: u8,
    },

    /// A group size of 0 (`group_size` must be >= 1, or null for per output channel).
    #[error("{location}weight format {format}: group_size 0 (expected >= 1, or null for one group per output channel)")]
    ZeroGroupSize {
        location: String,
        format: &'static str,
    },

    /// A weight gradient the format does not implement (`minmax` exists only for `asym_group`).
    #[error("{location}weight grad {grad:?} is not implemented for format {format} (expected \"ste\"; \"minmax\" is for asym_group)")]
    UnsupportedGrad {
        location: String,
        grad: &'static str,
        format: &'static str,
    },

    /// An override whose pattern is empty.
    #[error("override #{index}: empty pattern (expected a glob such as \"layers.0.*\")")]
    EmptyPattern { index: usize },

    /// An override whose pattern matches no linear layer of the model it is validated against.
    #[error(
        "override #{index}: pattern {pattern:?} matches no linear layer of the model \
         (it has layers.0 ..= layers.{last_layer}, names like \"layers.0.self_attn.q_proj\", \"layers.0.mlp.down_proj\")"
    )]
    UnmatchedPattern {
        index: usize,
        pattern: String,
        last_layer: usize,
    },

    /// A weight quantizer that does not fit a layer's shape (e.g. a group size not dividing in-features).
    #[error("{layer}: weight format {format} does not fit the layer ([{out_features}, {in_features}]): {what}")]
    LayerMismatch {
        layer: String,
        format: String,
        out_features: usize,
        in_features: usize,
        what: String,
    },

    /// A tensor whose shape or dtype a quantizer cannot handle.
    #[error("{op}: {what}")]
    BadTensor { op: &'static str, what: String },
}

fn display_path(p: &std::path::Path) -> String {
    if p.as_os_str().is_empty() {
        "<inline>".to_string()
    } else {
        p.display().to_string()
    }
}

impl From<QuantError> for candle_core::Error {
    fn from(e: QuantError) -> Self {
        candle_core::Error::wrap(e)
    }
}
