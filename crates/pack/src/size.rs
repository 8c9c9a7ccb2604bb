//! The size report of a packed file: bytes by kind and bits per quantized weight, measured
//! (what the file holds) against theory (`b + 16/g`, `+ 16/g` for nf3, `+ 8/g` for asym zeros).

use crate::layout::LayerEntry;
use serde::Serialize;

/// Byte counts of a packed file's tensors and the bits per quantized weight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SizeReport {
    /// Packed codes (`.qweight`), row padding included.
    pub code_bytes: u64,
    /// f16 scales (`.scales`).
    pub scale_bytes: u64,
    /// u8 zero points (`.zeros`).
    pub zero_bytes: u64,
    /// Tensors stored as they are (embeddings, norms, full-precision layers).
    pub other_bytes: u64,
    pub quantized_layers: u64,
    /// `Σ out · in` over the quantized layers.
    pub quantized_weights: u64,
    /// `8 · (code + scale + zero bytes) / quantized_weights`.
    pub bits_per_weight: f64,
    /// The weighted mean of [`LayerEntry::theory_bits`].
    pub bits_per_weight_theory: f64,
    /// `Σ theory_bits · out · in` (for the running mean).
    #[serde(skip)]
    theory_sum: f64,
}

impl SizeReport {
    /// Counts one quantized layer of `entry`'s shape with the given tensor sizes.
    pub fn add_layer(
        &mut self,
        entry: &LayerEntry,
        code_bytes: usize,
        scale_bytes: usize,
        zero_bytes: usize,
    ) {
        let n = entry.num_weights() as u64;
        self.code_bytes += code_bytes as u64;
        self.scale_bytes += scale_bytes as u64;
        self.zero_bytes += zero_bytes as u64;
        self.quantized_layers += 1;
        self.quantized_weights += n;
        self.theory_sum += entry.theory_bits() * n as f64;
        self.bits_per_weight_theory = self.theory_sum / self.quantized_weights as f64;
        let packed = self.code_bytes + self.scale_bytes + self.zero_bytes;
        self.bits_per_weight = 8.0 * packed as f64 / self.quantized_weights as f64;
    }

    /// Counts a tensor stored as it is.
    pub fn add_other(&mut self, bytes: usize) {
        self.other_bytes += bytes as u64;
    }

    /// `bits_per_weight / bits_per_weight_theory - 1` (row padding only).
    pub fn overhead(&self) -> f64 {
        self.bits_per_weight / self.bits_per_weight_theory - 1.0
    }
}
