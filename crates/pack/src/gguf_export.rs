//! [`export_gguf`]: a student whose weight grids are llama.cpp's block formats (`q4_0`, `q4_1`,
//! `q8_0`), symmetric per channel (LLM-QAT's, any bits: `Q4_0` / `Q8_0` blocks that all carry
//! the row's scale), or unquantized in, one GGUF file that llama.cpp loads unchanged out
//! (`formats/gguf.md`). The export is lossless: llama.cpp dequantizes every weight to exactly
//! the student's fake-quantized value (unless [`GgufOptions::float_type`] asks for F16 or BF16
//! embeddings and unquantized layers, [`crate::gguf_float`], which the summary reports).
//!
//! Metadata and tensor names follow llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`;
//! like it, the rows of `q_proj` / `k_proj` are permuted from Hugging Face's rotate-half RoPE
//! order to the interleaved order llama.cpp's RoPE expects ([`permute_rows`]); whole rows move,
//! so block quantization along the inputs is unchanged.

use crate::error::{OutOfRange, PackError, Result};
use crate::gguf::{self, Tensor, TYPE_F32};
use crate::gguf_float::{encode, f32_bytes, FloatType};
use crate::gguf_meta::metadata;
use crate::pack::TOOL;
use crate::vocab::Vocab;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use qat_model::{sha256_files, LinearId, LinearKind, ModelDir};
use qat_quant::ggml::BLOCK;
use qat_quant::{
    quantize_codes, sym_channel_blocks, sym_channel_type, Scheme, WeightFormat, SCHEME_FILE,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Options of [`export_gguf`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufOptions {
    /// Export even if the scheme quantizes activations or the KV cache (llama.cpp will not:
    /// the file then runs the weights without them). Off: such a scheme is refused.
    pub drop_act_kv: bool,
    /// How to store the embeddings, the output layer and the linear layers that the scheme
    /// leaves unquantized (norms are always F32, as in llama.cpp's conversions, and so are
    /// per-channel layers written as their fake-quantized values).
    pub float_type: FloatType,
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GgufSummary {
    pub file: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// Linear layers stored in a GGUF block format, and their weights (`Σ out · in`).
    pub quantized_layers: usize,
    pub quantized_weights: u64,
    /// Bytes of their blocks.
    pub quantized_bytes: u64,
    /// `8 · quantized_bytes / quantized_weights` (q4_0: 4.5, q4_1: 5, q8_0: 8.5).
    pub bits_per_weight: f64,
    /// Linear layers stored F32: unquantized by the scheme (with `float_type` F32), or
    /// per-channel ones in `dequantized`.
    pub f32_layers: usize,
    /// The type of the embeddings, the output layer and the unquantized linear layers.
    pub float_type: FloatType,
    /// Linear layers the scheme leaves unquantized, stored as `float_type`.
    pub float_layers: usize,
    /// Tensors stored as `float_type` (those layers, the embeddings, the output layer).
    pub float_tensors: usize,
    /// Tensors whose values `float_type` rounded, one line each (empty for F32).
    pub rounded: Vec<String>,
    /// Quantized layers per GGUF type, e.g. `{"Q4_0": 30}`.
    pub types: std::collections::BTreeMap<String, usize>,
    pub vocab_source: &'static str,
    /// The tokenizer collapses runs of spaces (SentencePiece's `remove_extra_whitespaces`),
    /// which llama.cpp's `llama` tokenizer does not: text with them tokenizes differently there.
    pub remove_extra_whitespaces: bool,
    /// Activation / KV quantizers that llama.cpp does not run (only with `drop_act_kv`).
    pub dropped: Vec<String>,
    /// Per-channel layers whose inputs are not a multiple of 32 (no block fits): stored F32,
    /// their fake-quantized values (exact, not compressed), one line each.
    pub dequantized: Vec<String>,
    pub scheme: String,
    pub sha256: String,
    pub source_weights_sha256: String,
    pub tool: String,
}

/// The GGUF tensor name of linear layer `id`.
fn linear_name(id: LinearId) -> String {
    let part = match id.kind {
        LinearKind::Q => "attn_q",
        LinearKind::K => "attn_k",
        LinearKind::V => "attn_v",
        LinearKind::O => "attn_output",
        LinearKind::Gate => "ffn_gate",
        LinearKind::Up => "ffn_up",
        LinearKind::Down => "ffn_down",
    };
    format!("blk.{}.{part}.weight", id.layer)
}

/// Rows of a `[heads · head_dim, in]` q/k weight in llama.cpp's order: within each head, row
/// `2i + s` of the result is row `s · head_dim/2 + i` of the input (`convert_hf_to_gguf.py`'s
/// `LlamaModel.permute`, for rotate-half → interleaved RoPE).
pub fn permute_rows(w: &[f32], heads: usize, in_features: usize) -> Vec<f32> {
    let rows = w.len() / in_features;
    let (hd, half) = (rows / heads, rows / heads / 2);
    let mut out = Vec::with_capacity(w.len());
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let r = h * hd + s * half + i;
                out.extend_from_slice(&w[r * in_features..(r + 1) * in_features]);
            }
        }
    }
    out
}

