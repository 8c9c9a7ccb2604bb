//! Typed errors of the model crate; messages name the file and give observed vs expected values.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: not a model directory: {what}")]
    NotAModelDir { path: PathBuf, what: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy {} to {}: {source}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: invalid config: {what}")]
    InvalidConfig { path: PathBuf, what: String },
    #[error("{path}: invalid safetensors file: {what}")]
    InvalidWeights { path: PathBuf, what: String },
    #[error("{dir}: tensor {name} is missing from the checkpoint")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {actual:?}, expected {expected:?} from config.json")]
    WrongShape {
        path: PathBuf,
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {name} has dtype {actual}, expected a float type (F32, F16 or BF16)")]
    WrongDtype {
        path: PathBuf,
        name: String,
        actual: String,
    },
    #[error("{path}: invalid tokenizer: {what}")]
    Tokenizer { path: PathBuf, what: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
