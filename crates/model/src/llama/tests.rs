//! Whole-model tests of the Llama decoder: fused and composed paths give the same logits and
//! gradients, on the CPU and (packed CUDA tests) on the GPU.

use super::self_attention::matmul_operand;
use super::*;
use crate::testing::{
    loss_and_linear_gradients, random_weights, small_gqa_config, trainable_random_model,
};
use crate::{CacheLayout, KvCache, ModelDir};
use candle_core::Device;

fn stories260k() -> Llama {
    let data = std::env::var_os("QAT_DATA").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
        std::path::PathBuf::from,
    );
    ModelDir::open(data.join("models/stories260K"))
        .expect("open stories260K")
        .load(&Device::Cpu, DType::F32)
        .expect("load stories260K")
}

/// The composed attention with its mask inside the softmax ([`causal_softmax`], CUDA's path,
/// here through the op's CPU side) gives the logits of the mask add and softmax: a
/// full-sequence forward (training's shape), and a left-padded batch's prefill and decoding
/// steps through a KV cache.
#[test]
fn masked_softmax_op_gives_the_mask_adds_logits() -> Result<()> {
    let mut model = stories260k();
    model.set_fused_attention(false);
    let run = |op: bool| -> Result<Vec<Tensor>> {
        crate::causal_softmax::tests::ON_CPU.set(op);
        let out = full_and_padded_decode_logits(&model);
        crate::causal_softmax::tests::ON_CPU.set(false);
        out
    };
    assert_same_logits(&run(false)?, &run(true)?, 1e-4)
}

/// The residual add + RMSNorm op (run on the CPU through its test switch) in place of the
/// composed add and candle's norm: the same logits to f32 rounding, for a full-sequence
/// forward and a left-padded prefill with decode steps.
#[test]
fn residual_add_op_gives_the_composed_logits() -> Result<()> {
    let model = stories260k();
    let run = |op: bool| -> Result<Vec<Tensor>> {
        crate::residual_add::tests::ON_CPU.set(op);
        let out = full_and_padded_decode_logits(&model);
        crate::residual_add::tests::ON_CPU.set(false);
        out
    };
    assert_same_logits(&run(false)?, &run(true)?, 1e-4)
}

/// Logits of stories260K-sized vocabularies for a full-sequence forward (2 x 12 tokens) and a
/// left-padded prefill (pads 0, 4, 7; 8 columns) followed by 4 decoding steps, on the CPU.
fn full_and_padded_decode_logits(model: &Llama) -> Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    let mut out = Vec::new();
    let seq: Vec<u32> = (0..24).map(|i| 1 + (i * 37) % 500).collect();
    out.push(model.forward_full(&Tensor::from_vec(seq.clone(), (2, 12), &dev)?)?);
    let mut cache = model.new_decode_cache(vec![0, 4, 7], 20);
    out.push(model.forward(&Tensor::from_vec(seq, (3, 8), &dev)?, &mut cache)?);
    for step in 0..4u32 {
        let next = Tensor::from_vec(vec![5 + step, 70 + step, 300 + step], (3, 1), &dev)?;
        out.push(model.forward(&next, &mut cache)?);
    }
    Ok(out)
}

/// Each pair of logits within `tol` of each other.
fn assert_same_logits(want: &[Tensor], got: &[Tensor], tol: f64) -> Result<()> {
    assert_eq!(want.len(), got.len());
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let diff = crate::custom_op::max_abs_diff(a, b)?;
        assert!(diff < tol, "output {i}: {diff}");
    }
    Ok(())
}

/// A random bf16 model of [`small_gqa_config`] on `dev`.
fn random_bf16_model(dev: &Device) -> Result<Llama> {
    let cfg = small_gqa_config();
    let tensors = random_weights(&cfg)?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::BF16)?.to_device(dev)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    Llama::load(VarBuilder::from_tensors(tensors, DType::BF16, dev), &cfg)
}

/// The logits (on the host) of a left-padded prefill (2 rows, pads 0 and 3, 8 columns) and 4
/// decoding steps.
fn prefill_and_decode(model: &Llama, dev: &Device) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    let prompt: Vec<u32> = (0..16).map(|i| 3 + (i * 37) % 90).collect();
    let mut cache = model.new_decode_cache(vec![0, 3], 12);
    out.push(model.forward(&Tensor::from_vec(prompt, (2, 8), dev)?, &mut cache)?);
    for step in 0..4u32 {
        let next = Tensor::from_vec(vec![5 + step, 40 + step], (2, 1), dev)?;
        out.push(model.forward(&next, &mut cache)?);
    }
    out.iter().map(|t| t.to_device(&Device::Cpu)).collect()
}

/// Each pair of bf16 logits within `rel` of the larger magnitude of `want` (at least 1).
fn assert_close_logits(got: &[Tensor], want: &[Tensor], rel: f64) -> Result<()> {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let diff = crate::custom_op::max_abs_diff(a, b)?;
        let size = f64::from(b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
        assert!(
            diff <= rel * size.max(1.0),
            "output {i}: {diff} (logits up to {size})"
        );
    }
    Ok(())
}

