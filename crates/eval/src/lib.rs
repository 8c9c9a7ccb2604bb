//! Evaluation of teacher, fake-quantized and packed models: corpora and perplexity.

pub mod corpus;
pub mod error;
pub mod model;
pub mod perplexity;

pub use corpus::Corpus;
pub use error::{EvalError, Result};
pub use model::{load_eval_model, EvalModel, Quantization};
pub use perplexity::{nll, tokenize, NllTotals, PplMode};
