//! A Hugging Face Llama model directory: config.json, safetensors weights, tokenizer.json.

use crate::config::{LlamaConfig, LlamaConfigFile};
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A validated model directory. Opening it checks that every tensor the config implies exists
/// with the right shape and a float dtype, without loading any weights.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    /// config.json exactly as parsed (recorded in provenance).
    pub config_json: serde_json::Value,
    /// Weight files in the order the index lists them (or the single model.safetensors).
    pub weight_files: Vec<PathBuf>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The files of a model directory besides its weights that a model derived from it (a clipped,
/// trained or packed student) carries over unchanged, when present (`config.json` always is).
pub const COMPANION_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Streaming sha256 of one or more files concatenated in order, as lowercase hex.
pub fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in paths {
        let mut f = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        loop {
            let n = f.read(&mut buf).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

impl ModelDir {
    /// Opens and validates `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(ModelError::NotAModelDir {
                path: dir,
                what: "no such directory".into(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::NotAModelDir {
                path: dir,
                what: "config.json is missing".into(),
            });
        }
        let config_json = read_json(&config_path)?;
        let file: LlamaConfigFile =
            serde_json::from_value(config_json.clone()).map_err(|source| ModelError::Json {
                path: config_path.clone(),
                source,
            })?;
        let config = file.resolve(&config_path)?;
        let weight_files = Self::find_weight_files(&dir)?;
        let me = Self {
            dir,
            config,
            config_json,
            weight_files,
        };
        me.check_tensors()?;
        Ok(me)
    }

    fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(ModelError::NotAModelDir {
                path: dir.to_path_buf(),
                what: "neither model.safetensors nor model.safetensors.index.json is present"
                    .into(),
            });
        }
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::InvalidWeights {
                path: index_path.clone(),
                what: "no \"weight_map\" object".into(),
            })?;
        let mut files = Vec::new();
        let mut seen = BTreeSet::new();
        for name in map.values() {
            let name = name.as_str().ok_or_else(|| ModelError::InvalidWeights {
                path: index_path.clone(),
                what: format!("weight_map value {name} is not a file name"),
            })?;
            if seen.insert(name.to_string()) {
                files.push(dir.join(name));
            }
        }
        files.sort();
        Ok(files)
    }

    /// Checks names, shapes and dtypes of all tensors against the config (headers only).
    fn check_tensors(&self) -> Result<()> {
        let mut found: BTreeMap<String, (PathBuf, Vec<usize>, safetensors::Dtype)> =
            BTreeMap::new();
        for path in &self.weight_files {
            let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only and we only read while the map lives.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                ModelError::InvalidWeights {
                    path: path.clone(),
                    what: e.to_string(),
                }
            })?;
            for (name, view) in st.tensors() {
                found.insert(name, (path.clone(), view.shape().to_vec(), view.dtype()));
            }
        }
        for (name, expected) in self.config.expected_tensors() {
            let Some((path, shape, dtype)) = found.get(&name) else {
                return Err(ModelError::MissingTensor {
                    dir: self.dir.clone(),
                    name,
                });
            };
            if !matches!(
                dtype,
                safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
            ) {
                return Err(ModelError::WrongDtype {
                    path: path.clone(),
                    name,
                    actual: format!("{dtype:?}"),
                });
            }
            if *shape != expected {
                return Err(ModelError::WrongShape {
                    path: path.clone(),
                    name,
                    actual: shape.clone(),
                    expected,
                });
            }
        }
        Ok(())
    }

    /// Loads the model with weights converted to `dtype` on `device`.
    pub fn load(&self, device: &Device, dtype: DType) -> Result<Llama> {
        // SAFETY: weight files are memory-mapped read-only; they must not change while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.weight_files, dtype, device)? };
        Ok(Llama::load(vb, &self.config)?)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// Loads tokenizer.json and checks that its ids fit the model's vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.tokenizer_path();
        if !path.is_file() {
            return Err(ModelError::NotAModelDir {
                path: self.dir.clone(),
                what: "tokenizer.json is missing".into(),
            });
        }
        let tok = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let n = tok.get_vocab_size(true);
        if n > self.config.vocab_size {
            return Err(ModelError::Tokenizer {
                path,
                what: format!(
                    "vocabulary of {n} tokens does not fit config.json vocab_size {}",
                    self.config.vocab_size
                ),
            });
        }
        Ok(tok)
    }

    /// Copies this directory's [`COMPANION_FILES`] that exist into the directory `to`.
    pub fn copy_companions(&self, to: &Path) -> Result<()> {
        for name in COMPANION_FILES {
            let from = self.dir.join(name);
            if from.is_file() {
                let to = to.join(name);
                std::fs::copy(&from, &to).map_err(|source| ModelError::Copy {
                    from,
                    to,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// sha256 of the weight files' bytes, concatenated in `weight_files` order.
    pub fn weights_sha256(&self) -> Result<String> {
        sha256_files(&self.weight_files)
    }

    /// sha256 of tokenizer.json.
    pub fn tokenizer_sha256(&self) -> Result<String> {
        sha256_files(&[self.tokenizer_path()])
    }
}

/// Ids of the tokenizer's special tokens (e.g. `<unk>`, `<s>`, `</s>`), sorted.
pub fn special_token_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tok
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    ids
}