/// Refuses what llama.cpp would not run as trained: a weight grid that is not a GGUF block
/// format, activation or KV quantization (unless `drop_act_kv`), RoPE scaling. Returns the
/// quantizers dropped.
fn check_scheme(
    scheme: &Scheme,
    dir: &ModelDir,
    path: &Path,
    opts: GgufOptions,
) -> Result<Vec<String>> {
    let refuse = |what: String| PackError::Scheme {
        path: path.to_path_buf(),
        what,
        source: None,
    };
    let cfg = &dir.config;
    let mut dropped = Vec::new();
    for layer in 0..cfg.num_layers {
        for kind in LinearKind::ALL {
            let id = LinearId { layer, kind };
            let lq = scheme.resolve(id);
            if let Some(wq) = lq.weight {
                if !matches!(
                    wq.format,
                    WeightFormat::Ggml(_) | WeightFormat::SymPerChannel
                ) {
                    return Err(refuse(format!(
                        "{id}: weight format {} ({} bits) is not a GGUF block format \
                         (expected q4_0, q4_1, q8_0 or sym_per_channel, or null for F32); pack it with --format packed",
                        wq.format, wq.bits
                    )));
                }
            }
            if let Some(a) = lq.act {
                if !opts.drop_act_kv {
                    return Err(refuse(format!(
                        "{id}: activations quantized to {} bits, which llama.cpp does not reproduce \
                         (use a weight-only scheme, or --drop-act-kv to export the weights anyway)",
                        a.bits
                    )));
                }
                dropped.push(format!("{id}: act {} bits", a.bits));
            }
        }
    }
    if let Some(kv) = scheme.kv {
        if !opts.drop_act_kv {
            return Err(refuse(format!(
                "KV cache quantized to {} bits, which llama.cpp does not reproduce \
                 (use a weight-only scheme, or --drop-act-kv to export the weights anyway)",
                kv.bits
            )));
        }
        dropped.push(format!("kv {} bits", kv.bits));
    }
    if !dir.config_json["rope_scaling"].is_null() {
        return Err(PackError::Scheme {
            path: dir.dir.join("config.json"),
            what: "rope_scaling is set; the GGUF export writes plain RoPE only".into(),
            source: None,
        });
    }
    Ok(dropped)
}

fn f32_tensor(name: String, dims: Vec<u64>, v: &[f32]) -> Tensor {
    Tensor {
        name,
        dims,
        ggml_type: TYPE_F32,
        data: f32_bytes(v),
    }
}

