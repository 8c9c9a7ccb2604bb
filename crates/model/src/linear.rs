//! A bias-free linear layer whose weight and input pass through the model's quantization hooks.

use crate::hooks::{LinearId, QuantHooks};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `y = x · Wᵀ` with `W: [out, in]`, where W and x first go through [`QuantHooks`].
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Tensor,
    id: LinearId,
    /// The weight already went through the hook ([`Self::freeze`]): use it as is.
    frozen: bool,
}

impl QLinear {
    pub fn new(weight: Tensor, id: LinearId) -> Self {
        Self {
            weight,
            id,
            frozen: false,
        }
    }

    /// Replaces the weight by `hooks.weight(weight)` cast to `dtype`, once, if `static_weights`
    /// (else only casts it, and the hook keeps running every forward). See
    /// [`crate::Llama::freeze_weights`].
    pub(crate) fn freeze(
        &mut self,
        hooks: &dyn QuantHooks,
        static_weights: bool,
        dtype: candle_core::DType,
    ) -> Result<()> {
        if self.frozen {
            return Ok(());
        }
        if static_weights {
            self.weight = hooks.weight_in(self.id, &self.weight, dtype)?;
            self.frozen = true;
        } else {
            self.weight = self.weight.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// Loads `weight` of shape `[out_dim, in_dim]` from `vb` (e.g. `vb.pp("self_attn.q_proj")`).
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, id: LinearId) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        Ok(Self::new(weight, id))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn id(&self) -> LinearId {
        self.id
    }

    /// `x: [.., in] -> [.., out]`, computed in `x`'s dtype (the weight, quantized by the hook
    /// in its own dtype, is cast to it: a no-op when they agree).
    pub fn forward(&self, x: &Tensor, hooks: &dyn QuantHooks) -> Result<Tensor> {
        self.forward_hooked_input(&hooks.activation(self.id, x)?, hooks)
    }

    /// [`Self::forward`] of an input that already went through `hooks.activation` for this
    /// layer (see [`hooked_inputs`]).
    pub fn forward_hooked_input(&self, x: &Tensor, hooks: &dyn QuantHooks) -> Result<Tensor> {
        let w = if self.frozen {
            self.weight.to_dtype(x.dtype())?
        } else {
            hooks.weight_in(self.id, &self.weight, x.dtype())?
        };
        let (rows, in_dim) = (x.elem_count() / x.dim(candle_core::D::Minus1)?, w.dim(1)?);
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().expect("x has at least one dim") = w.dim(0)?;
        let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
        y.reshape(out_shape)
    }
}

/// The input `x: [.., in]` of each of `layers` after `hooks.activation`, computed once per
/// group of layers that [`QuantHooks::same_activation`] says see the same tensor (e.g. one
/// fake-quantized input for q_proj, k_proj and v_proj, in value and gradient).
pub fn hooked_inputs<const N: usize>(
    x: &Tensor,
    layers: [&QLinear; N],
    hooks: &dyn QuantHooks,
) -> Result<[Tensor; N]> {
    let mut done: Vec<Tensor> = Vec::with_capacity(N);
    for (i, layer) in layers.iter().enumerate() {
        let shared = (0..i).find(|&j| hooks.same_activation(layers[j].id, layer.id));
        let input = match shared {
            Some(j) => done[j].clone(),
            None => hooks.activation(layer.id, x)?,
        };
        done.push(input);
    }
    Ok(done
        .try_into()
        .unwrap_or_else(|_| unreachable!("one input per layer")))
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        QLinear::forward(self, x, &crate::hooks::NoQuant)
    }
}
