//! What a packed file holds for each linear layer: tensor names, dtypes and shapes, the valid
//! code ranges and the theoretical size (`formats/packed.md`, sections 3-5 and 7).

use qat_model::{LinearId, LinearKind, LlamaConfig};
use qat_quant::{linear_shape, Scheme, WeightFormat, WeightQuant};
use serde::{Deserialize, Deserializer, Serialize};

/// The packed weights file inside a packed model directory.
pub const PACKED_FILE: &str = "model.packed.safetensors";
/// `codebook` of `nf3` layers: BitDistiller's n2f3 levels (`qat_quant::NF3_LEVELS`).
pub const CODEBOOK_NF3: &str = "bitdistiller-n2f3";
/// `codebook` of `nf4` layers: QLoRA's NormalFloat4 levels (`qat_quant::NF4_LEVELS`).
pub const CODEBOOK_NF4: &str = "qlora-nf4";

/// One entry of the metadata `qat.layers`: a quantized linear layer and its resolved quantizer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    /// Tensor name prefix, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u8,
    /// `sym_per_channel`, `asym_group`, `nf3` or `nf4`.
    pub format: String,
    /// Inputs per group (`in_features` for per-channel layers).
    pub group_size: usize,
    /// [`CODEBOOK_NF3`] / [`CODEBOOK_NF4`] for NF formats, else `None` (JSON `null`, required).
    #[serde(deserialize_with = "required")]
    pub codebook: Option<String>,
}

fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// A quantized layer of a model: where it is, its quantizer, and its entry in `qat.layers`.
#[derive(Debug, Clone)]
pub struct QuantLayer {
    pub id: LinearId,
    pub wq: WeightQuant,
    pub entry: LayerEntry,
}

/// The tensor name prefix of a linear layer: `model.layers.{l}.{self_attn|mlp}.{kind}`.
pub fn prefix(id: LinearId) -> String {
    format!("model.layers.{}.{}", id.layer, id.kind.checkpoint_path())
}

impl LayerEntry {
    /// The entry of layer `id` of a model with config `cfg` under weight quantizer `wq`.
    /// `Err` says why `wq` does not fit the layer's shape.
    pub fn new(id: LinearId, cfg: &LlamaConfig, wq: &WeightQuant) -> Result<Self, String> {
        let (out_features, in_features) = linear_shape(cfg, id.kind);
        let group_size = wq.format.group_len(in_features)?;
        let codebook = match wq.format {
            WeightFormat::Nf3 { .. } => Some(CODEBOOK_NF3.to_string()),
            WeightFormat::Nf4 { .. } => Some(CODEBOOK_NF4.to_string()),
            WeightFormat::SymPerChannel | WeightFormat::AsymGroup { .. } => None,
            WeightFormat::Ggml(t) => {
                return Err(format!(
                    "weight format {} is a GGUF block format, which the packed format does not \
                     store; export it with qat-pack --format gguf",
                    t.name()
                ))
            }
        };
        Ok(Self {
            name: prefix(id),
            out_features,
            in_features,
            bits: wq.bits,
            format: wq.format.kind_name().to_string(),
            group_size,
            codebook,
        })
    }

    pub fn qweight_name(&self) -> String {
        format!("{}.qweight", self.name)
    }

    pub fn scales_name(&self) -> String {
        format!("{}.scales", self.name)
    }

    pub fn zeros_name(&self) -> String {
        format!("{}.zeros", self.name)
    }

    pub fn n_groups(&self) -> usize {
        self.in_features / self.group_size.max(1)
    }

    pub fn bytes_per_row(&self) -> usize {
        crate::bits::bytes_per_row(self.in_features, self.bits)
    }

    pub fn is_nf3(&self) -> bool {
        self.format == "nf3"
    }

    pub fn has_zeros(&self) -> bool {
        self.format == "asym_group"
    }

    pub fn qweight_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.bytes_per_row()]
    }

    /// `[out, n_groups]`, or `[out, n_groups, 2]` for `nf3` (`s_pos`, `s_neg`).
    pub fn scales_shape(&self) -> Vec<usize> {
        let mut s = vec![self.out_features, self.n_groups()];
        if self.is_nf3() {
            s.push(2);
        }
        s
    }

    pub fn zeros_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.n_groups()]
    }

    /// The largest valid code: `2^b - 2` for `sym_per_channel` (offset binary `q + qmax`),
    /// `2^b - 1` otherwise.
    pub fn max_code(&self) -> u8 {
        let all = ((1u16 << self.bits) - 1) as u8;
        if self.format == "sym_per_channel" {
            all - 1
        } else {
            all
        }
    }

    /// The largest valid zero point (`asym_group`): `2^b - 1`.
    pub fn max_zero(&self) -> u8 {
        ((1u16 << self.bits) - 1) as u8
    }

    pub fn num_weights(&self) -> usize {
        self.out_features * self.in_features
    }

    /// Bits per weight in theory: `b + 16/g` (+ `16/g` for `nf3`'s second scale, + `8/g` for
    /// `asym_group` zeros), without row padding.
    pub fn theory_bits(&self) -> f64 {
        let g = self.group_size as f64;
        let scales = if self.is_nf3() { 32.0 } else { 16.0 };
        let zeros = if self.has_zeros() { 8.0 } else { 0.0 };
        f64::from(self.bits) + (scales + zeros) / g
    }
}

/// Every linear layer of a model with config `cfg` in model order (block 0 q, k, v, o, gate,
/// up, down, then block 1, ...).
pub fn linear_ids(cfg: &LlamaConfig) -> Vec<LinearId> {
    (0..cfg.num_layers)
        .flat_map(|layer| {
            LinearKind::ALL
                .into_iter()
                .map(move |kind| LinearId { layer, kind })
        })
        .collect()
}

/// The layers `scheme` quantizes, in model order, with their entries. `Err((layer, what))` if a
/// layer's quantizer does not fit its shape (`Scheme::validate_for` catches this first).
pub fn quantized_layers(
    cfg: &LlamaConfig,
    scheme: &Scheme,
) -> Result<Vec<QuantLayer>, (String, String)> {
    linear_ids(cfg)
        .into_iter()
        .filter_map(|id| scheme.resolve(id).weight.map(|wq| (id, wq)))
        .map(|(id, wq)| {
            let entry = LayerEntry::new(id, cfg, &wq).map_err(|what| (id.to_string(), what))?;
            Ok(QuantLayer { id, wq, entry })
        })
        .collect()
}

/// Names and shapes of the tensors stored as they are: everything [`LlamaConfig::expected_tensors`]
/// lists except the weights of quantized layers.
pub fn plain_tensors(cfg: &LlamaConfig, quantized: &[QuantLayer]) -> Vec<(String, Vec<usize>)> {
    let packed: std::collections::HashSet<String> = quantized
        .iter()
        .map(|q| format!("{}.weight", q.entry.name))
        .collect();
    cfg.expected_tensors()
        .into_iter()
        .filter(|(name, _)| !packed.contains(name))
        .collect()
}
