//! Loading a packed model directory: every check of `formats/packed.md` section 6, then the
//! codes dequantized ([`qat_quant::dequantize_codes`]) into a [`Llama`] whose hooks apply only the
//! scheme's activation and KV quantizers (its weights are quantized already).

use crate::error::{PackError, Result};
use crate::layout::{plain_tensors, quantized_layers, PACKED_FILE};
use crate::meta::PackedMeta;
use crate::st::MappedFile;
use crate::unpack::read_layer;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use qat_model::{sha256_files, Llama, LlamaConfig, LlamaConfigFile, ModelError};
use qat_quant::{FakeQuant, Scheme, SCHEME_FILE};
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// A packed model directory, opened (config parsed, packed file present) but not yet loaded.
#[derive(Debug, Clone)]
pub struct PackedDir {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    /// `<dir>/model.packed.safetensors`.
    pub file: PathBuf,
}

/// Whether `dir` holds a packed model (a `model.packed.safetensors` file).
pub fn is_packed_dir(dir: &Path) -> bool {
    dir.join(PACKED_FILE).is_file()
}

/// The scheme a packed model runs under: `scheme` with every weight quantizer removed (the
/// weights are already quantized), activation and KV quantizers kept.
pub fn without_weight_quant(scheme: &Scheme) -> Scheme {
    let mut s = scheme.clone();
    s.weight = None;
    for o in &mut s.overrides {
        o.weight = None;
    }
    s
}

/// Loads `dir` onto `device`: see [`PackedDir::load`].
pub fn load_packed(dir: &Path, device: &Device) -> Result<(Llama, Scheme)> {
    PackedDir::open(dir)?.load(device)
}

impl PackedDir {
    /// Checks that `dir` has `config.json` (valid) and the packed file.
    pub fn open(dir: &Path) -> Result<Self> {
        let not = |what: String| PackError::NotPacked {
            path: dir.to_path_buf(),
            what,
        };
        if !dir.is_dir() {
            return Err(not("no such directory".into()));
        }
        let file = dir.join(PACKED_FILE);
        if !file.is_file() {
            return Err(not(format!("{PACKED_FILE} is missing")));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let cfg: LlamaConfigFile =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: config_path.clone(),
                source,
            })?;
        let config = cfg.resolve(&config_path)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            file,
        })
    }

    /// Loads `tokenizer.json` and checks that its ids fit the model's vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.dir.join("tokenizer.json");
        let bad = |what: String| ModelError::Tokenizer {
            path: path.clone(),
            what,
        };
        let tok = Tokenizer::from_file(&path).map_err(|e| bad(e.to_string()))?;
        let n = tok.get_vocab_size(true);
        if n > self.config.vocab_size {
            return Err(bad(format!(
                "vocabulary of {n} tokens does not fit config.json vocab_size {}",
                self.config.vocab_size
            ))
            .into());
        }
        Ok(tok)
    }

    /// sha256 of the packed file.
    pub fn sha256(&self) -> Result<String> {
        Ok(sha256_files(std::slice::from_ref(&self.file))?)
    }

    /// Validates the packed file (metadata, layer table against the scheme and config.json,
    /// tensor names, dtypes, shapes, code ranges), dequantizes it and builds the model (f32
    /// on `device`). The model's hooks apply the scheme's activation and KV quantizers only
    /// ([`without_weight_quant`]); the returned scheme is the whole one.
    pub fn load(&self, device: &Device) -> Result<(Llama, Scheme)> {
        let file = MappedFile::open(&self.file)?;
        let path = &self.file;
        let st = file.tensors()?;
        let meta = PackedMeta::from_metadata(file.metadata()?.as_ref(), path)?;
        self.check_scheme_file(&meta.scheme)?;
        let meta_err = |key, what: String| PackError::Metadata {
            path: path.clone(),
            key,
            what,
        };
        meta.scheme.validate_for(&self.config).map_err(|e| {
            meta_err(
                crate::meta::KEY_SCHEME,
                format!("does not fit config.json: {e}"),
            )
        })?;
        let layers = quantized_layers(&self.config, &meta.scheme)
            .map_err(|(l, what)| meta_err(crate::meta::KEY_SCHEME, format!("{l}: {what}")))?;
        let expected: Vec<_> = layers.iter().map(|l| l.entry.clone()).collect();
        if meta.layers != expected {
            let i = meta
                .layers
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(meta.layers.len().min(expected.len()));
            let show = |v: Option<&crate::layout::LayerEntry>| {
                v.map_or("nothing".to_string(), |e| {
                    serde_json::to_string(e).unwrap_or_default()
                })
            };
            return Err(meta_err(
                crate::meta::KEY_LAYERS,
                format!(
                    "disagrees with qat.scheme and config.json at entry {i}: found {}, expected {} ({} entries, expected {})",
                    show(meta.layers.get(i)),
                    show(expected.get(i)),
                    meta.layers.len(),
                    expected.len()
                ),
            ));
        }

        let mut weights: HashMap<String, Tensor> = HashMap::new();
        let mut known: HashSet<String> = HashSet::new();
        for (name, shape) in plain_tensors(&self.config, &layers) {
            let view = st.tensor(&name).map_err(|_| PackError::MissingTensor {
                path: path.clone(),
                name: name.clone(),
            })?;
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(PackError::Dtype {
                    path: path.clone(),
                    name,
                    found: format!("{:?}", view.dtype()),
                    expected: "F32, F16 or BF16".into(),
                });
            }
            if view.shape() != shape {
                return Err(PackError::Shape {
                    path: path.clone(),
                    name,
                    found: view.shape().to_vec(),
                    expected: shape,
                });
            }
            weights.insert(name.clone(), view.load(device)?.to_dtype(DType::F32)?);
            known.insert(name);
        }
        for l in &layers {
            let e = &l.entry;
            let codes = read_layer(&st, path, e)?;
            let values = codes.dequantize(&l.wq)?;
            weights.insert(
                l.id.weight_key(),
                Tensor::from_vec(values, (e.out_features, e.in_features), device)?,
            );
            known.extend([e.qweight_name(), e.scales_name()]);
            if e.has_zeros() {
                known.insert(e.zeros_name());
            }
        }
        let mut extra: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !known.contains(*n))
            .map(str::to_string)
            .collect();
        extra.sort();
        if let Some(name) = extra.into_iter().next() {
            let why = if name.ends_with(".weight") {
                "a quantized layer has no .weight"
            } else {
                "not part of the format"
            };
            return Err(PackError::UnexpectedTensor {
                path: path.clone(),
                name,
                why,
            });
        }

        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        let mut model = Llama::load(vb, &self.config)?;
        let run = without_weight_quant(&meta.scheme);
        if !run.is_full_precision() {
            model.set_hooks(Arc::new(FakeQuant::for_inference(run)));
        }
        Ok((model, meta.scheme))
    }

    /// `quant_scheme.json`, if present, must be the file's scheme.
    fn check_scheme_file(&self, scheme: &Scheme) -> Result<()> {
        let path = self.dir.join(SCHEME_FILE);
        if !path.is_file() {
            return Ok(());
        }
        let on_disk = Scheme::load(&path).map_err(|e| PackError::Scheme {
            path: path.clone(),
            what: "invalid scheme".into(),
            source: Some(Box::new(e)),
        })?;
        if &on_disk != scheme {
            return Err(PackError::Scheme {
                path,
                what: format!("differs from the packed file's qat.scheme: found {on_disk}, the file has {scheme}"),
                source: None,
            });
        }
        Ok(())
    }
}
