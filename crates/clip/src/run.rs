//! The `qat-clip` stage: model dir + shard set + scheme → a model dir whose weights are clamped
//! to the searched per-group ranges, with the scheme, provenance and a per-layer report.
//!
//! Blocks are processed in order, as BitDistiller's `run_clip` does: the inputs of block `l` are
//! computed by the full-precision model whose blocks `0..l` are already clipped. Like the
//! reference, the hidden states of the calibration sequences are carried from block to block
//! (each block runs twice: once to capture its inputs, once clipped to make the next block's),
//! instead of running the whole model again for every block. The model and the whole search
//! (clamping, fake quantization, error matmuls, the running best per group) run on the chosen
//! device; only the calibration inputs' Gram matrices are built on the CPU, once per layer. The
//! output directory is written under `<out>.partial/` and renamed into place at the end.

use crate::calib::{block_inputs, calibration_sequences, embeddings, forward_blocks};
use crate::error::{io, ClipError, Result};
use crate::progress::Progress;
use crate::search::search_layer;
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use candle_nn::VarBuilder;
use indicatif::{ProgressBar, ProgressDrawTarget};
use qat_model::{LinearId, LinearKind, Llama, ModelDir};
use qat_quant::{fake::fake_weight, Scheme};
use qat_shards::ShardSet;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const TOOL: &str = concat!("qat-clip ", env!("CARGO_PKG_VERSION"));

/// What to clip and how.
#[derive(Debug, Clone, Serialize)]
pub struct ClipConfig {
    pub model: PathBuf,
    pub shards: PathBuf,
    pub out: PathBuf,
    pub scheme: Scheme,
    /// Calibration sequences taken from the shard set (the first N by sequence id).
    pub calib_sequences: usize,
    /// Tokens kept from each calibration sequence.
    pub calib_len: usize,
    /// Rows of layer inputs used per layer (strided subsample; BitDistiller: 512).
    pub calib_tokens: usize,
    /// Also clip q_proj and k_proj (skipped by default, as in BitDistiller: q·kᵀ is hard to
    /// clip for).
    pub include_qk: bool,
    /// Device the model and the search run on: cpu, cuda or cuda:N.
    pub device: String,
    #[serde(skip)]
    pub quiet: bool,
}

/// The outcome for one linear layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    pub layer: String,
    pub group_size: usize,
    pub tokens: usize,
    pub mse_before: f64,
    pub mse_after: f64,
    /// `1 - mse_after / mse_before`.
    pub reduction: f64,
    /// Fraction of groups whose range was shrunk.
    pub clipped_groups: f64,
}

/// The JSON summary of a run (also stored in the output's `provenance.json`).
#[derive(Debug, Clone, Serialize)]
pub struct ClipSummary {
    pub out: String,
    pub scheme: String,
    pub layers: Vec<LayerReport>,
    /// Mean over clipped layers of `reduction`.
    pub mean_reduction: f64,
    /// Blocks taken from an interrupted run's progress directory instead of searched again.
    pub resumed_blocks: usize,
    pub seconds: f64,
}

fn load_tensors(dir: &ModelDir, dev: &Device) -> Result<HashMap<String, Tensor>> {
    // SAFETY: the weight files are mapped read-only while we copy out of them.
    let st = unsafe { MmapedSafetensors::multi(&dir.weight_files)? };
    let mut out = HashMap::new();
    for (name, _) in st.tensors() {
        out.insert(name.clone(), st.load(&name, dev)?.to_dtype(DType::F32)?);
    }
    Ok(out)
}

fn check_shards(cfg: &ClipConfig, set: &ShardSet, dir: &ModelDir) -> Result<()> {
    match set
        .header()
        .teacher_mismatch(&dir.tokenizer_sha256()?, dir.config.vocab_size)
    {
        Some(what) => Err(ClipError::Mismatch {
            shards: cfg.shards.clone(),
            model: cfg.model.clone(),
            what,
        }),
        None => Ok(()),
    }
}

