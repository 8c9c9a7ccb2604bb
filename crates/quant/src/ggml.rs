//! GGUF block grids (llama.cpp's `Q4_0`, `Q4_1`, `Q8_0`): weights quantized exactly as
//! llama.cpp's reference quantizers (`quantize_row_q4_0_ref`, `_q4_1_ref`, `_q8_0_ref` in
//! ggml-quants.c) do, dequantized exactly as llama.cpp runs them, and encoded as its block bytes.
//!
//! A row of `w: [out, in]` is cut into blocks of [`BLOCK`] = 32 consecutive inputs (32 must
//! divide `in`). Per block, in IEEE f32 (no fused multiply-add), with `f16(.)` = round to the
//! nearest f16, ties to even:
//!
//! ```text
//! Q4_0: max = the first x with the largest |x|;  d = max / -8;  id = d != 0 ? 1/d : 0
//!       code = min(15, trunc(x·id + 8.5))              value = (code - 8) · f16(d)
//! Q4_1: min, max of the block;  d = (max - min) / 15;  id = d != 0 ? 1/d : 0
//!       code = min(15, trunc((x - min)·id + 0.5))      value = code · f16(d) + f16(min)
//! Q8_0: amax = max |x|;  d = amax / 127;  id = d != 0 ? 1/d : 0
//!       q = round_half_away(x·id) in -127..=127         value = q · f16(d)
//! ```
//!
//! Codes are computed with the f32 `d` (and `min`) while values use the stored f16 ones, as in
//! llama.cpp; so the fake-quantized weight is bit for bit what llama.cpp dequantizes (including
//! `-0` for a `Q4_0` code 8 in a block whose `d` is negative). `fake_ggml` (below) computes on the host
//! (the weight is copied to the CPU and back), with the straight-through gradient.

use crate::codes::WeightCodes;
use crate::fake::ste;
use candle_core::{DType, Result, Tensor};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Weights per block (`QK4_0 = QK4_1 = QK8_0 = 32` in ggml).
pub const BLOCK: usize = 32;

/// A GGUF block format that qat trains on and exports losslessly.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GgmlType {
    /// 4-bit codes with offset 8, one f16 scale `d` per block (may be negative).
    Q4_0,
    /// 4-bit codes, one f16 scale `d` and one f16 minimum `m` per block.
    Q4_1,
    /// 8-bit signed codes, one f16 scale `d` per block.
    Q8_0,
}

/// One quantized block: its f16 scale and minimum (`Q4_1` only; +0 otherwise) and 32 codes
/// (`Q4_0`/`Q4_1`: `0..=15`; `Q8_0`: `q + 128`, offset binary).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgmlBlock {
    pub d: f16,
    pub m: f16,
    pub codes: [u8; BLOCK],
}

impl GgmlType {
    pub const ALL: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

    /// The scheme `kind` and short name part, lower case: `q4_0`, `q4_1`, `q8_0`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
        }
    }

    /// Bits per code (4 or 8).
    pub fn bits(self) -> u8 {
        match self {
            Self::Q4_0 | Self::Q4_1 => 4,
            Self::Q8_0 => 8,
        }
    }

    /// The `ggml_type` id stored in a GGUF tensor info (`GGML_TYPE_Q4_0 = 2`, `Q4_1 = 3`,
    /// `Q8_0 = 8`).
    pub fn type_id(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    /// Bytes of one encoded block (`sizeof(block_q4_0)` = 18, `block_q4_1` = 20, `block_q8_0` = 34).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + BLOCK / 2,
            Self::Q4_1 => 4 + BLOCK / 2,
            Self::Q8_0 => 2 + BLOCK,
        }
    }

    /// The largest valid code (15, or 255 for `Q8_0`, whose reference quantizer writes 1..=255).
    pub fn max_code(self) -> u8 {
        match self {
            Self::Q4_0 | Self::Q4_1 => 15,
            Self::Q8_0 => 255,
        }
    }

    /// Quantizes one block of [`BLOCK`] weights as llama.cpp's reference quantizer does.
    pub fn quantize_block(self, xs: &[f32]) -> GgmlBlock {
        debug_assert_eq!(xs.len(), BLOCK);
        let mut codes = [0u8; BLOCK];
        let recip = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
        match self {
            Self::Q4_0 => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in xs {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = recip(d);
                for (c, &x) in codes.iter_mut().zip(xs) {
                    *c = ((x * id + 8.5) as i8).clamp(0, 15) as u8;
                }
                GgmlBlock {
                    d: f16::from_f32(d),
                    m: f16::ZERO,
                    codes,
                }
            }
            Self::Q4_1 => {
                let (mut min, mut max) = (f32::MAX, -f32::MAX);
                for &v in xs {
                    if v < min {
                        min = v;
                    }
                    if v > max {
                        max = v;
                    }
                }
                let d = (max - min) / 15.0;
                let id = recip(d);
                for (c, &x) in codes.iter_mut().zip(xs) {
                    *c = (((x - min) * id + 0.5) as i8).clamp(0, 15) as u8;
                }
                GgmlBlock {
                    d: f16::from_f32(d),
                    m: f16::from_f32(min),
                    codes,
                }
            }
            Self::Q8_0 => {
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = recip(d);
                for (c, &x) in codes.iter_mut().zip(xs) {
                    // f32::round rounds half away from zero, as C's roundf.
                    let q = (x * id).round() as i8;
                    *c = (i16::from(q) + 128) as u8;
                }
                GgmlBlock {
                    d: f16::from_f32(d),
                    m: f16::ZERO,
                    codes,
                }
            }
        }
    }

    /// The value of `code` in a block with scale `d` and minimum `m`, as llama.cpp's
    /// `dequantize_row_*` computes it (f32; the product is exact, `Q4_1`'s sum rounds once).
    pub fn value(self, code: u8, d: f16, m: f16) -> f32 {
        match self {
            Self::Q4_0 => (f32::from(code) - 8.0) * d.to_f32(),
            Self::Q4_1 => f32::from(code) * d.to_f32() + m.to_f32(),
            Self::Q8_0 => (f32::from(code) - 128.0) * d.to_f32(),
        }
    }

    /// Appends the block's bytes in ggml's layout: `d` (f16 LE), `Q4_1`: `m`, then the codes;
    /// 4-bit codes two per byte, code `j` in the low nibble and code `j + 16` in the high nibble
    /// of byte `j`; `Q8_0`: one signed byte per code.
    pub fn encode(self, b: &GgmlBlock, out: &mut Vec<u8>) {
        out.extend_from_slice(&b.d.to_le_bytes());
        if self == Self::Q4_1 {
            out.extend_from_slice(&b.m.to_le_bytes());
        }
        match self {
            Self::Q4_0 | Self::Q4_1 => {
                let (lo, hi) = b.codes.split_at(BLOCK / 2);
                out.extend(lo.iter().zip(hi).map(|(l, h)| l | (h << 4)));
            }
            Self::Q8_0 => out.extend(b.codes.iter().map(|&c| c ^ 0x80)),
        }
    }

    /// The encoded blocks of a row-major `[rows, n]` matrix (`n` a multiple of [`BLOCK`]).
    pub fn quantize_rows(self, data: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() / BLOCK * self.block_bytes());
        for xs in data.chunks(BLOCK) {
            self.encode(&self.quantize_block(xs), &mut out);
        }
        out
    }

    /// The dequantized values of `data` (a multiple of [`BLOCK`] long): quantize, then dequantize.
    pub fn quant_dequant(self, data: &[f32]) -> Vec<f32> {
        data.par_chunks(BLOCK)
            .flat_map_iter(|xs| {
                let b = self.quantize_block(xs);
                b.codes.into_iter().map(move |c| self.value(c, b.d, b.m))
            })
            .collect()
    }
}

