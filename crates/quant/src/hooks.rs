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