/// Runs the clipping search over every quantized linear layer and writes the clipped model.
pub fn run(cfg: &ClipConfig) -> Result<ClipSummary> {
    let started = Instant::now();
    if cfg.calib_sequences == 0 || cfg.calib_len < 2 || cfg.calib_tokens == 0 {
        return Err(ClipError::Config(format!(
            "calibration needs at least one sequence of >= 2 tokens and >= 1 token per layer (got {} sequences, length {}, {} tokens)",
            cfg.calib_sequences, cfg.calib_len, cfg.calib_tokens
        )));
    }
    let dev = qat_model::parse_device(&cfg.device).map_err(ClipError::Config)?;
    let dir = ModelDir::open(&cfg.model)?;
    cfg.scheme.validate_for(&dir.config)?;
    let set = ShardSet::open(&cfg.shards)?;
    check_shards(cfg, &set, &dir)?;
    let sequences = calibration_sequences(&set, cfg.calib_sequences, cfg.calib_len)?;
    let (init_sha, shards_sha) = (dir.weights_sha256()?, set.manifests_sha256()?);
    // The resolved config: `cuda` and `cuda:0` are one device.
    let mut config = serde_json::to_value(cfg).expect("json");
    config["device"] = qat_model::device_name(&dev).into();
    let key = serde_json::json!({
        "tool": TOOL,
        "config": config,
        "init_weights_sha256": init_sha,
        "shards_manifest_sha256": shards_sha,
    });
    let progress = Progress::new(
        &cfg.out,
        hex::encode(Sha256::digest(key.to_string().as_bytes())),
    );
    let mut tensors = load_tensors(&dir, &dev)?;
    // An interrupted run of this search: its clipped blocks are not searched again.
    let (start, mut layers) = match progress.load(&dev)? {
        Some(done) => {
            tensors.extend(done.tensors);
            (done.blocks, done.layers)
        }
        None => (0, Vec::new()),
    };
    let n = dir.config.num_layers as u64;
    let bar = if cfg.quiet {
        ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(n)
    };
    bar.set_message("blocks clipped");
    bar.set_position(start as u64);
    let load = |tensors: &HashMap<String, Tensor>| {
        Llama::load(
            VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev),
            &dir.config,
        )
    };
    // The inputs of the first block to search: the embeddings through the blocks already done.
    let model = load(&tensors)?;
    let mut hidden = forward_blocks(&model, &embeddings(&model, &sequences)?, 0..start)?;
    drop(model);
    for layer in start..dir.config.num_layers {
        let inputs = block_inputs(&load(&tensors)?, &hidden, layer, cfg.calib_tokens)?;
        let mut clipped = HashMap::new();
        for kind in LinearKind::ALL {
            let skip_qk = matches!(kind, LinearKind::Q | LinearKind::K) && !cfg.include_qk;
            let id = LinearId { layer, kind };
            let Some(wq) = cfg.scheme.resolve(id).weight else {
                continue;
            };
            if skip_qk {
                continue;
            }
            let key = id.weight_key();
            let w = &tensors[&key];
            let in_f = w.dim(1)?;
            let group = wq
                .format
                .group_len(in_f)
                .map_err(|e| ClipError::Config(format!("{id}: {e}")))?;
            let x = &inputs[&kind];
            let fq = |w: &Tensor| -> Result<Tensor> { Ok(fake_weight(w, &wq)?) };
            let clip = search_layer(w, &x.data, group, &dev, &fq)?;
            let w = clip.apply(w, group)?;
            clipped.insert(key.clone(), w.clone());
            tensors.insert(key, w);
            let reduction = if clip.mse_before > 0.0 {
                1.0 - clip.mse_after / clip.mse_before
            } else {
                0.0
            };
            layers.push(LayerReport {
                layer: id.to_string(),
                group_size: group,
                tokens: x.rows,
                mse_before: clip.mse_before,
                mse_after: clip.mse_after,
                reduction,
                clipped_groups: clip.clipped_fraction(),
            });
        }
        progress.save_block(layer, &clipped, &layers)?;
        // The clipped block makes the next block's inputs.
        if layer + 1 < dir.config.num_layers {
            hidden = forward_blocks(&load(&tensors)?, &hidden, layer..layer + 1)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean_reduction =
        layers.iter().map(|l| l.reduction).sum::<f64>() / layers.len().max(1) as f64;
    let summary = ClipSummary {
        out: cfg.out.display().to_string(),
        scheme: cfg.scheme.short_name().unwrap_or_else(|| "custom".into()),
        layers,
        mean_reduction,
        resumed_blocks: start,
        seconds: started.elapsed().as_secs_f64(),
    };
    let provenance = serde_json::json!({
        "tool": TOOL,
        "config": config,
        "init_weights_sha256": init_sha,
        "model_hub": qat_model::snapshot_source(&dir.dir),
        "shards_manifest_sha256": shards_sha,
        "report": summary,
    });
    write_output(cfg, &dir, &tensors, &provenance)?;
    progress.remove();
    Ok(summary)
}

fn write_output(
    cfg: &ClipConfig,
    dir: &ModelDir,
    tensors: &HashMap<String, Tensor>,
    provenance: &serde_json::Value,
) -> Result<()> {
    let staging = PathBuf::from(format!("{}.partial", cfg.out.display()));
    let _ = std::fs::remove_dir_all(&staging);
    let written = write_staging(cfg, dir, tensors, provenance, &staging);
    if written.is_err() {
        // Nothing half written stays behind (e.g. a full disk).
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

fn write_staging(
    cfg: &ClipConfig,
    dir: &ModelDir,
    tensors: &HashMap<String, Tensor>,
    provenance: &serde_json::Value,
    staging: &Path,
) -> Result<()> {
    std::fs::create_dir_all(staging).map_err(io(staging, "cannot create"))?;
    qat_train::student::save_safetensors(tensors, &staging.join("model.safetensors"))?;
    dir.copy_companions(staging)?;
    cfg.scheme.save(staging.join(qat_quant::SCHEME_FILE))?;
    let prov = staging.join("provenance.json");
    std::fs::write(
        &prov,
        serde_json::to_string_pretty(provenance).expect("json") + "\n",
    )
    .map_err(io(&prov, "cannot write"))?;
    if cfg.out.exists() {
        std::fs::remove_dir_all(&cfg.out).map_err(io(&cfg.out, "cannot replace"))?;
    }
    std::fs::rename(staging, &cfg.out)
        .map_err(io(&cfg.out, "cannot move the clipped model into place"))?;
    Ok(())
}