/// A random bf16 model with TinyLlama's head dim and grouped heads on the GPU: a left-padded
/// prefill and decoding steps through the flash kernels (turned on by the test switch) give
/// the composed attention's logits, to bf16 rounding. Runs only in a `--features cuda` build
/// on a machine with a GPU (skipped otherwise).
#[test]
fn flash_prefill_and_decoding_match_the_composed_attention_on_cuda() -> Result<()> {
    let Some(gpu) = crate::testing::cuda_or_skip() else {
        return Ok(());
    };
    let mut model = random_bf16_model(&gpu)?;
    crate::attention::tests::FLASH_ON.set(true);
    let flash = prefill_and_decode(&model, &gpu);
    crate::attention::tests::FLASH_ON.set(false);
    model.set_fused_attention(false);
    let composed = prefill_and_decode(&model, &gpu)?;
    assert_close_logits(&flash?, &composed, 0.05)
}

/// Training on the GPU in bf16 (f32 master weights, as qat-distill): a full-sequence forward
/// and backward pass with the flash kernels (the test switch) gives the composed attention's
/// loss and linear weight gradients, to bf16 rounding. Covers the flash op's wiring in
/// training: its token-major output into o_proj, the gradient arriving in that layout, dq in
/// bf16 into RoPE's backward on the query view. Runs only in a `--features cuda` build on a
/// machine with a GPU (skipped otherwise).
#[test]
fn flash_training_gradients_match_the_composed_attention_on_cuda() -> Result<()> {
    let Some(gpu) = crate::testing::cuda_or_skip() else {
        return Ok(());
    };
    let cfg = small_gqa_config();
    let run = |flash: bool| -> Result<(f32, Vec<Tensor>)> {
        let (mut model, vars) = trainable_random_model(&cfg, &gpu)?;
        model.set_fused_kernels(false);
        model.set_compute_dtype(DType::BF16);
        model.set_fused_attention(flash);
        let tokens: Vec<u32> = (0..80).map(|i| 3 + (i * 37) % 90).collect();
        let tokens = Tensor::from_vec(tokens, (2, 40), &gpu)?;
        crate::attention::tests::FLASH_ON.set(flash);
        let out = loss_and_linear_gradients(&model, &vars, &tokens, 5);
        crate::attention::tests::FLASH_ON.set(false);
        out
    };
    let ((loss_flash, flash), (loss_composed, composed)) = (run(true)?, run(false)?);
    assert_eq!(flash.len(), 2 * 7);
    assert!(
        (loss_flash - loss_composed).abs() <= 0.02 * loss_composed.abs().max(1.0),
        "loss {loss_flash} with flash, {loss_composed} composed"
    );
    assert_close_logits(&flash, &composed, 0.05)
}

/// On the GPU, a frozen model's joined projections (q/k/v and gate/up, one GEMM each per
/// layer) give the logits of the separate projections, to bf16 rounding. Runs only in a
/// `--features cuda` build on a machine with a GPU (skipped otherwise).
#[test]
fn joined_projections_on_cuda_give_the_separate_projections_logits() -> Result<()> {
    let Some(gpu) = crate::testing::cuda_or_skip() else {
        return Ok(());
    };
    let separate = prefill_and_decode(&random_bf16_model(&gpu)?, &gpu)?;
    let mut model = random_bf16_model(&gpu)?;
    model.freeze_weights()?;
    assert!(model
        .blocks
        .iter()
        .all(|b| b.self_attn.qkv.is_some() && b.mlp.gate_up.is_some()));
    assert_close_logits(&prefill_and_decode(&model, &gpu)?, &separate, 0.02)
}

/// The joined q/k/v and gate/up projections (run on the CPU through their test switch) give
/// the logits of the separate ones, to f32 rounding: a full-sequence forward and a
/// left-padded prefill with decoding steps of stories260K.
#[test]
fn joined_projections_give_the_separate_projections_logits() -> Result<()> {
    let run = |join: bool| -> Result<Vec<Tensor>> {
        let mut model = stories260k();
        crate::linear::tests::FUSE_ON_CPU.set(join);
        let frozen = model.freeze_weights();
        crate::linear::tests::FUSE_ON_CPU.set(false);
        frozen?;
        assert_eq!(model.blocks[0].self_attn.qkv.is_some(), join);
        assert_eq!(model.blocks[0].mlp.gate_up.is_some(), join);
        full_and_padded_decode_logits(&model)
    };
    assert_same_logits(&run(false)?, &run(true)?, 1e-4)
}

