//! Typed errors of the clipping stage.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error(transparent)]
    Model(#[from] qat_model::ModelError),
    #[error(transparent)]
    Shards(#[from] qat_shards::ShardError),
    #[error(transparent)]
    Quant(#[from] qat_quant::QuantError),
    #[error(transparent)]
    Train(#[from] qat_train::TrainError),
    #[error("clipping failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error("{shards}: shards do not match the model {model}: {what}")]
    Mismatch {
        shards: PathBuf,
        model: PathBuf,
        what: String,
    },
    /// The progress directory of an interrupted run cannot be used.
    #[error("{}: {what}", path.display())]
    Progress { path: PathBuf, what: String },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, ClipError>;

pub(crate) fn io(
    path: &std::path::Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ClipError {
    let path = path.to_path_buf();
    move |source| ClipError::Io { path, what, source }
}