/// `values` of the student's tensor `hf_name` as the GGUF tensor `name` (`dims` with `ne0`, the
/// row length, first) in `summary.float_type`, counted in `summary`; an error names the value
/// that F16 cannot hold.
fn float_tensor(
    name: String,
    hf_name: &str,
    dims: Vec<u64>,
    values: &[f32],
    student: &Path,
    summary: &mut GgufSummary,
) -> Result<Tensor> {
    let ty = summary.float_type;
    let (data, rounding) = encode(values, ty).map_err(|i| {
        let row_len = dims[0] as usize;
        PackError::OutOfRange(Box::new(OutOfRange {
            path: student.to_path_buf(),
            name: format!("{name} ({hf_name})"),
            what: "value for F16",
            row: i / row_len,
            index_name: "column",
            index: i % row_len,
            found: values[i].to_string(),
            expected: "|x| < 65520, F16's range (export with --gguf-float bf16 or f32)".into(),
        }))
    })?;
    summary.float_tensors += 1;
    if rounding.changed > 0 {
        summary.rounded.push(format!(
            "{name}: {} of {} values rounded to {ty} (largest relative change {:.1e})",
            rounding.changed,
            values.len(),
            rounding.max_relative
        ));
    }
    Ok(Tensor {
        name,
        dims,
        ggml_type: ty.type_id(),
        data,
    })
}

