//! A Llama language model on candle whose linear layers and KV cache are quantization hooks.
//!
//! Loads any Hugging Face Llama directory ([`ModelDir`]), runs batched forward passes with an
//! incremental, left-padded KV cache ([`KvCache`]), and exposes every linear layer through
//! [`QuantHooks`] so that fake quantization and packed weights plug in without model changes.

pub mod attention;
pub mod cache;
pub mod causal_softmax;
pub mod config;
pub mod custom_op;
pub mod device;
pub mod error;
pub mod fastmath;
pub mod hooks;
pub mod hub;
pub mod kernel_switch;
pub mod linear;
pub mod llama;
pub mod model_dir;
pub mod norm;
pub mod profile;
pub mod residual_add;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub mod testing;
pub mod token_nll;

pub use attention::{causal_attention, fused_attention_supported};
pub use cache::{CacheLayout, KvCache};
pub use config::{LlamaConfig, LlamaConfigFile};
pub use device::{device_name, dtype_name, parse_device, parse_dtype};
pub use error::{ModelError, Result};
pub use hooks::{KvKind, LinearId, LinearKind, NoQuant, QuantHooks};
pub use hub::{resolve_model, snapshot_source, HubError, HubSource, ResolvedModel};
pub use linear::{hooked_inputs, QLinear};
pub use llama::Llama;
pub use model_dir::{sha256_files, special_token_ids, ModelDir, COMPANION_FILES};
pub use profile::{ProfileSummary, StepProfile};
pub use rope::RotaryEmbedding;
pub use token_nll::token_nll;
