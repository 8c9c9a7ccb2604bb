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
    #[error("invalid settings: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;
