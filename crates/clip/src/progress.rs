//! `qat-clip`'s progress directory `<out>.work/`: after every block, its clipped weights
//! (`block-NNNN.safetensors`) and the layer reports so far (`state.json`, written last), so that
//! a rerun of an interrupted search starts at the first block not done and ends with the bytes
//! of an uninterrupted run. `state.json` holds a key (the sha256 of the resolved config, the
//! initial weights and the shards' manifests); another search's directory is refused.

use crate::error::{io, ClipError, Result};
use crate::run::LayerReport;
use candle_core::{Device, Tensor};
use qat_shards::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FORMAT: &str = "qat-clip-progress/1";

/// A layer report with its floats as f64 bits (JSON parsers may round decimal floats).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedReport {
    layer: String,
    group_size: usize,
    tokens: usize,
    mse_before_bits: u64,
    mse_after_bits: u64,
    reduction_bits: u64,
    clipped_groups_bits: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    key: String,
    blocks_done: usize,
    layers: Vec<SavedReport>,
}

/// The blocks an interrupted run finished.
pub(crate) struct Done {
    pub blocks: usize,
    /// The clipped weights of those blocks, by checkpoint key.
    pub tensors: HashMap<String, Tensor>,
    pub layers: Vec<LayerReport>,
}

pub(crate) struct Progress {
    dir: PathBuf,
    key: String,
}

impl Progress {
    /// The progress directory of output `out` for a search keyed by `key`.
    pub fn new(out: &Path, key: String) -> Self {
        Self {
            dir: PathBuf::from(format!("{}.work", out.display())),
            key,
        }
    }

    fn error(&self, path: &Path, what: String) -> ClipError {
        ClipError::Progress {
            path: path.to_path_buf(),
            what,
        }
    }

    /// What an interrupted run of this search left, if anything, its tensors on `dev`.
    pub fn load(&self, dev: &Device) -> Result<Option<Done>> {
        let path = self.dir.join("state.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(&path, format!("cannot read: {e}"))),
        };
        let state: State = serde_json::from_str(&text)
            .map_err(|e| self.error(&path, format!("not a qat-clip progress file: {e}")))?;
        if state.format != FORMAT || state.key != self.key {
            return Err(self.error(&path, format!("made by another search (other model, shards, scheme or settings); delete {} to start over", self.dir.display())));
        }
        let mut tensors = HashMap::new();
        for block in 0..state.blocks_done {
            let file = self.block_file(block);
            let loaded = candle_core::safetensors::load(&file, dev)
                .map_err(|e| self.error(&file, format!("cannot load: {e}")))?;
            tensors.extend(loaded);
        }
        let layers = state
            .layers
            .into_iter()
            .map(|r| LayerReport {
                layer: r.layer,
                group_size: r.group_size,
                tokens: r.tokens,
                mse_before: f64::from_bits(r.mse_before_bits),
                mse_after: f64::from_bits(r.mse_after_bits),
                reduction: f64::from_bits(r.reduction_bits),
                clipped_groups: f64::from_bits(r.clipped_groups_bits),
            })
            .collect();
        Ok(Some(Done {
            blocks: state.blocks_done,
            tensors,
            layers,
        }))
    }

    fn block_file(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:04}.safetensors"))
    }

    /// Records block `block` as done: its clipped weights, then the reports of all blocks so
    /// far (the state is written last and renamed into place, so it never names a block whose
    /// weights are not complete).
    pub fn save_block(
        &self,
        block: usize,
        clipped: &HashMap<String, Tensor>,
        layers: &[LayerReport],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir, "cannot create"))?;
        qat_train::student::save_safetensors(clipped, &self.block_file(block))?;
        let state = State {
            format: FORMAT.into(),
            key: self.key.clone(),
            blocks_done: block + 1,
            layers: layers
                .iter()
                .map(|r| SavedReport {
                    layer: r.layer.clone(),
                    group_size: r.group_size,
                    tokens: r.tokens,
                    mse_before_bits: r.mse_before.to_bits(),
                    mse_after_bits: r.mse_after.to_bits(),
                    reduction_bits: r.reduction.to_bits(),
                    clipped_groups_bits: r.clipped_groups.to_bits(),
                })
                .collect(),
        };
        let json = serde_json::to_string_pretty(&state).expect("json");
        Ok(write_atomic(&self.dir.join("state.json"), json.as_bytes())?)
    }

    /// Removes the directory (the output is in place).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