/// Exports the student in `student` as the GGUF file `out` (which must not exist).
pub fn export_gguf(student: &Path, out: &Path, opts: GgufOptions) -> Result<GgufSummary> {
    if out.exists() {
        return Err(PackError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let dir = ModelDir::open(student)?;
    let scheme_path = student.join(SCHEME_FILE);
    let scheme = Scheme::load(&scheme_path).map_err(|e| PackError::Scheme {
        path: scheme_path.clone(),
        what: "missing or invalid (a student directory has one)".into(),
        source: Some(Box::new(e)),
    })?;
    scheme
        .validate_for(&dir.config)
        .map_err(|e| PackError::Scheme {
            path: scheme_path.clone(),
            what: "the scheme does not fit the model".into(),
            source: Some(Box::new(e)),
        })?;
    let dropped = check_scheme(&scheme, &dir, &scheme_path, opts)?;
    let vocab = Vocab::load(student)?;
    let cfg = &dir.config;
    if vocab.tokens.len() != cfg.vocab_size {
        return Err(PackError::Tokenizer {
            path: student.join(vocab.source),
            what: format!(
                "{} tokens, expected vocab_size {} (config.json)",
                vocab.tokens.len(),
                cfg.vocab_size
            ),
        });
    }
    let source_weights_sha256 = dir.weights_sha256()?;
    // SAFETY: the student's weight files are mapped read-only while we copy out of them.
    let st = unsafe { MmapedSafetensors::multi(&dir.weight_files)? };
    let load = |name: &str| -> Result<Vec<f32>> {
        Ok(st
            .load(name, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let (h, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let mut summary = GgufSummary {
        file: out.to_path_buf(),
        vocab_source: vocab.source,
        remove_extra_whitespaces: vocab.remove_extra_whitespaces,
        dropped,
        scheme: scheme.to_string(),
        source_weights_sha256,
        tool: TOOL.to_string(),
        float_type: opts.float_type,
        ..Default::default()
    };
    let mut tensors = vec![float_tensor(
        "token_embd.weight".into(),
        "model.embed_tokens.weight",
        vec![h, v],
        &load("model.embed_tokens.weight")?,
        student,
        &mut summary,
    )?];
    for layer in 0..cfg.num_layers {
        let norm = |n: &str| format!("model.layers.{layer}.{n}.weight");
        tensors.push(f32_tensor(
            format!("blk.{layer}.attn_norm.weight"),
            vec![h],
            &load(&norm("input_layernorm"))?,
        ));
        tensors.push(f32_tensor(
            format!("blk.{layer}.ffn_norm.weight"),
            vec![h],
            &load(&norm("post_attention_layernorm"))?,
        ));
        for kind in LinearKind::ALL {
            let id = LinearId { layer, kind };
            let (o, i) = qat_quant::linear_shape(cfg, kind);
            let mut w = load(&id.weight_key())?;
            match kind {
                LinearKind::Q => w = permute_rows(&w, cfg.num_heads, i),
                LinearKind::K => w = permute_rows(&w, cfg.num_kv_heads, i),
                _ => {}
            }
            let dims = vec![i as u64, o as u64];
            let mut dequantized = false;
            let blocks = match scheme.resolve(id).weight {
                Some(wq) => match wq.format {
                    WeightFormat::Ggml(t) => Some((t, t.quantize_rows(&w))),
                    WeightFormat::SymPerChannel => {
                        let t = candle_core::Tensor::from_slice(&w, (o, i), &Device::Cpu)?;
                        let codes = quantize_codes(&t, &wq)?;
                        if i % BLOCK == 0 {
                            let t = sym_channel_type(wq.bits);
                            Some((t, sym_channel_blocks(&codes, wq.bits)?))
                        } else {
                            summary.dequantized.push(format!(
                                "{id}: {i} inputs are not a multiple of {BLOCK}: F32 of its {}-bit \
                                 fake-quantized values",
                                wq.bits
                            ));
                            w = codes.dequantize(&wq)?;
                            dequantized = true;
                            None
                        }
                    }
                    other => unreachable!("refused by check_scheme: {other}"),
                },
                None => None,
            };
            match blocks {
                Some((t, data)) => {
                    summary.quantized_layers += 1;
                    summary.quantized_weights += (o * i) as u64;
                    summary.quantized_bytes += data.len() as u64;
                    *summary.types.entry(t.name().to_uppercase()).or_default() += 1;
                    tensors.push(Tensor {
                        name: linear_name(id),
                        dims,
                        ggml_type: t.type_id(),
                        data,
                    });
                }
                None if dequantized => {
                    summary.f32_layers += 1;
                    tensors.push(f32_tensor(linear_name(id), dims, &w));
                }
                None => {
                    summary.float_layers += 1;
                    if summary.float_type == FloatType::F32 {
                        summary.f32_layers += 1;
                    }
                    let t = float_tensor(
                        linear_name(id),
                        &id.weight_key(),
                        dims,
                        &w,
                        student,
                        &mut summary,
                    )?;
                    tensors.push(t);
                }
            }
        }
    }
    tensors.push(f32_tensor(
        "output_norm.weight".into(),
        vec![h],
        &load("model.norm.weight")?,
    ));
    if !cfg.tie_word_embeddings {
        let t = float_tensor(
            "output.weight".into(),
            "lm_head.weight",
            vec![h, v],
            &load("lm_head.weight")?,
            student,
            &mut summary,
        )?;
        tensors.push(t);
    }
    if summary.quantized_weights > 0 {
        summary.bits_per_weight =
            8.0 * summary.quantized_bytes as f64 / summary.quantized_weights as f64;
    }
    let kvs = metadata(cfg, &vocab, &scheme, &summary, &dir);
    summary.tensors = tensors.len();
    summary.bytes = gguf::write(out, &kvs, &tensors)?;
    summary.sha256 = sha256_files(&[out.to_path_buf()])?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_interleaves_the_two_halves_of_each_head() {
        // 2 heads of head_dim 4, in_features 1: rows [a0 a1 b0 b1 | c0 c1 d0 d1] with halves
        // (a, b) → [a0 b0 a1 b1 | c0 d0 c1 d1] (convert_hf_to_gguf: reshape (heads, 2, hd/2),
        // swap the last two axes).
        let w = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0];
        assert_eq!(
            permute_rows(&w, 2, 1),
            [0.0, 10.0, 1.0, 11.0, 20.0, 30.0, 21.0, 31.0]
        );
        // Whole rows move (in_features 2).
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect(); // rows [0,1] [2,3] [4,5] [6,7]
        assert_eq!(
            permute_rows(&w, 1, 2),
            [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]
        );
    }
}
