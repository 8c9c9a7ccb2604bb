//! Small random models for tests, here and in the crates that quantize or train them: a config
//! with TinyLlama's head dim and grouped heads, reproducible random weights, and a model whose
//! weights are trainable variables.

use crate::custom_op::lcg_tensor;
use crate::{Llama, LlamaConfig};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// TinyLlama's head dim (64) with grouped heads, small: 2 layers, hidden 256, 4 heads on 2 kv
/// heads, vocabulary 96.
pub fn small_gqa_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        vocab_size: 96,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Reproducible random weights for `cfg`, named as in a checkpoint, on the CPU in f64: norms in
/// `[0.8, 1.2)`, everything else in `[-0.08, 0.08)`.
pub fn random_weights(cfg: &LlamaConfig) -> Result<Vec<(String, Tensor)>> {
    cfg.expected_tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let (lo, hi) = if name.ends_with("norm.weight") {
                (0.8, 1.2)
            } else {
                (-0.08, 0.08)
            };
            Ok((name, lcg_tensor(&shape, 7 + i as u64, lo, hi)?))
        })
        .collect()
}

/// A model of `cfg` on `dev` that reads [`random_weights`] from f32 variables, as qat-train's
/// student reads its weights from a `VarMap`; the variables, sorted by name.
pub fn trainable_random_model(
    cfg: &LlamaConfig,
    dev: &Device,
) -> Result<(Llama, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    let model = Llama::load(VarBuilder::from_varmap(&varmap, DType::F32, dev), cfg)?;
    let mut varmap = varmap;
    for (name, t) in random_weights(cfg)? {
        varmap.set_one(&name, &t.to_dtype(DType::F32)?.to_device(dev)?)?;
    }
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((model, vars))
}

/// A training pass of `model` over `tokens: [b, t]`: the loss `Σ logits · w` (`w` fixed random
/// weights in `[-1, 1)`, seeded by `seed`), and the gradients of every block's linear weights
/// among `vars` (what QAT trains), by name order, on the host in f32.
pub fn loss_and_linear_gradients(
    model: &Llama,
    vars: &[(String, Var)],
    tokens: &Tensor,
    seed: u64,
) -> Result<(f32, Vec<Tensor>)> {
    let logits = model.forward_full(tokens)?; // [b, t, vocab]
    let w = lcg_tensor(logits.dims(), seed, -1.0, 1.0)?
        .to_dtype(DType::F32)?
        .to_device(tokens.device())?;
    let loss = (logits.to_dtype(DType::F32)? * w)?.sum_all()?;
    let grads = loss.backward()?;
    let linear = vars
        .iter()
        .filter(|(name, _)| name.ends_with("_proj.weight"))
        .map(|(name, var)| {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            g.to_dtype(DType::F32)?.to_device(&Device::Cpu)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?, linear))
}

/// The first CUDA device, opened as the tools open it ([`crate::parse_device`], with its
/// allocation settings), for the tests that compare a kernel on the GPU with the CPU; `None`,
/// after saying the test is skipped, on a machine without one or in a CPU-only build.
pub fn cuda_or_skip() -> Option<Device> {
    match crate::parse_device("cuda:0") {
        Ok(gpu) => Some(gpu),
        Err(_) => {
            eprintln!("no CUDA device (or a CPU-only build): skipped");
            None
        }
    }
}
