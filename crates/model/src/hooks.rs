//! The seam where quantization enters the model: every linear layer and the KV cache call a hook.
//!
//! The model itself is full precision. A [`QuantHooks`] implementation (fake quantization for
//! training and evaluation, or dequantization of packed weights) decides what each linear layer
//! multiplies with and what the KV cache stores. The default, [`NoQuant`], changes nothing.

use candle_core::{Result, Tensor};
use std::fmt;

/// The seven linear layers of a Llama decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The checkpoint name of the layer inside its block, e.g. `self_attn.q_proj`.
    pub fn checkpoint_path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// Short name used in schemes and logs: `q_proj`, `gate_proj`, ...
    pub fn short_name(self) -> &'static str {
        self.checkpoint_path().rsplit('.').next().unwrap_or("")
    }
}

/// Identifies one linear layer of the model: decoder block index and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub layer: usize,
    pub kind: LinearKind,
}

impl LinearId {
    /// Full checkpoint key of the layer's weight, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub fn weight_key(&self) -> String {
        format!(
            "model.layers.{}.{}.weight",
            self.layer,
            self.kind.checkpoint_path()
        )
    }
}

impl fmt::Display for LinearId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layers.{}.{}", self.layer, self.kind.checkpoint_path())
    }
}

/// Which half of the KV cache a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvKind {
    Key,
    Value,
}

/// Hooks applied inside the forward pass. All methods default to the identity.
pub trait QuantHooks: Send + Sync + fmt::Debug {
    /// The weight the layer multiplies with, from its stored weight `w: [out, in]`.
    fn weight(&self, _id: LinearId, w: &Tensor) -> Result<Tensor> {
        Ok(w.clone())
    }
    /// [`QuantHooks::weight`] in the compute dtype `dtype`. The default casts the hook's
    /// result; a hook may do both in one pass, with the same values and gradient.
    fn weight_in(&self, id: LinearId, w: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        self.weight(id, w)?.to_dtype(dtype)
    }
    /// The layer's input `x: [.., in]` as the layer sees it (activation quantization).
    fn activation(&self, _id: LinearId, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Whether [`QuantHooks::activation`] gives the same tensor for layers `a` and `b` on every
    /// input, so that a block may quantize an input that feeds both (q/k/v, gate/up) once. The
    /// default, false, runs the hook once per layer.
    fn same_activation(&self, _a: LinearId, _b: LinearId) -> bool {
        false
    }
    /// A k_proj or v_proj output `x: [batch, kv_heads, seq, head_dim]`, before RoPE, as the
    /// KV cache will hold it. On CUDA `x` may be a strided view (the transposed projection
    /// output); the CPU passes it contiguous.
    fn kv(&self, _layer: usize, _kind: KvKind, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Whether [`QuantHooks::weight`] depends only on the stored weight (so the result may be
    /// cached for inference). Training hooks must return false.
    fn weight_is_static(&self) -> bool {
        true
    }
}

/// The identity: full precision everywhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoQuant;

impl QuantHooks for NoQuant {
    fn same_activation(&self, _a: LinearId, _b: LinearId) -> bool {
        true
    }
}
