//! Quantization schemes and differentiable fake quantization for quantization-aware training.
//!
//! A [`Scheme`] (saved as `quant_scheme.json`, short names like `W4A8KV4`) says how weights,
//! activations and the KV cache are quantized; [`FakeQuant`] applies it to a `qat_model::Llama`
//! through its quantization hooks, with straight-through gradients ([`fake`]).

pub mod error;
pub mod fake;
pub mod file;
pub mod glob;
pub mod hooks;
pub mod name;
pub mod scheme;

pub use error::{QuantError, Result};
pub use fake::{
    fake_act, fake_kv, fake_weight, round_half_even, ste, sym_qmax, sym_quant_dequant,
    sym_quantize, ScaleRounding,
};
pub use glob::glob_match;
pub use hooks::FakeQuant;
pub use scheme::{
    linear_shape, ActQuant, KvQuant, LayerQuant, Override, Scheme, WeightFormat, WeightQuant,
    FORMAT_VERSION, MAX_BITS, MIN_BITS, SCHEME_FILE,
};
