//! The weight quantizer of a linear layer: bits, storage format ([`WeightFormat`]) and training
//! gradient ([`WeightGrad`]), their JSON forms and the checks that do not need a model.
//!
//! The formats and their formulas are specified in `formats/scheme.md`; the quantizers live in
//! `fake` (symmetric), `asym` and `nf`, the integer codes for packing in `codes`.

use crate::error::QuantError;
use crate::ggml::{GgmlType, BLOCK};
use crate::scheme::check_bits;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// How a weight matrix `[out, in]` is mapped to integers.
///
/// Serialized internally tagged: `{"kind": "asym_group", "group_size": 128}`. Unknown kinds and
/// unknown fields are parse errors. `group_size: None` (JSON `null`) means one group per output
/// channel (the whole row). The enum is deliberately *not* `#[non_exhaustive]`: adding a variant
/// must break every `match` that does not handle it yet (fake quant, packing, short names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "FormatRepr", into = "FormatRepr")]
pub enum WeightFormat {
    /// LLM-QAT: symmetric MinMax per output channel (one f16 scale per row of `[out, in]`).
    SymPerChannel,
    /// BitDistiller: asymmetric MinMax per group of `group_size` consecutive inputs of a row
    /// (one f16 scale and one integer zero point per group); `bits` in 2..=8.
    AsymGroup { group_size: Option<usize> },
    /// BitDistiller's NF3 ("n2f3"): 8 NormalFloat levels in [-1, 1]; per group, positive weights
    /// are scaled by max and negative ones by |min| (two f16 scales per group); `bits` = 3.
    Nf3 { group_size: Option<usize> },
    /// QLoRA's NormalFloat4: 16 levels in [-1, 1], absmax per group (one f16 scale); `bits` = 4.
    Nf4 { group_size: Option<usize> },
    /// llama.cpp's GGUF block grids (`Q4_0`, `Q4_1`, `Q8_0`): blocks of 32 inputs, quantized
    /// exactly as its reference quantizers (see `ggml`); exported losslessly to GGUF.
    Ggml(GgmlType),
    // When adding a format: extend `FormatRepr` (below), `check_shape`, `fake::fake_weight`,
    // `codes`, the short-name grammar in `name.rs` and `formats/scheme.md`.
}

/// The serialized form of [`WeightFormat`]. `SymPerChannel` is an empty struct variant here
/// because serde ignores unknown fields next to an internally tagged *unit* variant: with this
/// mirror, `{"kind": "sym_per_channel", "group_size": 128}` is an error instead of silently
/// meaning per-channel. `group_size` is required (an integer, or `null` for per channel).
#[allow(non_camel_case_types)]
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum FormatRepr {
    SymPerChannel {},
    AsymGroup {
        #[serde(deserialize_with = "required")]
        group_size: Option<usize>,
    },
    Nf3 {
        #[serde(deserialize_with = "required")]
        group_size: Option<usize>,
    },
    Nf4 {
        #[serde(deserialize_with = "required")]
        group_size: Option<usize>,
    },
    #[serde(rename = "q4_0")]
    Q4_0 {},
    #[serde(rename = "q4_1")]
    Q4_1 {},
    #[serde(rename = "q8_0")]
    Q8_0 {},
}

/// An `Option` field that must be present (`null` allowed): with `deserialize_with`, serde
/// reports a missing field instead of defaulting it to `None`.
fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    Option::<usize>::deserialize(d)
}

impl From<FormatRepr> for WeightFormat {
    fn from(r: FormatRepr) -> Self {
        match r {
            FormatRepr::SymPerChannel {} => Self::SymPerChannel,
            FormatRepr::AsymGroup { group_size } => Self::AsymGroup { group_size },
            FormatRepr::Nf3 { group_size } => Self::Nf3 { group_size },
            FormatRepr::Nf4 { group_size } => Self::Nf4 { group_size },
            FormatRepr::Q4_0 {} => Self::Ggml(GgmlType::Q4_0),
            FormatRepr::Q4_1 {} => Self::Ggml(GgmlType::Q4_1),
            FormatRepr::Q8_0 {} => Self::Ggml(GgmlType::Q8_0),
        }
    }
}

