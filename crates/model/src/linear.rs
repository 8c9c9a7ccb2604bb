//! A bias-free linear layer whose weight and input pass through the model's quantization hooks.

use crate::hooks::{LinearId, QuantHooks};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `y = x · Wᵀ` with `W: [out, in]`, where W and x first go through [`QuantHooks`].
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Tensor,
    id: LinearId,
}

impl QLinear {
    pub fn new(weight: Tensor, id: LinearId) -> Self {
        Self { weight, id }
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

    /// `x: [.., in] -> [.., out]`.
    pub fn forward(&self, x: &Tensor, hooks: &dyn QuantHooks) -> Result<Tensor> {
        let w = hooks.weight(self.id, &self.weight)?;
        let x = hooks.activation(self.id, x)?;
        let (rows, in_dim) = (x.elem_count() / x.dim(candle_core::D::Minus1)?, w.dim(1)?);
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().expect("x has at least one dim") = w.dim(0)?;
        let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
        y.reshape(out_shape)
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        QLinear::forward(self, x, &crate::hooks::NoQuant)
    }
}
