//! Typed errors of the sampling stage.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Model(#[from] qat_model::ModelError),
    #[error(transparent)]
    Shards(#[from] qat_shards::ShardError),
    #[error("generation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error("{path}: {what}")]
    Prompts { path: PathBuf, what: String },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SampleError>;
