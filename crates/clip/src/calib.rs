//! Calibration activations: the inputs of one decoder block's linear layers, captured through the
//! model's quantization hooks while it runs on token sequences from a shard set.

use crate::error::Result;
use candle_core::Tensor;
use qat_model::{LinearId, LinearKind, Llama, QuantHooks};
use qat_shards::ShardSet;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Hooks that record (and do not change) the inputs of the linear layers of one block.
#[derive(Debug)]
struct CaptureInputs {
    layer: usize,
    seen: Mutex<BTreeMap<LinearKind, Vec<Tensor>>>,
}

impl QuantHooks for CaptureInputs {
    fn activation(&self, id: LinearId, x: &Tensor) -> candle_core::Result<Tensor> {
        if id.layer == self.layer {
            let mut seen = self.seen.lock().expect("capture lock");
            seen.entry(id.kind).or_default().push(x.detach());
        }
        Ok(x.clone())
    }
}

/// The first `n` sequences of `set` (in sequence-id order), each cut to at most `max_len` tokens.
pub fn calibration_sequences(set: &ShardSet, n: usize, max_len: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(n);
    for rec in set.records().take(n) {
        let mut tokens = rec?.tokens;
        tokens.truncate(max_len);
        out.push(tokens);
    }
    Ok(out)
}

/// Inputs of one linear layer: `[rows, in_features]` row-major.
#[derive(Debug, Clone)]
pub struct LayerInputs {
    pub rows: usize,
    pub in_features: usize,
    pub data: Vec<f32>,
}

/// The inputs of block 0 for each sequence: its token embeddings, `[1, t, hidden]`.
pub fn embeddings(model: &Llama, sequences: &[Vec<u32>]) -> Result<Vec<Tensor>> {
    sequences
        .iter()
        .map(|seq| Ok(model.embed(&Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?)?))
        .collect()
}

/// Runs blocks `blocks` of `model` on each of `hidden` (the inputs of block `blocks.start`,
/// `[1, t, hidden]`, each with a cache of its own) and returns their outputs: the inputs of
/// block `blocks.end`.
pub fn forward_blocks(
    model: &Llama,
    hidden: &[Tensor],
    blocks: Range<usize>,
) -> Result<Vec<Tensor>> {
    hidden
        .iter()
        .map(|x| {
            let mut cache = model.new_cache(vec![0]);
            Ok(model.forward_blocks(x.clone(), blocks.clone(), &mut cache)?)
        })
        .collect()
}

/// Runs block `layer` of `model` (full precision) on `hidden`, its input for each sequence
/// (`[1, t, hidden]`), and returns the inputs of each of its linear layers at every position,
/// subsampled with stride `max(1, total / max_tokens)` (BitDistiller's
/// `input_feat[:, 0::n // n_sample_token]`).
pub fn block_inputs(
    model: &Llama,
    hidden: &[Tensor],
    layer: usize,
    max_tokens: usize,
) -> Result<BTreeMap<LinearKind, LayerInputs>> {
    let capture = Arc::new(CaptureInputs {
        layer,
        seen: Mutex::new(BTreeMap::new()),
    });
    let mut model = model.clone();
    model.set_hooks(capture.clone());
    forward_blocks(&model, hidden, layer..layer + 1)?;
    drop(model);
    let seen = std::mem::take(&mut *capture.seen.lock().expect("capture lock"));
    let mut out = BTreeMap::new();
    for (kind, parts) in seen {
        let in_features = parts[0].dims().last().copied().unwrap_or(0);
        let mut all = Vec::new();
        for p in parts {
            all.extend(
                p.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        let total = all.len() / in_features;
        let stride = (total / max_tokens.max(1)).max(1);
        let mut data = Vec::with_capacity((total / stride + 1) * in_features);
        for row in (0..total).step_by(stride) {
            data.extend_from_slice(&all[row * in_features..(row + 1) * in_features]);
        }
        out.insert(
            kind,
            LayerInputs {
                rows: data.len() / in_features,
                in_features,
                data,
            },
        );
    }
    Ok(out)
}
