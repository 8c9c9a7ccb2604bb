//! Typed errors of `qat-pack`: every message names the file (and tensor or metadata key) and
//! gives the value found next to the one expected.

use std::path::PathBuf;

/// Result alias of the crate.
pub type Result<T, E = PackError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The student directory could not be opened (config, weights).
    #[error(transparent)]
    Model(#[from] qat_model::ModelError),

    /// The student's scheme is missing, invalid, or does not fit the model.
    #[error("{}: {what}", path.display())]
    Scheme {
        path: PathBuf,
        what: String,
        #[source]
        source: Option<Box<qat_quant::QuantError>>,
    },

    /// A tokenizer file the GGUF export cannot read (`tokenizer.model` or `tokenizer.json`).
    #[error("{}: cannot read the vocabulary: {what}", path.display())]
    Tokenizer { path: PathBuf, what: String },

    /// Nothing to pack: the scheme quantizes no linear layer's weights.
    #[error("{}: the scheme quantizes no weights (weight is null for every layer), nothing to pack", path.display())]
    NothingToPack { path: PathBuf },

    /// The output directory exists already.
    #[error("{}: output already exists (remove it to pack again)", path.display())]
    OutputExists { path: PathBuf },

    /// Not a packed model directory.
    #[error("{}: not a packed model directory: {what}", path.display())]
    NotPacked { path: PathBuf, what: String },

    /// The file's size disagrees with its header (a truncated or padded file).
    #[error("{}: truncated or damaged: {what}: the file has {found} bytes, expected {expected}", path.display())]
    Truncated {
        path: PathBuf,
        what: &'static str,
        found: u64,
        expected: u64,
    },

    /// A header safetensors cannot parse.
    #[error("{}: not a valid safetensors file: {what}", path.display())]
    Safetensors { path: PathBuf, what: String },

    /// A metadata key that is missing or holds the wrong value.
    #[error("{}: metadata {key}: {what}", path.display())]
    Metadata {
        path: PathBuf,
        key: &'static str,
        what: String,
    },

    /// A tensor that should be there and is not.
    #[error("{}: tensor {name} is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor the format does not have.
    #[error("{}: unexpected tensor {name} ({why})", path.display())]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        why: &'static str,
    },

    #[error("{}: tensor {name}: dtype {found}, expected {expected}", path.display())]
    Dtype {
        path: PathBuf,
        name: String,
        found: String,
        expected: String,
    },

    #[error("{}: tensor {name}: shape {found:?}, expected {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    /// A value of a tensor outside its valid range (a code, a zero point, padding bits, a scale).
    #[error("{}: tensor {}: {} at row {}, {} {}: found {}, expected {}", .0.path.display(), .0.name, .0.what, .0.row, .0.index_name, .0.index, .0.found, .0.expected)]
    OutOfRange(Box<OutOfRange>),

    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Where a value out of range is, what was found and what the format allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfRange {
    pub path: PathBuf,
    /// The tensor.
    pub name: String,
    /// `code`, `zero point`, `padding bits`, `scale`, ...
    pub what: &'static str,
    pub row: usize,
    /// `column`, `group` or `byte`.
    pub index_name: &'static str,
    pub index: usize,
    pub found: String,
    pub expected: String,
}

impl PackError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        op: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, op, source }
    }
}
