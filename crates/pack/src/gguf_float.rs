//! The float type of a GGUF export's unquantized tensors ([`FloatType`]: F32, F16 or BF16) and
//! their encoding, with a count of the values that rounding changed.
//!
//! F16 and BF16 round to nearest, ties to even (the `half` crate, as llama.cpp's
//! `ggml_fp32_to_fp16` and `ggml_fp32_to_bf16` do for finite values). A finite value that F16
//! cannot hold (|x| ≥ 65520, which rounds to infinity) is an error, not a silent infinity.

use crate::gguf::{TYPE_BF16, TYPE_F16, TYPE_F32};
use serde::Serialize;
use std::fmt;

/// How a GGUF export stores the tensors that the scheme leaves unquantized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FloatType {
    /// Exact for every f32 student (the default).
    #[default]
    F32,
    /// Half the bytes; 11 significant bits, |x| < 65520.
    F16,
    /// Half the bytes; 8 significant bits, f32's range (exact for bf16 checkpoints).
    Bf16,
}

impl FloatType {
    /// The ggml type id.
    pub fn type_id(self) -> u32 {
        match self {
            Self::F32 => TYPE_F32,
            Self::F16 => TYPE_F16,
            Self::Bf16 => TYPE_BF16,
        }
    }

    /// llama.cpp's `llama_ftype` of a file whose weights are mostly of this type.
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,   // LLAMA_FTYPE_ALL_F32
            Self::F16 => 1,   // LLAMA_FTYPE_MOSTLY_F16
            Self::Bf16 => 32, // LLAMA_FTYPE_MOSTLY_BF16
        }
    }
}

impl fmt::Display for FloatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
        })
    }
}

/// What encoding one tensor did to its values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rounding {
    /// Values whose encoding differs from the f32 value (NaNs never count).
    pub changed: usize,
    /// The largest `|encoded − x| / |x|` over the changed values (0 if none).
    pub max_relative: f64,
}

/// `values` as little-endian F32 bytes (exact).
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `values` as little-endian `ty` bytes and what rounding did to them; `Err(i)` if F16 cannot
/// hold the finite value at index `i`.
pub fn encode(values: &[f32], ty: FloatType) -> Result<(Vec<u8>, Rounding), usize> {
    let mut r = Rounding::default();
    let mut note = |x: f32, y: f32| {
        if x != y && !x.is_nan() {
            r.changed += 1;
            let rel = f64::from((y - x).abs()) / f64::from(x.abs());
            r.max_relative = r.max_relative.max(rel);
        }
    };
    let bytes = match ty {
        FloatType::F32 => f32_bytes(values),
        FloatType::F16 => {
            let mut out = Vec::with_capacity(2 * values.len());
            for (i, &x) in values.iter().enumerate() {
                let h = half::f16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err(i);
                }
                note(x, h.to_f32());
                out.extend_from_slice(&h.to_le_bytes());
            }
            out
        }
        FloatType::Bf16 => {
            let mut out = Vec::with_capacity(2 * values.len());
            for &x in values {
                let b = half::bf16::from_f32(x);
                note(x, b.to_f32());
                out.extend_from_slice(&b.to_le_bytes());
            }
            out
        }
    };
    Ok((bytes, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halves(b: &[u8]) -> Vec<u16> {
        b.chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn f16_rounds_to_nearest_even_by_hand() {
        // f16 has 10 fraction bits: at 1.0 its step is 2^-10. 1 + 2^-11 is a tie → 1.0 (even);
        // 1 + 3·2^-11 is a tie → 1 + 2^-9 (fraction 2, even); 1 + 2^-10 is exact.
        let xs = [
            1.0f32,
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            1.0 + 2f32.powi(-10),
            -2.0,
            65504.0,
        ];
        let (b, r) = encode(&xs, FloatType::F16).unwrap();
        assert_eq!(halves(&b), [0x3C00, 0x3C00, 0x3C02, 0x3C01, 0xC000, 0x7BFF]);
        assert_eq!(r.changed, 2);
        // Both move by 2^-11; relative to the smaller value, 1 + 2^-11 → 1, it is larger.
        let want = 2f64.powi(-11) / (1.0 + 2f64.powi(-11));
        assert!((r.max_relative - want).abs() < 1e-15, "{}", r.max_relative);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_by_hand() {
        // bf16 has 7 fraction bits: 1 + 2^-8 is a tie → 1.0; 1 + 3·2^-8 → 1 + 2^-6 (fraction 2).
        let xs = [
            1.0f32,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            70000.0,
        ];
        let (b, r) = encode(&xs, FloatType::Bf16).unwrap();
        // 70000 is f32 0x4788_B800: the dropped half 0xB800 is above the tie 0x8000, so it rounds
        // up to 0x4789 = 1.0703125 · 2^16 = 70144.
        assert_eq!(halves(&b), [0x3F80, 0x3F80, 0x3F82, 0x4789]);
        assert_eq!(r.changed, 3);
    }

    #[test]
    fn f16_refuses_what_it_cannot_hold_and_f32_is_the_bytes() {
        assert_eq!(encode(&[1.0, -65520.0], FloatType::F16), Err(1));
        // 65519 still rounds to 65504; infinities and NaN pass through unchanged.
        let (_, r) = encode(&[65519.0, f32::INFINITY, f32::NAN], FloatType::F16).unwrap();
        assert_eq!(r.changed, 1);
        let (b, r) = encode(&[1.5, -0.0], FloatType::F32).unwrap();
        assert_eq!(b, [0, 0, 0xC0, 0x3F, 0, 0, 0, 0x80]);
        assert_eq!(r, Rounding::default());
    }
}
