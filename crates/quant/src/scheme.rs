//! The quantization scheme: which quantizer applies to weights, activations and the KV cache,
//! with per-layer overrides. Saved as `quant_scheme.json` next to every model qat produces.
//!
//! The JSON form, the short names (`W4A8KV4`) and the exact quantizer formulas are specified in
//! `formats/scheme.md`; this module is its implementation.

use crate::error::{QuantError, Result};
use crate::glob::glob_match;
use qat_model::{LinearId, LinearKind, LlamaConfig};
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::weight::{WeightFormat, WeightGrad, WeightQuant};

/// The `format_version` this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the scheme inside a model directory.
pub const SCHEME_FILE: &str = "quant_scheme.json";
/// Smallest supported bit width of any quantizer.
pub const MIN_BITS: u8 = 2;
/// Largest supported bit width of any quantizer.
pub const MAX_BITS: u8 = 8;

/// Activation quantizer: symmetric, per token, at the input of every linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActQuant {
    /// Bits per activation, `2..=8`.
    pub bits: u8,
}

/// KV-cache quantizer: symmetric, per token, on k_proj/v_proj outputs before RoPE; one scale per
/// (batch, position) over all KV heads × head_dim (LLM-QAT), or per (batch, position, KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvQuant {
    /// Bits per cached element, `2..=8`.
    pub bits: u8,
    /// Which elements of a token share a scale; absent in JSON = `token` (LLM-QAT).
    #[serde(default, skip_serializing_if = "KvGranularity::is_token")]
    pub granularity: KvGranularity,
}

impl KvQuant {
    /// LLM-QAT's KV quantizer: `bits` bits, one scale per token over all KV heads.
    pub fn per_token(bits: u8) -> Self {
        Self {
            bits,
            granularity: KvGranularity::Token,
        }
    }

    /// One scale per token and KV head (over head_dim elements).
    pub fn per_head(bits: u8) -> Self {
        Self {
            bits,
            granularity: KvGranularity::Head,
        }
    }
}

/// The elements of one k_proj/v_proj output position that share a KV scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvGranularity {
    /// All kv_heads × head_dim elements of a position (LLM-QAT's `modeling_llama_quant.py`,
    /// which quantizes the `[batch, seq, kv_heads · head_dim]` projection output per row).
    #[default]
    Token,
    /// The head_dim elements of one KV head at one position (kv_heads scales per position).
    Head,
}

impl KvGranularity {
    /// Whether this is the default, [`KvGranularity::Token`] (serde's skip test).
    pub fn is_token(&self) -> bool {
        *self == KvGranularity::Token
    }
}

/// Replaces the weight and/or activation quantizer of the linear layers whose name
/// (`layers.3.mlp.up_proj`) matches `pattern` (a glob, `*` = any run of characters).
/// `None` keeps the setting in force; `Some(None)` (JSON `null`) disables quantization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub pattern: String,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub weight: Option<Option<WeightQuant>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub act: Option<Option<ActQuant>>,
}

/// Distinguishes a present `null` (`Some(None)`) from an absent field (`None`, via `default`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The quantizers in force for one linear layer after overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LayerQuant {
    pub weight: Option<WeightQuant>,
    pub act: Option<ActQuant>,
}

/// A complete quantization scheme (see `formats/scheme.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Weight quantizer of every linear layer (q, k, v, o, gate, up, down); `None` = full precision.
    pub weight: Option<WeightQuant>,
    /// Activation quantizer at the input of every linear layer; `None` = full precision.
    pub act: Option<ActQuant>,
    /// KV-cache quantizer; `None` = full precision.
    pub kv: Option<KvQuant>,
    /// Per-layer overrides, applied in order (later ones win).
    #[serde(default)]
    pub overrides: Vec<Override>,
}

impl Default for Scheme {
    fn default() -> Self {
        Self::full_precision()
    }
}

/// `BitsOutOfRange` unless `bits` is in `MIN_BITS..=MAX_BITS`.
pub(crate) fn check_bits(location: &str, quantizer: &'static str, bits: u8) -> Result<()> {
    if (MIN_BITS..=MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(QuantError::BitsOutOfRange {
            location: location.to_string(),
            quantizer,
            bits,
            min: MIN_BITS,
            max: MAX_BITS,
        })
    }
}

