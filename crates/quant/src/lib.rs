//! Quantization schemes and differentiable fake quantization for quantization-aware training.
//!
//! A [`Scheme`] (saved as `quant_scheme.json`, short names like `W4A8KV4`) says how weights,
//! activations and the KV cache are quantized; [`FakeQuant`] applies it to a `qat_model::Llama`
//! through its quantization hooks, with straight-through gradients ([`fake`]). Weight formats:
//! symmetric per channel (LLM-QAT, [`fake`]), asymmetric per group ([`asym`]) and NF3/NF4
//! ([`nf`]) (BitDistiller), and llama.cpp's GGUF blocks Q4_0/Q4_1/Q8_0 ([`ggml`]); [`codes`]
//! gives the integer codes a packed model stores.

pub mod asym;
pub mod codes;
pub mod error;
pub mod fake;
pub mod file;
pub mod fused;
pub mod fused_asym;
pub mod fused_nf;
pub mod ggml;
pub mod glob;
mod group_kernel;
pub mod hooks;
pub mod name;
pub mod nf;
pub mod scheme;
pub mod weight;

pub use asym::asym_max_int;
pub use codes::{dequantize_codes, quantize_codes, WeightCodes};
pub use error::{QuantError, Result};
pub use fake::{
    fake_act, fake_kv, fake_weight, round_half_even, ste, sym_qmax, sym_quant_dequant,
    sym_quantize, ScaleRounding,
};
pub use ggml::{sym_channel_blocks, sym_channel_type, GgmlBlock, GgmlType};
pub use glob::glob_match;
pub use hooks::FakeQuant;
pub use nf::{NfGrid, NF3_LEVELS, NF3_THRESHOLDS, NF4_LEVELS, NF4_THRESHOLDS};
pub use scheme::{
    linear_shape, ActQuant, KvGranularity, KvQuant, LayerQuant, Override, Scheme, FORMAT_VERSION,
    MAX_BITS, MIN_BITS, SCHEME_FILE,
};
pub use weight::{WeightFormat, WeightGrad, WeightQuant};
