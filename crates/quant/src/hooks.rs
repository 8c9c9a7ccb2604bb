//! [`FakeQuant`]: a [`Scheme`] applied to a model through its [`QuantHooks`].

use crate::fake::{fake_act, fake_kv, fake_weight, fake_weight_in};
use crate::scheme::{LayerQuant, Scheme};
use candle_core::{DType, Result, Tensor};
use qat_model::{KvKind, LinearId, QuantHooks};

/// Fake quantization of every linear layer's weight and input and of the KV cache, as the
/// scheme says (overrides resolved per layer). Embeddings, norms and the LM head never pass
/// through hooks and stay full precision.
///
/// Values equal the quantized model's; gradients pass straight through (see [`crate::fake`]).
#[derive(Debug, Clone)]
pub struct FakeQuant {
    scheme: Scheme,
    training: bool,
}

impl FakeQuant {
    /// For QAT: weights change between steps, so [`QuantHooks::weight_is_static`] is false and
    /// the model re-quantizes them on every forward.
    pub fn for_training(scheme: Scheme) -> Self {
        Self {
            scheme,
            training: true,
        }
    }

    /// For evaluation/generation with fixed weights: [`QuantHooks::weight_is_static`] is true,
    /// so the model may cache quantized weights.
    pub fn for_inference(scheme: Scheme) -> Self {
        Self {
            scheme,
            training: false,
        }
    }

    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// Whether built by [`FakeQuant::for_training`].
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The quantizers of layer `id` after overrides.
    pub fn layer(&self, id: LinearId) -> LayerQuant {
        self.scheme.resolve(id)
    }
}

impl QuantHooks for FakeQuant {
    /// `w: [out, in]` → fake-quantized `[out, in]` (unchanged if the layer's weights are FP).
    fn weight(&self, id: LinearId, w: &Tensor) -> Result<Tensor> {
        match self.scheme.resolve(id).weight {
            Some(wq) => fake_weight(w, &wq),
            None => Ok(w.clone()),
        }
    }

    /// [`QuantHooks::weight`] in `dtype`: f32 master weights quantized straight into bf16
    /// where the fused kernel runs ([`crate::fake::fake_weight_in`]).
    fn weight_in(&self, id: LinearId, w: &Tensor, dtype: DType) -> Result<Tensor> {
        match self.scheme.resolve(id).weight {
            Some(wq) => fake_weight_in(w, &wq, dtype),
            None => w.to_dtype(dtype),
        }
    }

    /// `x: [.., in]` → per-token fake-quantized `[.., in]` (unchanged if the layer's inputs are FP).
    fn activation(&self, id: LinearId, x: &Tensor) -> Result<Tensor> {
        match self.scheme.resolve(id).act {
            Some(aq) => fake_act(x, aq.bits),
            None => Ok(x.clone()),
        }
    }

    /// Layers with the same activation quantizer (or none) see the same input.
    fn same_activation(&self, a: LinearId, b: LinearId) -> bool {
        self.scheme.resolve(a).act == self.scheme.resolve(b).act
    }

    /// `x: [batch, kv_heads, seq, head_dim]` → fake-quantized per token or per token and head, as
    /// the scheme says (keys and values alike).
    fn kv(&self, _layer: usize, _kind: KvKind, x: &Tensor) -> Result<Tensor> {
        match self.scheme.kv {
            Some(kq) => fake_kv(x, kq),
            None => Ok(x.clone()),
        }
    }

    fn weight_is_static(&self) -> bool {
        !self.training
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    /// A W4A8KV4 training forward and backward pass in f32 on the GPU against the same on the
    /// CPU: the loss and every weight's gradient agree to the devices' rounding (plus the rare
    /// quantization step that rounding moves across a boundary). The GPU side runs the fused
    /// ops and their wiring (RoPE reading the query view and writing its gradient back
    /// token-major, the KV quantizer on the projection's views, the masked softmax, RMSNorm,
    /// SwiGLU and fake quantization kernels), which the per-op tests check one at a time. Runs
    /// only in a `--features cuda` build on a machine with a GPU (skipped otherwise).
    #[test]
    fn training_step_on_cuda_matches_the_cpu() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        // LLM-QAT's scheme, and BitDistiller's 2-bit groups of 32 with their min/max gradient
        // (kernels/asym_group.cu on the GPU, the composed ops on the CPU), and its NF3 groups
        // (kernels/nf_group.cu).
        for name in ["W4A8KV4", "W2G32", "NF3G32"] {
            let run = |dev: &Device| -> Result<(f64, Vec<Tensor>)> {
                let cfg = qat_model::testing::small_gqa_config();
                let (mut model, vars) = qat_model::testing::trainable_random_model(&cfg, dev)?;
                model.set_fused_kernels(false); // training's ops, with gradients
                let scheme: Scheme = name.parse().expect("scheme");
                model.set_hooks(Arc::new(FakeQuant::for_training(scheme)));
                let tokens: Vec<u32> = (0..48).map(|i| 3 + (i * 37) % 90).collect();
                let tokens = Tensor::from_vec(tokens, (2, 24), dev)?;
                let (loss, grads) =
                    qat_model::testing::loss_and_linear_gradients(&model, &vars, &tokens, 99)?;
                Ok((f64::from(loss), grads))
            };
            compare_step(name, run(&gpu)?, run(&Device::Cpu)?)?;
        }
        Ok(())
    }

    /// The GPU's loss and linear gradients against the CPU's (`scheme` names the case).
    fn compare_step(
        scheme: &str,
        (loss_gpu, grads_gpu): (f64, Vec<Tensor>),
        (loss_cpu, grads_cpu): (f64, Vec<Tensor>),
    ) -> Result<()> {
        assert_eq!(grads_cpu.len(), 2 * 7, "7 linear layers per block");
        assert!(
            (loss_gpu - loss_cpu).abs() <= 1e-2 * loss_cpu.abs().max(1.0),
            "{scheme}: loss {loss_gpu} on cuda, {loss_cpu} on the cpu"
        );
        for (i, (g, want)) in grads_gpu.iter().zip(&grads_cpu).enumerate() {
            let max = |t: &Tensor| -> Result<f32> { t.abs()?.flatten_all()?.max(0)?.to_scalar() };
            let (diff, size) = (max(&(g - want)?)?, max(want)?);
            assert!(
                diff <= 5e-2 * size.max(1e-6),
                "{scheme}: linear weight {i} (by name): differs by {diff}, largest {size}"
            );
        }
        Ok(())
    }
}
