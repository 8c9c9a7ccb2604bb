//! Evaluation of teacher, fake-quantized and packed models: corpora and perplexity, and
//! zero-shot multiple-choice tasks as lm-evaluation-harness scores them.

pub mod accuracy;
pub mod checkpoint;
pub mod corpus;
pub mod error;
pub mod loglikelihood;
pub mod model;
pub mod perplexity;
pub mod task_checkpoint;
pub mod tasks;
pub mod zeroshot;

pub use accuracy::{argmax, mean_stderr, predict, ItemPrediction};
pub use checkpoint::NllCheckpoint;
pub use corpus::Corpus;
pub use error::{EvalError, Result};
pub use loglikelihood::{encode_pair, loglikelihoods, EncodedPair, Loglikelihood};
pub use model::{load_eval_model, EvalModel, Quantization};
pub use perplexity::{nll, tokenize, NllRun, NllTotals, PplMode, PROFILE_PHASES};
pub use task_checkpoint::TaskCheckpoint;
pub use tasks::{McItem, Task, TaskData};
pub use zeroshot::{evaluate, ItemDetail, TaskScores};
