//! What `qat-eval` evaluates: a model directory in full precision or fake-quantized under a
//! scheme, or a packed model directory (`formats/packed.md`), whose weights are the real codes.

use crate::error::{EvalError, Result};
use candle_core::{DType, Device};
use qat_model::{Llama, LlamaConfig, ModelDir};
use qat_pack::{is_packed_dir, PackedDir};
use qat_quant::{FakeQuant, Scheme, SCHEME_FILE};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// How the evaluated model's weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// Full precision: no scheme, or `FP`.
    None,
    /// Fake quantization of an f32 model dir under a scheme (weights quantized on the fly).
    FakeQuant,
    /// A packed model dir: weights dequantized from their codes; only activation and KV
    /// quantizers run.
    Packed,
}

/// A model ready to evaluate, with what identifies it.
pub struct EvalModel {
    pub model: Llama,
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    /// The scheme in force (for a packed model, the one it was packed with).
    pub scheme: Scheme,
    pub quantization: Quantization,
    /// sha256 of the weight files (for a packed model, of its packed file).
    pub weights_sha256: String,
}

/// Loads `dir` for evaluation on `device` (f32).
///
/// A directory with `model.packed.safetensors` is a packed model: it runs under its own scheme,
/// and `scheme_arg` must be `None`. Otherwise the scheme is `scheme_arg` (a short name or JSON
/// file, `FP` for full precision), else the directory's `quant_scheme.json`, else none.
pub fn load_eval_model(dir: &Path, scheme_arg: Option<&str>, device: &Device) -> Result<EvalModel> {
    if is_packed_dir(dir) {
        if let Some(arg) = scheme_arg {
            return Err(EvalError::SchemeForPacked {
                dir: dir.to_path_buf(),
                arg: arg.to_string(),
            });
        }
        let packed = PackedDir::open(dir)?;
        let tokenizer = packed.tokenizer()?;
        let (model, scheme) = packed.load(device)?;
        let weights_sha256 = packed.sha256()?;
        return Ok(EvalModel {
            model,
            config: packed.config,
            tokenizer,
            scheme,
            quantization: Quantization::Packed,
            weights_sha256,
        });
    }
    let model_dir = ModelDir::open(dir)?;
    let tokenizer = model_dir.tokenizer()?;
    let mut model = model_dir
        .load(device, DType::F32)
        .map_err(|source| EvalError::Load {
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
    let scheme = match scheme_arg {
        Some(arg) => Scheme::from_arg(arg).map_err(|source| EvalError::SchemeArg { source })?,
        None if dir.join(SCHEME_FILE).is_file() => Scheme::load_from_dir(dir)?,
        None => Scheme::full_precision(),
    };
    scheme
        .validate_for(&model_dir.config)
        .map_err(|source| EvalError::SchemeFit {
            scheme: scheme.to_string(),
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
    let quantization = if scheme.is_full_precision() {
        Quantization::None
    } else {
        model.set_hooks(Arc::new(FakeQuant::for_inference(scheme.clone())));
        Quantization::FakeQuant
    };
    let weights_sha256 = model_dir.weights_sha256()?;
    Ok(EvalModel {
        model,
        config: model_dir.config,
        tokenizer,
        scheme,
        quantization,
        weights_sha256,
    })
}
