//! What a `qat-distill` run is given: the settings that determine the student (saved in
//! checkpoints and provenance), the run's paths and switches, and their validation.

use crate::error::{Result, TrainError};
use crate::loss::LossKind;
use crate::optim::{AdamWConfig, Schedule};
use qat_quant::Scheme;
use qat_shards::ShardSet;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    Steps(u64),
    Epochs(f64),
    /// Input tokens seen (padding excluded), rounded up to whole steps.
    Tokens(u64),
}

/// The settings that determine the result (saved in checkpoints and provenance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub scheme: Scheme,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub adam: AdamWConfig,
    pub max_grad_norm: f64,
    pub budget: Budget,
    pub seed: u64,
    /// The distillation loss (formats/distill-loss.md); serialized as "fkl", "rkl", "jsd", "cakld".
    pub loss: LossKind,
    /// CAKLD's gamma given on the command line; `None` = measured from the shards
    /// ([`crate::gamma::teacher_confidence`]). Only valid with `loss = cakld`.
    #[serde(default)]
    pub cakld_gamma: Option<f64>,
    /// Rebalance K/V channels (function-preserving, see balance.rs) from this many calibration
    /// sequences of the shards before training; 0 = off.
    #[serde(default)]
    pub balance_kv: usize,
    /// Teacher distribution computed online (`--teacher`) rather than read from the shards.
    pub online_teacher: bool,
    /// Compute dtype of the forward and backward passes (`--dtype`): "f32", or "bf16" / "f16"
    /// with f32 master weights, gradients and AdamW state (the student casts its weights in
    /// every forward pass; an online teacher is loaded in this dtype).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// What the trained weights are stored in between steps (`--master-weights`): "f32", or
    /// "bf16" / "f16" to measure what rounding every update to that dtype costs (the weights are
    /// rounded before the first step and after every update; AdamW moments stay f32).
    #[serde(default = "default_dtype")]
    pub master_weights: String,
    /// Each micro-batch is split into this many parts that train concurrently, one thread each
    /// (parallel.rs); their gradients are summed weighted by trained positions, so this only
    /// changes floating-point rounding. 0 = auto ([`crate::parallel::auto_parts`]; a resumed run
    /// keeps its checkpoint's value); runs before this setting existed used 1.
    #[serde(default = "one")]
    pub data_parallel: usize,
}

fn one() -> usize {
    1
}

fn default_dtype() -> String {
    "f32".into()
}

/// Everything `qat-distill` needs.
#[derive(Debug, Clone)]
pub struct DistillConfig {
    pub model: PathBuf,
    pub shards: PathBuf,
    pub out: PathBuf,
    pub settings: TrainSettings,
    pub checkpoint_every: u64,
    pub resume: bool,
    /// Compute the teacher's distribution online from this model (full vocabulary) instead of
    /// reading it from the shards; the shards then only supply the token sequences.
    pub teacher: Option<PathBuf>,
    pub device: String,
    pub progress: bool,
    /// Time the phases of every step after the first, synchronizing the device around each
    /// (crate::profile); reported in the summary.
    pub profile: bool,
    /// Test hook: poison the loss at this step (simulates a NaN).
    pub inject_nan_at: Option<u64>,
}

pub(super) fn total_steps(budget: Budget, set: &ShardSet, per_step: usize) -> u64 {
    let h = set.header();
    match budget {
        Budget::Steps(s) => s,
        Budget::Epochs(e) => ((h.num_sequences as f64 * e) / per_step as f64).ceil() as u64,
        Budget::Tokens(t) => {
            let avg = set.total_tokens() as f64 / h.num_sequences.max(1) as f64;
            (t as f64 / (avg * per_step as f64)).ceil() as u64
        }
    }
}

/// Refuses settings no run can use, naming the flag.
pub(super) fn validate(s: &TrainSettings) -> Result<()> {
    if s.batch_size == 0 || s.grad_accum == 0 {
        return Err(TrainError::Config(
            "--batch-size and --grad-accum must be >= 1".into(),
        ));
    }
    if !(s.lr > 0.0 && s.lr.is_finite()) {
        return Err(TrainError::Config(format!(
            "--lr must be > 0, got {}",
            s.lr
        )));
    }
    match (s.loss, s.cakld_gamma) {
        (LossKind::Cakld, Some(g)) if !(0.0..=1.0).contains(&g) => Err(TrainError::Config(
            format!("--cakld-gamma must be in 0..=1, got {g}"),
        )),
        (LossKind::Cakld, _) | (_, None) => Ok(()),
        (other, Some(_)) => Err(TrainError::Config(format!(
            "--cakld-gamma applies only to --loss cakld, not --loss {other}"
        ))),
    }
}
