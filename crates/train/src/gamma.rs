//! BitDistiller's CAKLD coefficient gamma, measured from the shards before training: the mean,
//! over every trained position of the shard set, of the teacher's top-1 probability
//! (`exp` of the largest stored log-prob). See formats/distill-loss.md.
//!
//! The shards are streamed file by file (one row group in memory per worker); files are read in
//! parallel (`data::each_file_par`), and the per-file sums are added in file order, so the value does
//! not depend on the thread count. The same pass checks every file and record, as distill's
//! up-front check does.

use crate::data::each_file_par;
use crate::error::{Result, TrainError};
use qat_shards::{SequenceRecord, ShardSet};
use serde::Serialize;
use std::time::Instant;

/// The measured gamma and how it was obtained (recorded in provenance.json).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TeacherConfidence {
    /// Mean teacher top-1 probability over the trained positions, in `(0, 1]`.
    pub gamma: f64,
    /// Number of trained positions averaged over.
    pub positions: u64,
    /// Wall time of the measurement.
    pub seconds: f64,
}

/// `(Σ exp(max log-prob), trained positions)` of one record, for top-K `k`.
pub fn record_confidence(rec: &SequenceRecord, k: usize) -> (f64, u64) {
    let range = rec.trained_positions();
    let n = range.len() as u64;
    let sum = range
        .map(|i| {
            rec.logprobs_at(i, k)
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
        })
        .map(|lp| f64::from(lp).exp())
        .sum();
    (sum, n)
}

/// Streams every file of `set` and returns the mean teacher top-1 probability.
pub fn teacher_confidence(set: &ShardSet) -> Result<TeacherConfidence> {
    let started = Instant::now();
    let k = set.header().top_k as usize;
    let per_file = each_file_par(set, |records| {
        records
            .map(|r| r.map(|r| record_confidence(&r, k)))
            .try_fold((0.0, 0), |(s, n), x| x.map(|(a, b)| (s + a, n + b)))
    })?;
    let (mut sum, mut positions) = (0.0, 0u64);
    for (s, n) in per_file {
        sum += s;
        positions += n;
    }
    if positions == 0 {
        return Err(TrainError::Config(format!(
            "{}: no trained positions, cannot compute the cakld gamma (pass --cakld-gamma)",
            set.dir().display()
        )));
    }
    Ok(TeacherConfidence {
        gamma: sum / positions as f64,
        positions,
        seconds: started.elapsed().as_secs_f64(),
    })
}
