//! BitDistiller's CAKLD coefficient gamma, measured from the shards before training: the mean,
//! over every trained position of the shard set, of the teacher's top-1 probability
//! (`exp` of the largest stored log-prob). See formats/distill-loss.md.
//!
//! The shards are streamed file by file (one row group in memory per worker); files are read by
//! up to `available_parallelism` threads, and the per-file sums are added in file order, so the
//! value does not depend on the thread count.

use crate::error::{Result, TrainError};
use qat_shards::{SequenceRecord, ShardSet};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
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
    let sum = range.map(|i| rec.logprobs_at(i, k).iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))).map(|lp| f64::from(lp).exp()).sum();
    (sum, n)
}

/// Streams every file of `set` and returns the mean teacher top-1 probability.
pub fn teacher_confidence(set: &ShardSet) -> Result<TeacherConfidence> {
    let started = Instant::now();
    let k = set.header().top_k as usize;
    let files = set.files();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len()).max(1);
    let next = AtomicUsize::new(0);
    let per_file: Mutex<Vec<Option<(f64, u64)>>> = Mutex::new(vec![None; files.len()]);
    let first_error: Mutex<Option<TrainError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let f = next.fetch_add(1, Ordering::Relaxed);
                if f >= files.len() || first_error.lock().map_or(true, |e| e.is_some()) {
                    return;
                }
                let result = set.file_records(&files[f]).and_then(|records| {
                    records.map(|r| r.map(|r| record_confidence(&r, k))).try_fold((0.0, 0), |(s, n), x| x.map(|(a, b)| (s + a, n + b)))
                });
                match result {
                    Ok(v) => per_file.lock().expect("no worker panics while holding it")[f] = Some(v),
                    Err(e) => {
                        first_error.lock().expect("no worker panics while holding it").get_or_insert(e.into());
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("workers finished") {
        return Err(e);
    }
    let (mut sum, mut positions) = (0.0, 0u64);
    for (s, n) in per_file.into_inner().expect("workers finished").into_iter().flatten() {
        sum += s;
        positions += n;
    }
    if positions == 0 {
        return Err(TrainError::Config(format!("{}: no trained positions, cannot compute the cakld gamma (pass --cakld-gamma)", set.dir().display())));
    }
    Ok(TeacherConfidence { gamma: sum / positions as f64, positions, seconds: started.elapsed().as_secs_f64() })
}
