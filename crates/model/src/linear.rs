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
        times_transposed(x, &w)
    }
}

/// `x: [.., in] · wᵀ` for `w: [out, in]` → `[.., out]`: one GEMM over all leading dims.
fn times_transposed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, in_dim) = (x.elem_count() / x.dim(candle_core::D::Minus1)?, w.dim(1)?);
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has at least one dim") = w.dim(0)?;
    x.reshape((rows, in_dim))?
        .matmul(&w.t()?)?
        .reshape(out_shape)
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

/// Where [`Llama::freeze_weights`](crate::Llama::freeze_weights) joins the frozen q, k and v
/// weights of each layer into one matrix ([`fuse_frozen`]): CUDA models in a `cuda` build, unless
/// `QAT_CUDA_FUSED_QKV=0`. One GEMM per layer instead of three (in decoding, where v then needs
/// a copy for the cache, one launch fewer per layer and step); the CPU keeps three (its results
/// stay bit for bit as they were).
pub fn fused_qkv_on(weight: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if tests::FUSE_ON_CPU.get() {
        return true;
    }
    crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_QKV", weight)
}

/// Where [`Llama::freeze_weights`](crate::Llama::freeze_weights) joins the frozen gate and up
/// weights of each MLP into one `[2 intermediate, hidden]` matrix ([`fuse_frozen`]): CUDA models
/// in a `cuda` build, unless `QAT_CUDA_FUSED_GATE_UP=0`. One GEMM per layer instead of two, whose
/// output [`crate::swiglu::swiglu_joined`] reads as it is (in decoding, one launch fewer per
/// layer and step); the CPU keeps two (its results stay bit for bit as they were).
pub fn fused_gate_up_on(weight: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if tests::FUSE_ON_CPU.get() {
        return true;
    }
    crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_GATE_UP", weight)
}

/// Joins the weights of frozen `layers` (which take the same input: see [`hooked_inputs`]) into
/// one `[Σ out, in]` matrix, and makes each layer's weight a row range of it (a contiguous view,
/// no copy kept): `x · Wᵀ` of the joined matrix holds the layers' outputs side by side. `None`
/// (nothing changed) unless every layer is frozen with weights of one dtype.
pub fn fuse_frozen<const N: usize>(layers: [&mut QLinear; N]) -> Result<Option<Tensor>> {
    let dtype = layers[0].weight.dtype();
    if layers
        .iter()
        .any(|l| !l.frozen || l.weight.dtype() != dtype)
    {
        return Ok(None);
    }
    let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
    let joined = Tensor::cat(&weights, 0)?;
    let mut start = 0;
    for layer in layers {
        let rows = layer.weight.dim(0)?;
        layer.weight = joined.narrow(0, start, rows)?;
        start += rows;
    }
    Ok(Some(joined))
}

/// `x: [.., in]` (already through the layers' activation hook) times the joined weight
/// `[Σ out, in]` of [`fuse_frozen`] → `[.., Σ out]`, in `x`'s dtype.
pub fn forward_joined(x: &Tensor, joined: &Tensor) -> Result<Tensor> {
    times_transposed(x, &joined.to_dtype(x.dtype())?)
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        QLinear::forward(self, x, &crate::hooks::NoQuant)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hooks::{LinearKind, NoQuant};
    use candle_core::DType;
    use std::cell::Cell;

    thread_local! {
        /// The model's wiring tests can join q, k and v (and gate and up) on the CPU.
        pub(crate) static FUSE_ON_CPU: Cell<bool> = const { Cell::new(false) };
    }

    /// The joined weight's product holds each layer's own output, and the layers' weights become
    /// views of it; an unfrozen layer leaves everything as it was.
    #[test]
    fn joined_layers_give_their_own_outputs() -> Result<()> {
        let id = |kind| LinearId { layer: 0, kind };
        let lcg = |shape: &[usize], seed| crate::custom_op::lcg_tensor(shape, seed, -1.0, 1.0);
        let mut q = QLinear::new(lcg(&[6, 4], 1)?.to_dtype(DType::F32)?, id(LinearKind::Q));
        let mut k = QLinear::new(lcg(&[2, 4], 2)?.to_dtype(DType::F32)?, id(LinearKind::K));
        let x = lcg(&[3, 5, 4], 3)?.to_dtype(DType::F32)?;
        assert!(fuse_frozen([&mut q, &mut k])?.is_none(), "not frozen");
        for l in [&mut q, &mut k] {
            l.freeze(&NoQuant, true, DType::F32)?;
        }
        let (want_q, want_k) = (q.forward(&x, &NoQuant)?, k.forward(&x, &NoQuant)?);
        let joined = fuse_frozen([&mut q, &mut k])?.expect("frozen");
        assert_eq!(joined.dims(), [8, 4]);
        let y = forward_joined(&x, &joined)?;
        assert_eq!(y.dims(), [3, 5, 8]);
        let diff = |a: &Tensor, b: &Tensor| crate::custom_op::max_abs_diff(a, b);
        assert!(diff(&y.narrow(2, 0, 6)?, &want_q)? < 1e-6);
        assert!(diff(&y.narrow(2, 6, 2)?, &want_k)? < 1e-6);
        // The layers now read rows of the joined weight, with the same results.
        assert!(diff(&q.forward(&x, &NoQuant)?, &want_q)? < 1e-6);
        assert!(diff(&k.forward(&x, &NoQuant)?, &want_k)? < 1e-6);
        assert_eq!(k.weight().layout().start_offset(), 24);
        Ok(())
    }
}
