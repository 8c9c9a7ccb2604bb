//! Typed errors of the training crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] qat_model::ModelError),
    #[error(transparent)]
    Shards(#[from] qat_shards::ShardError),
    #[error(transparent)]
    Quant(#[from] qat_quant::QuantError),
    #[error("training failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error("{shards}: shards do not match the student model {model}: {what}")]
    Mismatch {
        shards: PathBuf,
        model: PathBuf,
        what: String,
    },
    #[error("{path}: {what}")]
    Checkpoint { path: PathBuf, what: String },
    #[error("non-finite loss {loss} at step {step}; training stopped. {last_good}")]
    NonFinite {
        loss: f32,
        step: u64,
        last_good: String,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io(
    path: &std::path::Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.to_path_buf();
    move |source| TrainError::Io { path, what, source }
}