/// The GGUF type that holds a symmetric per-channel weight of `bits` bits exactly (codes
/// `-qmax..=qmax`): `Q4_0` (codes `-8..=7`) up to 4 bits, `Q8_0` (`-127..=127`) up to 8.
pub fn sym_channel_type(bits: u8) -> GgmlType {
    if bits <= 4 {
        GgmlType::Q4_0
    } else {
        GgmlType::Q8_0
    }
}

/// The codes of a symmetric per-channel weight (`sym_per_channel`, `bits` bits:
/// [`crate::quantize_codes`], offset binary `q + qmax`, one f16 scale per row; `in_features` a
/// multiple of [`BLOCK`]) as blocks of [`sym_channel_type`]`(bits)`: every block of a row has the
/// row's scale as `d`, and code `q` is stored as `Q4_0` code `q + 8` or as `Q8_0`'s `q`.
/// llama.cpp's value `(code - 8)·d` or `q·d` is then `q · scale`, the fake-quantized value
/// ([`crate::WeightCodes::dequantize`]) bit for bit.
pub fn sym_channel_blocks(c: &WeightCodes, bits: u8) -> Result<Vec<u8>> {
    let n = c.in_features;
    if c.group_size != n || !n.is_multiple_of(BLOCK) || c.scales.len() != c.out_features {
        candle_core::bail!(
            "sym_channel_blocks: codes of [{}, {n}] in groups of {} with {} scales, expected one \
             scale per row and rows of a multiple of {BLOCK}",
            c.out_features,
            c.group_size,
            c.scales.len()
        );
    }
    let ty = sym_channel_type(bits);
    let qmax = i16::from(crate::fake::sym_qmax(bits).map_err(candle_core::Error::wrap)?);
    let offset = match ty {
        GgmlType::Q8_0 => 128,
        _ => 8,
    };
    let mut out = Vec::with_capacity(c.codes.len() / BLOCK * ty.block_bytes());
    for (row, &d) in c.codes.chunks(n).zip(&c.scales) {
        for block in row.chunks(BLOCK) {
            let mut b = GgmlBlock {
                d,
                m: f16::from_f32(0.0),
                codes: [0; BLOCK],
            };
            for (slot, &code) in b.codes.iter_mut().zip(block) {
                *slot = (i16::from(code) - qmax + offset) as u8;
            }
            ty.encode(&b, &mut out);
        }
    }
    Ok(out)
}

/// Fake-quantizes `w: [out, in]` (`in` a multiple of [`BLOCK`], checked by the caller) on the
/// `ty` grid: value = what llama.cpp dequantizes, in `w`'s dtype (computed in f32 for every
/// dtype, as llama.cpp quantizes f32); gradient = identity (straight-through).
pub(crate) fn fake_ggml(w: &Tensor, ty: GgmlType) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let data = w
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let values = ty.quant_dequant(&data);
    let q = Tensor::from_vec(values, (out, inp), w.device())?.to_dtype(w.dtype())?;
    ste(w, &q)
}