impl From<WeightFormat> for FormatRepr {
    fn from(f: WeightFormat) -> Self {
        match f {
            WeightFormat::SymPerChannel => Self::SymPerChannel {},
            WeightFormat::AsymGroup { group_size } => Self::AsymGroup { group_size },
            WeightFormat::Nf3 { group_size } => Self::Nf3 { group_size },
            WeightFormat::Nf4 { group_size } => Self::Nf4 { group_size },
            WeightFormat::Ggml(GgmlType::Q4_0) => Self::Q4_0 {},
            WeightFormat::Ggml(GgmlType::Q4_1) => Self::Q4_1 {},
            WeightFormat::Ggml(GgmlType::Q8_0) => Self::Q8_0 {},
        }
    }
}

impl WeightFormat {
    /// The serialized `kind`, e.g. `sym_per_channel`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::SymPerChannel => "sym_per_channel",
            Self::AsymGroup { .. } => "asym_group",
            Self::Nf3 { .. } => "nf3",
            Self::Nf4 { .. } => "nf4",
            Self::Ggml(t) => t.name(),
        }
    }

    /// The `group_size` field: `None` for per-output-channel formats (including `SymPerChannel`);
    /// the block size 32 for the GGUF grids (which have no such field).
    pub fn group_size(&self) -> Option<usize> {
        match *self {
            Self::SymPerChannel => None,
            Self::Ggml(_) => Some(BLOCK),
            Self::AsymGroup { group_size }
            | Self::Nf3 { group_size }
            | Self::Nf4 { group_size } => group_size,
        }
    }

    /// The number of inputs sharing one set of group parameters in a row of `in_features`
    /// (`in_features` itself for per-channel formats); `Err` says why the format does not fit.
    pub fn group_len(&self, in_features: usize) -> std::result::Result<usize, String> {
        match self.group_size() {
            None => Ok(in_features),
            Some(0) => Err("group size 0 (expected >= 1, or null for per output channel)".into()),
            Some(g) => match (in_features % g, self) {
                (0, _) => Ok(g),
                (_, Self::Ggml(t)) => Err(format!(
                    "{} block size {g} does not divide in_features {in_features} \
                     (keep the layer unquantized with an override, weight null)",
                    t.name().to_uppercase()
                )),
                _ => Err(format!(
                    "group size {g} does not divide in_features {in_features}"
                )),
            },
        }
    }

    /// The bit width the format requires (`nf3`: 3, `nf4`: 4), if it fixes one.
    pub fn required_bits(&self) -> Option<u8> {
        match self {
            Self::Nf3 { .. } => Some(3),
            Self::Nf4 { .. } => Some(4),
            Self::Ggml(t) => Some(t.bits()),
            Self::SymPerChannel | Self::AsymGroup { .. } => None,
        }
    }

    /// The gradient used when a weight quantizer does not name one: `minmax` for `asym_group`
    /// (as BitDistiller trains it), `ste` for the others.
    pub fn default_grad(&self) -> WeightGrad {
        match self {
            Self::AsymGroup { .. } => WeightGrad::MinMax,
            Self::SymPerChannel | Self::Nf3 { .. } | Self::Nf4 { .. } | Self::Ggml(_) => {
                WeightGrad::Ste
            }
        }
    }

    /// Checks that the format fits a weight of shape `[out_features, in_features]`; on failure
    /// returns what is wrong (e.g. a group size that does not divide `in_features`).
    pub fn check_shape(
        &self,
        _out_features: usize,
        in_features: usize,
    ) -> std::result::Result<(), String> {
        self.group_len(in_features).map(|_| ())
    }
}

impl fmt::Display for WeightFormat {
    /// `sym_per_channel`, `asym_group (group_size 128)`, `nf4 (group_size null)`, `q4_0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind_name())?;
        match self {
            Self::SymPerChannel | Self::Ggml(_) => Ok(()),
            _ => match self.group_size() {
                Some(g) => write!(f, " (group_size {g})"),
                None => f.write_str(" (group_size null)"),
            },
        }
    }
}

/// The gradient of a fake-quantized weight during training (the forward value is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightGrad {
    /// Straight-through estimator: the gradient with respect to the weight is the identity;
    /// scales and zero points carry no gradient (LLM-QAT).
    Ste,
    /// BitDistiller's `asym_group` gradient: round is straight-through, the clamp to the code
    /// range passes no gradient outside it, and the scale carries the gradient to the group's
    /// max and min (see `formats/scheme.md`). Only `asym_group` implements it.
    MinMax,
}

