//! The sampling stage: the full-precision teacher generates sequences (LLM-QAT data-free, or
//! from prompts) and its top-K next-token log-probabilities are written as Parquet shards.

pub mod config;
pub mod device_rows;
pub mod error;
pub mod generate;
pub mod prompts;
pub mod rng;
pub mod run;
pub mod sampler;

pub use config::{SampleConfig, SamplingRecord, StartMode};
pub use error::{Result, SampleError};
pub use generate::{generate_batch, GenerationParams, GenerationStats, SequenceSpec};
pub use rng::SequenceRng;
pub use run::{run, SampleSummary};
pub use sampler::SamplingParams;