/// `(out_features, in_features)` of a linear layer of a model with config `cfg`.
pub fn linear_shape(cfg: &LlamaConfig, kind: LinearKind) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    match kind {
        LinearKind::Q => (q, h),
        LinearKind::K | LinearKind::V => (kv, h),
        LinearKind::O => (h, q),
        LinearKind::Gate | LinearKind::Up => (i, h),
        LinearKind::Down => (h, i),
    }
}

impl Scheme {
    /// A scheme without overrides.
    pub fn new(weight: Option<WeightQuant>, act: Option<ActQuant>, kv: Option<KvQuant>) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            weight,
            act,
            kv,
            overrides: Vec::new(),
        }
    }

    /// Nothing quantized (`FP`).
    pub fn full_precision() -> Self {
        Self::new(None, None, None)
    }

    /// Appends an override (later overrides win) and returns the scheme.
    pub fn with_override(mut self, o: Override) -> Self {
        self.overrides.push(o);
        self
    }

    /// Whether nothing at all is quantized, overrides included.
    pub fn is_full_precision(&self) -> bool {
        self.weight.is_none()
            && self.act.is_none()
            && self.kv.is_none()
            && self.overrides.iter().all(|o| {
                matches!(o.weight, None | Some(None)) && matches!(o.act, None | Some(None))
            })
    }

    /// The weight and activation quantizers of layer `id` after applying the overrides in order.
    /// Costs nothing without overrides; otherwise formats `id` once and globs each pattern.
    pub fn resolve(&self, id: LinearId) -> LayerQuant {
        let mut out = LayerQuant {
            weight: self.weight,
            act: self.act,
        };
        if self.overrides.is_empty() {
            return out;
        }
        let name = id.to_string();
        for o in self
            .overrides
            .iter()
            .filter(|o| glob_match(&o.pattern, &name))
        {
            if let Some(w) = o.weight {
                out.weight = w;
            }
            if let Some(a) = o.act {
                out.act = a;
            }
        }
        out
    }

    /// Model-independent checks: version, bit ranges, weight formats (bits they require, group
    /// sizes, gradients), non-empty override patterns.
    pub fn validate(&self) -> Result<()> {
        if self.format_version != FORMAT_VERSION {
            return Err(QuantError::UnsupportedVersion {
                found: self.format_version,
                expected: FORMAT_VERSION,
            });
        }
        if let Some(w) = &self.weight {
            w.check("")?;
        }
        if let Some(a) = &self.act {
            check_bits("", "activation", a.bits)?;
        }
        if let Some(kv) = &self.kv {
            check_bits("", "kv", kv.bits)?;
        }
        for (index, o) in self.overrides.iter().enumerate() {
            if o.pattern.is_empty() {
                return Err(QuantError::EmptyPattern { index });
            }
            let location = format!("override #{index} ({:?}): ", o.pattern);
            if let Some(Some(w)) = &o.weight {
                w.check(&location)?;
            }
            if let Some(Some(a)) = &o.act {
                check_bits(&location, "activation", a.bits)?;
            }
        }
        Ok(())
    }

    /// [`Scheme::validate`] plus the checks against a model: every override pattern must match
    /// at least one linear layer, and every layer's weight format must fit its shape.
    pub fn validate_for(&self, cfg: &LlamaConfig) -> Result<()> {
        self.validate()?;
        let ids: Vec<LinearId> = (0..cfg.num_layers)
            .flat_map(|layer| {
                LinearKind::ALL
                    .into_iter()
                    .map(move |kind| LinearId { layer, kind })
            })
            .collect();
        let names: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        for (index, o) in self.overrides.iter().enumerate() {
            if !names.iter().any(|n| glob_match(&o.pattern, n)) {
                return Err(QuantError::UnmatchedPattern {
                    index,
                    pattern: o.pattern.clone(),
                    last_layer: cfg.num_layers.saturating_sub(1),
                });
            }
        }
        for (id, name) in ids.iter().zip(&names) {
            if let Some(w) = self.resolve(*id).weight {
                let (out_features, in_features) = linear_shape(cfg, id.kind);
                w.format
                    .check_shape(out_features, in_features)
                    .map_err(|what| QuantError::LayerMismatch {
                        layer: name.clone(),
                        format: w.format.to_string(),
                        out_features,
                        in_features,
                        what,
                    })?;
            }
        }
        Ok(())
    }
}
