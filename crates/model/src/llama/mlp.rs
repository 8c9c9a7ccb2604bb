//! A Llama layer's SwiGLU MLP: `down(silu(gate(x)) · up(x))` through the quantization hooks.

use crate::config::LlamaConfig;
use crate::hooks::{LinearId, LinearKind, QuantHooks};
use crate::linear::{forward_joined, hooked_inputs, QLinear};
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate_proj: QLinear,
    pub(super) up_proj: QLinear,
    pub(super) down_proj: QLinear,
    /// gate's and up's frozen weights joined, `[2 intermediate, hidden]` (inference on CUDA: see
    /// [`fused_gate_up_on`](crate::linear::fused_gate_up_on)); their own weights are then row views of it.
    pub(super) gate_up: Option<Tensor>,
}

impl Mlp {
    pub(super) fn load(vb: VarBuilder, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let id = |kind| LinearId { layer, kind };
        Ok(Self {
            gate_proj: QLinear::load(vb.pp("gate_proj"), h, i, id(LinearKind::Gate))?,
            up_proj: QLinear::load(vb.pp("up_proj"), h, i, id(LinearKind::Up))?,
            down_proj: QLinear::load(vb.pp("down_proj"), i, h, id(LinearKind::Down))?,
            gate_up: None,
        })
    }

    /// `x: [b, t, hidden]` → `[b, t, hidden]`. On CUDA `silu(gate) · up` is one op with its
    /// own backward ([`crate::swiglu`]), in training and inference alike; the CPU composes it.
    pub(super) fn forward(&self, x: &Tensor, hooks: &dyn QuantHooks) -> Result<Tensor> {
        if let Some(joined) = &self.gate_up {
            // One GEMM; its [.., 2 intermediate] output holds gate, then up, per row.
            let x = hooks.activation(self.gate_proj.id(), x)?;
            let gate_up = forward_joined(&x, joined)?;
            let h = if crate::swiglu::fused_swiglu_on(&gate_up) {
                crate::swiglu::swiglu_joined(&gate_up)?
            } else {
                let inter = gate_up.dim(D::Minus1)? / 2;
                let gate = gate_up.narrow(D::Minus1, 0, inter)?;
                (gate.silu()? * gate_up.narrow(D::Minus1, inter, inter)?)?
            };
            return self.down_proj.forward(&h, hooks);
        }
        let [x_gate, x_up] = hooked_inputs(x, [&self.gate_proj, &self.up_proj], hooks)?;
        let gate = self.gate_proj.forward_hooked_input(&x_gate, hooks)?;
        let up = self.up_proj.forward_hooked_input(&x_up, hooks)?;
        let h = if crate::swiglu::fused_swiglu_on(&gate) {
            crate::swiglu::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down_proj.forward(&h, hooks)
    }
}
