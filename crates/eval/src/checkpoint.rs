//! The perplexity checkpoint (`qat-eval --checkpoint FILE`): the running NLL totals after each
//! batch, so that an interrupted evaluation of a large model continues where it stopped and
//! ends with the bits of an uninterrupted run.
//!
//! The file is JSON, replaced atomically (`qat_shards::fsutil::write_atomic`) after every
//! batch, and removed when the evaluation finishes ([`remove`]). It holds a key, the sha256 of everything that
//! determines the result (the sequences' tokens, the weights, scheme, dtype, device and batch
//! size); a checkpoint with another key is refused rather than mixed into this run's totals.

use crate::error::{EvalError, Result};
use crate::perplexity::NllTotals;
use qat_shards::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const FORMAT: &str = "qat-eval-checkpoint/1";

/// Where to keep the running totals, and what they must belong to.
#[derive(Debug, Clone)]
pub struct NllCheckpoint {
    pub path: PathBuf,
    /// sha256 (hex) of the evaluation's inputs and settings; see [`NllCheckpoint::new`].
    pub key: String,
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    key: String,
    /// Batches done, in the evaluation's (longest-first) order.
    batches: u64,
    /// `f64::to_bits` of the NLL sum: the exact value, whatever a JSON parser does with floats.
    nll_sum_bits: u64,
    tokens: u64,
    sequences: u64,
}

impl NllCheckpoint {
    /// A checkpoint at `path` for the evaluation of `seqs` under `settings` (a JSON value of
    /// everything else that changes the sums: weights hash, scheme, dtype, device, batch size).
    pub fn new(path: &Path, seqs: &[Vec<u32>], settings: &serde_json::Value) -> Self {
        let mut h = Sha256::new();
        h.update(settings.to_string().as_bytes());
        h.update((seqs.len() as u64).to_le_bytes());
        for s in seqs {
            h.update((s.len() as u64).to_le_bytes());
            for t in s {
                h.update(t.to_le_bytes());
            }
        }
        Self {
            path: path.to_path_buf(),
            key: hex::encode(h.finalize()),
        }
    }

    fn error(&self, what: impl Into<String>) -> EvalError {
        EvalError::Checkpoint {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// The batches done (of `batches`) and their totals, if the file exists; an error if it
    /// cannot be read or belongs to another evaluation.
    pub(crate) fn load(&self, batches: u64) -> Result<Option<(u64, NllTotals)>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(format!("cannot read: {e}"))),
        };
        let state: State = serde_json::from_str(&text)
            .map_err(|e| self.error(format!("not a qat-eval checkpoint: {e}")))?;
        if state.format != FORMAT {
            return Err(self.error(format!("format {:?}, expected {FORMAT:?}", state.format)));
        }
        if state.key != self.key {
            return Err(self.error(
                "made by an evaluation of other sequences, weights or settings (key differs); delete it to start over",
            ));
        }
        if state.batches > batches {
            return Err(self.error(format!(
                "says {} batches are done, of {batches}",
                state.batches
            )));
        }
        Ok(Some((
            state.batches,
            NllTotals {
                nll_sum: f64::from_bits(state.nll_sum_bits),
                tokens: state.tokens,
                sequences: state.sequences,
            },
        )))
    }

    /// Replaces the file by `batches` and `totals`, atomically.
    pub(crate) fn save(&self, batches: u64, totals: &NllTotals) -> Result<()> {
        let state = State {
            format: FORMAT.into(),
            key: self.key.clone(),
            batches,
            nll_sum_bits: totals.nll_sum.to_bits(),
            tokens: totals.tokens,
            sequences: totals.sequences,
        };
        let json = serde_json::to_string_pretty(&state).expect("state serializes") + "\n";
        Ok(write_atomic(&self.path, json.as_bytes())?)
    }
}

/// Removes a `--checkpoint` file, perplexity's or the tasks' (once the evaluation's result is
/// written); a missing file is not an error.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EvalError::Checkpoint {
            path: path.to_path_buf(),
            what: format!("cannot remove: {e}"),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(nll_sum: f64) -> NllTotals {
        NllTotals {
            nll_sum,
            tokens: 7,
            sequences: 2,
        }
    }

    #[test]
    fn saves_and_loads_the_exact_sum() {
        let dir = tempfile::tempdir().unwrap();
        let settings = serde_json::json!({"batch_size": 2});
        let ck = NllCheckpoint::new(&dir.path().join("c.json"), &[vec![1, 2, 3]], &settings);
        assert!(ck.load(3).unwrap().is_none());
        // 0.1 + 0.2 has no short decimal form that every parser rounds back to the same bits.
        let sum = 0.1f64 + 0.2 + 1e-17;
        ck.save(3, &totals(sum)).unwrap();
        let (batches, t) = ck.load(3).unwrap().unwrap();
        let err = ck.load(2).unwrap_err().to_string();
        assert!(err.contains("says 3 batches are done, of 2"), "{err}");
        assert_eq!((batches, t.tokens, t.sequences), (3, 7, 2));
        assert_eq!(t.nll_sum.to_bits(), sum.to_bits());
        remove(&ck.path).unwrap();
        assert!(!ck.path.exists());
        remove(&ck.path).unwrap();
    }

    #[test]
    fn another_evaluation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let settings = serde_json::json!({"batch_size": 2});
        NllCheckpoint::new(&path, &[vec![1, 2, 3]], &settings)
            .save(1, &totals(1.0))
            .unwrap();
        // Other tokens, the same tokens split otherwise, or other settings: another key.
        for (seqs, s) in [
            (vec![vec![1, 2, 4]], settings.clone()),
            (vec![vec![1, 2], vec![3]], settings.clone()),
            (vec![vec![1, 2, 3]], serde_json::json!({"batch_size": 4})),
        ] {
            let err = NllCheckpoint::new(&path, &seqs, &s).load(1).unwrap_err();
            assert!(err.to_string().contains("key differs"), "{err}");
        }
        std::fs::write(&path, "{").unwrap();
        let err = NllCheckpoint::new(&path, &[vec![1, 2, 3]], &settings)
            .load(1)
            .unwrap_err();
        assert!(
            err.to_string().contains("not a qat-eval checkpoint"),
            "{err}"
        );
    }
}
