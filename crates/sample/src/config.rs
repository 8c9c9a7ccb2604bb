//! The sampling stage's configuration, and the part of it recorded in every shard set.

use crate::sampler::SamplingParams;
use qat_shards::{LogprobDtype, Partition};
use serde::Serialize;
use std::path::PathBuf;

/// Where the first tokens of each sequence come from.
#[derive(Debug, Clone, PartialEq)]
pub enum StartMode {
    /// LLM-QAT data-free generation: sequence `s` starts from the `s mod n`-th non-special
    /// vocabulary token.
    DataFree,
    /// BitDistiller-style: sequence `s` starts from prompt `s mod n` of this file.
    Prompts(PathBuf),
}

/// Everything `qat-sample` needs.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub model: PathBuf,
    pub out: PathBuf,
    pub mode: StartMode,
    /// Total sequences over all partitions (default: 4096, or one per prompt).
    pub num_sequences: Option<u64>,
    /// Length cap per sequence, prompt included.
    pub max_len: usize,
    /// K: teacher log-probabilities kept per position.
    pub keep_top: u32,
    pub sampling: SamplingParams,
    /// Greedy prefix length range (LLM-QAT: 3..=5; prompt mode default 0..=0).
    pub greedy_min: u32,
    pub greedy_max: u32,
    pub seed: u64,
    pub batch_size: usize,
    pub seqs_per_file: u32,
    pub partition: Partition,
    /// Prepend the BOS token to each start token / prompt.
    pub bos: bool,
    pub logprob_dtype: LogprobDtype,
    pub device: String,
    /// Compute dtype of the teacher's forward pass: f32 (default) or bf16/f16 (GPU).
    pub dtype: String,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Time the phases of every batch after the first, synchronizing the device around each
    /// (qat_model::profile); reported in the summary.
    pub profile: bool,
}

/// The resolved settings that determine the shards' content, stored in the shard header's
/// `sampling` field (and compared when resuming or merging partitions).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SamplingRecord {
    pub mode: &'static str,
    pub prompts_file: Option<String>,
    pub prompts_sha256: Option<String>,
    pub num_prompts: Option<usize>,
    pub max_len: usize,
    pub top_k_logprobs: u32,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub greedy_min: u32,
    pub greedy_max: u32,
    pub bos: bool,
    pub seed: u64,
    /// Batch composition changes float rounding, so it is part of what makes shards identical.
    pub batch_size: usize,
    pub eos_ids: Vec<u32>,
    pub dtype: &'static str,
    /// cpu or cuda: kernels differ in rounding, so shards from different devices are not mixed.
    pub device_kind: &'static str,
}
