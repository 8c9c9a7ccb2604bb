//! `qat-distill`'s checkpoint: the state that resumes a run to the identical loss curve, in
//! `<out>.work/checkpoint/`, replaced by an atomic swap so a kill never leaves it half written.

use super::TrainSettings;
use crate::data::DataCursor;
use crate::error::{io, Result, TrainError};
use crate::optim::AdamW;
use crate::student::{save_safetensors, Student};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `state.json`: where the run stands and what it was made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    pub step: u64,
    pub cursor: DataCursor,
    pub tokens_seen: u64,
    pub log_lines: u64,
    pub settings: TrainSettings,
    pub shards_manifest_sha256: String,
    pub init_weights_sha256: String,
    /// The K/V rebalancing done before step 1 (already in the weights; not redone on resume).
    #[serde(default)]
    pub balance: Option<crate::balance::BalanceReport>,
}

/// Whether `ckpt` holds a checkpoint (complete or not: its `state.json` is written last).
pub(super) fn exists(ckpt: &Path) -> bool {
    ckpt.join("state.json").is_file()
}

/// The state of the checkpoint in `ckpt`; `None` when there is none, an error when its
/// `state.json` cannot be read or parsed.
pub(super) fn read_state(ckpt: &Path) -> Result<Option<CheckpointState>> {
    let path = ckpt.join("state.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path, "cannot read checkpoint"))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::Checkpoint {
            path,
            what: format!("invalid: {e}"),
        })
}

/// A process killed between the two renames of [`write`]'s swap leaves `checkpoint.old`
/// (complete) and no `checkpoint`: move it back, so that `--resume` continues from it instead of
/// silently starting over from step 0.
pub(super) fn recover_interrupted_swap(work: &Path) -> Result<()> {
    let (fin, old) = (work.join("checkpoint"), work.join("checkpoint.old"));
    if !fin.exists() && old.join("state.json").is_file() {
        std::fs::rename(&old, &fin).map_err(io(
            &old,
            "cannot restore the checkpoint of an interrupted swap",
        ))?;
    }
    Ok(())
}

/// Writes the checkpoint to `work/checkpoint.tmp`, then swaps it in for `work/checkpoint`. On
/// failure (e.g. a full disk) the partial `checkpoint.tmp` is removed; the last good checkpoint
/// stays as it was.
pub(super) fn write(
    work: &Path,
    student: &Student,
    opt: &AdamW,
    state: &CheckpointState,
) -> Result<()> {
    let tmp = work.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| {
        std::fs::create_dir_all(&tmp).map_err(io(&tmp, "cannot create checkpoint"))?;
        save_safetensors(&student.tensors(), &tmp.join("weights.safetensors"))?;
        save_safetensors(&opt.state_tensors(), &tmp.join("optimizer.safetensors"))?;
        let state_path = tmp.join("state.json");
        std::fs::write(
            &state_path,
            serde_json::to_string_pretty(state).expect("json"),
        )
        .map_err(io(&state_path, "cannot write"))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let fin = work.join("checkpoint");
    let old = work.join("checkpoint.old");
    // Swap: the old checkpoint stays valid until the new one is complete.
    let _ = std::fs::remove_dir_all(&old);
    if fin.exists() {
        std::fs::rename(&fin, &old).map_err(io(&fin, "cannot move old checkpoint"))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io(&fin, "cannot move checkpoint into place"))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Cuts the log back to the checkpoint's `keep` lines, atomically (a kill mid-rewrite must not
/// lose lines the checkpoint counts), and refuses a log shorter than that.
pub(super) fn truncate_lines(path: &Path, keep: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let have = text.lines().count() as u64;
    if have < keep {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            what: format!(
                "has {have} lines, fewer than the {keep} its checkpoint counts; cannot resume"
            ),
        });
    }
    let kept: String = text
        .lines()
        .take(keep as usize)
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(qat_shards::fsutil::write_atomic(path, kept.as_bytes())?)
}
