//! Typed errors of the evaluation crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] qat_model::ModelError),
    #[error("evaluation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {what}")]
    Corpus { path: PathBuf, what: String },
    /// A task file that cannot be read as a whole (missing, not UTF-8, wrong length).
    #[error("{}: {what}", path.display())]
    TaskFile { path: PathBuf, what: String },
    /// A task file with a bad record: `line` is 1-based.
    #[error("{}:{line}: {what}", path.display())]
    TaskLine {
        path: PathBuf,
        line: usize,
        what: String,
    },
    /// A file that cannot be written (`--checkpoint`), from the shared atomic writer.
    #[error(transparent)]
    Write(#[from] qat_shards::ShardError),
    /// A `--checkpoint` file that cannot be read, written or used for this evaluation.
    #[error("{}: {what}", path.display())]
    Checkpoint { path: PathBuf, what: String },
    #[error("invalid settings: {0}")]
    Config(String),
    /// A packed model directory that cannot be loaded.
    #[error(transparent)]
    Pack(#[from] qat_pack::PackError),
    /// The directory's `quant_scheme.json` cannot be read.
    #[error(transparent)]
    Quant(#[from] qat_quant::QuantError),
    /// `--scheme` does not parse or load; the source names the value or the file.
    #[error("--scheme")]
    SchemeArg {
        #[source]
        source: qat_quant::QuantError,
    },
    #[error("scheme {scheme} does not fit {}", dir.display())]
    SchemeFit {
        scheme: String,
        dir: PathBuf,
        #[source]
        source: Box<qat_quant::QuantError>,
    },
    #[error("{}: --scheme {arg} cannot be applied to a packed model (its weights are quantized already; it runs under the scheme it was packed with)", dir.display())]
    SchemeForPacked { dir: PathBuf, arg: String },
    #[error("loading {}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<qat_model::ModelError>,
    },
}

pub type Result<T> = std::result::Result<T, EvalError>;