/// Prefill and decoding steps (across a buffer growth) with `rope_into_on` forced to
/// `forced` and a row-major cache.
fn decode_with_kv_written(
    model: &Llama,
    dev: &Device,
    forced: Option<bool>,
) -> Result<Vec<Tensor>> {
    crate::rope::tests::INTO_FORCED.set(forced);
    let run = || -> Result<Vec<Tensor>> {
        // Token ids below 96: the small random model's vocabulary.
        let seq: Vec<u32> = (0..24).map(|i| 1 + (i * 37) % 90).collect();
        let mut cache = model
            .new_decode_cache(vec![0, 4, 7], 10)
            .with_layout(crate::CacheLayout::RowMajor);
        let mut out = vec![model.forward(&Tensor::from_vec(seq, (3, 8), dev)?, &mut cache)?];
        for step in 0..4u32 {
            let next = Tensor::from_vec(vec![5 + step, 40 + step, 80 + step], (3, 1), dev)?;
            out.push(model.forward(&next, &mut cache)?);
        }
        out.iter().map(|t| t.to_device(&Device::Cpu)).collect()
    };
    let out = run();
    crate::rope::tests::INTO_FORCED.set(None);
    out
}

/// Decoding that writes its rotated keys and its values straight into a row-major cache
/// (`rope_into`, on the CPU through its test switch) gives the logits of rotating and
/// appending, to f32 rounding (the CPU op rotates in f64), across a buffer growth.
#[test]
fn keys_and_values_written_into_the_cache_give_the_appended_logits() -> Result<()> {
    let model = stories260k();
    let appended = decode_with_kv_written(&model, &Device::Cpu, Some(false))?;
    let written = decode_with_kv_written(&model, &Device::Cpu, Some(true))?;
    assert_same_logits(&appended, &written, 1e-4)
}

/// On the GPU the keys and values written into the cache give the appended path's logits
/// bit for bit (the same rotation kernel). Runs only in a `--features cuda` build on a
/// machine with a GPU.
#[test]
fn kv_written_into_the_cache_on_cuda_gives_the_appended_logits() -> Result<()> {
    let Some(gpu) = crate::testing::cuda_or_skip() else {
        return Ok(());
    };
    let model = random_bf16_model(&gpu)?;
    let appended = decode_with_kv_written(&model, &gpu, Some(false))?;
    let written = decode_with_kv_written(&model, &gpu, None)?;
    for (a, w) in appended.iter().zip(&written) {
        assert_eq!(
            crate::custom_op::f32_bits(a)?,
            crate::custom_op::f32_bits(w)?
        );
    }
    Ok(())
}

/// A row-major cache view with spare columns reaches the matmuls as it is (no copy: its
/// strides are kept); a transposed one is copied. The products equal those of contiguous
/// copies: bit for bit on the CPU, within f32 rounding on a GPU (`--features cuda` builds
/// with one; there cuBLAS reads the view through its leading dimension and batch stride).
#[test]
fn row_major_cache_views_reach_the_matmuls_without_a_copy_on_cpu_and_cuda() -> Result<()> {
    let (b, h, d) = (2, 3, 4);
    let mut devices = vec![Device::Cpu];
    if let Ok(gpu) = Device::new_cuda(0) {
        devices.push(gpu);
    }
    for dev in &devices {
        let chunk = |len: usize, seed: f32| {
            let n = b * h * len * d;
            Tensor::from_vec(
                (0..n)
                    .map(|i| ((i as f32 + seed) * 0.37).sin())
                    .collect::<Vec<_>>(),
                (b, h, len, d),
                dev,
            )
        };
        for layout in [CacheLayout::RowMajor, CacheLayout::Transposed] {
            let mut cache = KvCache::with_capacity(1, vec![0; b], 16).with_layout(layout);
            let (k, v) = cache.append(0, &chunk(5, 0.0)?, &chunk(5, 100.0)?)?;
            let (mk, mv) = (matmul_operand(&k)?, matmul_operand(&v)?);
            let in_place = layout == CacheLayout::RowMajor;
            assert_eq!(mk.stride() == k.stride(), in_place, "{layout:?}");
            assert_eq!(mv.stride() == v.stride(), in_place, "{layout:?}");
            assert!(!k.is_contiguous());
            let q = chunk(2, 7.0)?;
            let scores = q.matmul(&mk.t()?)?;
            let want = q.matmul(&k.contiguous()?.t()?)?;
            let out = scores.matmul(&mv)?;
            let want_out = want.matmul(&v.contiguous()?)?;
            for (x, y) in [(scores, want), (out, want_out)] {
                let x = x.flatten_all()?.to_vec1::<f32>()?;
                let y = y.flatten_all()?.to_vec1::<f32>()?;
                let same = |a: f32, b: f32| {
                    if dev.is_cpu() {
                        a.to_bits() == b.to_bits()
                    } else {
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0)
                    }
                };
                assert!(x.iter().zip(&y).all(|(&a, &b)| same(a, b)), "{layout:?}");
            }
        }
    }
    Ok(())
}