impl WeightGrad {
    /// The JSON name: `ste` or `minmax`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ste => "ste",
            Self::MinMax => "minmax",
        }
    }
}

/// The weight quantizer of a linear layer.
///
/// JSON: `{"bits": B, "format": {...}, "grad": G}`; `grad` is optional and absent means
/// [`WeightFormat::default_grad`], which is then also omitted when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "WeightQuantRepr", into = "WeightQuantRepr")]
pub struct WeightQuant {
    /// Bits per weight, `2..=8` (`nf3`: 3, `nf4`: 4).
    pub bits: u8,
    pub format: WeightFormat,
    /// Gradient in training; resolved (never "default") in memory.
    pub grad: WeightGrad,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightQuantRepr {
    bits: u8,
    format: WeightFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grad: Option<WeightGrad>,
}

impl From<WeightQuantRepr> for WeightQuant {
    fn from(r: WeightQuantRepr) -> Self {
        Self {
            bits: r.bits,
            format: r.format,
            grad: r.grad.unwrap_or_else(|| r.format.default_grad()),
        }
    }
}

impl From<WeightQuant> for WeightQuantRepr {
    fn from(w: WeightQuant) -> Self {
        Self {
            bits: w.bits,
            format: w.format,
            grad: (w.grad != w.format.default_grad()).then_some(w.grad),
        }
    }
}

impl WeightQuant {
    /// `bits`-bit weights of `format` with the format's default gradient.
    pub fn new(bits: u8, format: WeightFormat) -> Self {
        Self {
            bits,
            format,
            grad: format.default_grad(),
        }
    }

    /// Symmetric per-channel weights of `bits` bits (LLM-QAT).
    pub fn sym_per_channel(bits: u8) -> Self {
        Self::new(bits, WeightFormat::SymPerChannel)
    }

    /// Asymmetric MinMax weights of `bits` bits per group of `group_size` inputs (`None`: per
    /// output channel), BitDistiller's min/max gradient.
    pub fn asym_group(bits: u8, group_size: Option<usize>) -> Self {
        Self::new(bits, WeightFormat::AsymGroup { group_size })
    }

    /// NF3 (BitDistiller's n2f3) per group of `group_size` inputs.
    pub fn nf3(group_size: Option<usize>) -> Self {
        Self::new(3, WeightFormat::Nf3 { group_size })
    }

    /// NF4 (QLoRA) per group of `group_size` inputs.
    pub fn nf4(group_size: Option<usize>) -> Self {
        Self::new(4, WeightFormat::Nf4 { group_size })
    }

    /// llama.cpp's GGUF block grid `ty` (4 or 8 bits, blocks of 32).
    pub fn ggml(ty: GgmlType) -> Self {
        Self::new(ty.bits(), WeightFormat::Ggml(ty))
    }

    /// The same quantizer with gradient `grad`.
    pub fn with_grad(self, grad: WeightGrad) -> Self {
        Self { grad, ..self }
    }

    /// Shape-independent checks: bits in range and as the format requires, a non-zero group
    /// size, a gradient the format implements. `location` prefixes messages (may be empty).
    pub fn check(&self, location: &str) -> Result<(), QuantError> {
        check_bits(location, "weight", self.bits)?;
        if let Some(expected) = self.format.required_bits() {
            if self.bits != expected {
                return Err(QuantError::FormatBits {
                    location: location.to_string(),
                    format: self.format.kind_name(),
                    bits: self.bits,
                    expected,
                });
            }
        }
        if self.format.group_size() == Some(0) {
            return Err(QuantError::ZeroGroupSize {
                location: location.to_string(),
                format: self.format.kind_name(),
            });
        }
        let grad_ok = match self.grad {
            WeightGrad::Ste => true,
            WeightGrad::MinMax => matches!(self.format, WeightFormat::AsymGroup { .. }),
        };
        if !grad_ok {
            return Err(QuantError::UnsupportedGrad {
                location: location.to_string(),
                grad: self.grad.name(),
                format: self.format.kind_name(),
            });
        }
        Ok(())
    }
}
