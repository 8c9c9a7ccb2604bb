//! The trainable student: a Llama whose weights are candle `Var`s, loaded from a model dir, and
//! its export as a Hugging Face model directory.

use crate::error::{io, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use qat_model::{Llama, ModelDir};
use std::collections::HashMap;
use std::path::Path;

/// A model with trainable weights.
pub struct Student {
    pub model: Llama,
    pub varmap: VarMap,
}

impl Student {
    /// Loads `dir`'s weights (f32) into fresh variables.
    pub fn load(dir: &ModelDir, dev: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let model = Llama::load(vb, &dir.config)?;
        // SAFETY: weight files are mapped read-only while we copy out of them.
        let st = unsafe { MmapedSafetensors::multi(&dir.weight_files)? };
        let mut varmap = varmap;
        let names: Vec<String> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let t = st.load(&name, dev)?.to_dtype(DType::F32)?;
            varmap.set_one(&name, &t)?;
        }
        Ok(Self { model, varmap })
    }

    /// Named variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Current weights as named tensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Replaces the weights with `tensors` (e.g. from a checkpoint).
    pub fn set_tensors(&mut self, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        for (name, _) in self.vars() {
            let t = tensors
                .get(&name)
                .ok_or_else(|| crate::TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    what: format!("tensor {name} is missing"),
                })?;
            self.varmap.set_one(&name, t)?;
        }
        Ok(())
    }
}

/// Writes `tensors` as a safetensors file (format "pt", names sorted) atomically.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    if let Err(e) = safetensors::tensor::serialize_to_file(sorted, Some(meta), &tmp) {
        let _ = std::fs::remove_file(&tmp); // a full disk must not leave a partial file behind
        return Err(crate::TrainError::Checkpoint {
            path: tmp,
            what: format!("cannot write: {e}"),
        });
    }
    std::fs::rename(&tmp, path).map_err(io(path, "cannot rename into place"))?;
    Ok(())
}
