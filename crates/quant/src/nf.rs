//! NormalFloat grids per group of inputs: BitDistiller's NF3 ("n2f3", separate scales for the
//! positive and the negative weights of a group) and QLoRA's NF4 (one absmax scale per group).
//!
//! A weight `x` of a group is divided by its scale (`u = x / s`, `u = 0` where `s = 0`), mapped
//! to the index of a level by counting the thresholds it passes, and dequantized as
//! `level[index] · s`. Scales are rounded to f16 (saturating at 65504) before use, as the packed
//! model stores them. The tensor path (`fake_nf`, behind [`crate::fake::fake_weight`]) and the
//! host path ([`nf_group_codes`], used by `codes`) perform the same f32 operations, so they agree
//! bit for bit.

use crate::fake::{compute_dtype, f16_scale, F16_MAX};
use candle_core::{DType, Result, Tensor};
use half::f16;

/// BitDistiller's n2f3 levels (`SteN2F3Quantizer.round_n2f3`), ascending; index = code. Each
/// is the f32 nearest to the reference's decimal (given in the comment), as PyTorch makes it.
pub const NF3_LEVELS: [f32; 8] = [
    -1.0,        // -1.0
    -0.53502274, // -0.5350227355957031
    -0.2469314,  // -0.2469314038753510
    0.0,         // 0
    0.18333752,  // 0.1833375245332718
    0.38199395,  // 0.3819939494132996
    0.62298566,  // 0.6229856610298157
    1.0,         // 1.0
];

/// BitDistiller's n2f3 thresholds (midpoints of consecutive levels): `u >= T[k]` moves `u`
/// above level `k`, so a value exactly at a threshold takes the upper level (for the negative
/// thresholds too: `q_neg >= -0.1234657019376755` becomes 0). Compared in f32: PyTorch compares
/// a float32 tensor with a Python float in float32, so each is the f32 of the decimal's f64.
pub const NF3_THRESHOLDS: [f32; 7] = [
    -0.76751137, // -0.7675113677978516
    -0.39097708, // -0.39097706973552704
    -0.1234657,  // -0.1234657019376755
    0.09166876,  // 0.0916687622666359
    0.28266573,  // 0.2826657369732857
    0.5024898,   // 0.5024898052215576
    0.8114928,   // 0.8114928305149078
];

/// QLoRA's NormalFloat4 levels (bitsandbytes `dDequantizeNF4`), ascending; index = code.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,         // -1.0
    -0.6961928,   // -0.6961928009986877
    -0.52507305,  // -0.5250730514526367
    -0.3949175,   // -0.39491748809814453
    -0.28444138,  // -0.28444138169288635
    -0.18477343,  // -0.18477343022823334
    -0.091050036, // -0.09105003625154495
    0.0,          // 0
    0.0795803,    // 0.07958029955625534
    0.1609302,    // 0.16093020141124725
    0.2461123,    // 0.24611230194568634
    0.33791524,   // 0.33791524171829224
    0.44070983,   // 0.44070982933044434
    0.562617,     // 0.5626170039176941
    0.72295684,   // 0.7229568362236023
    1.0,          // 1.0
];

/// bitsandbytes' NF4 decision thresholds (`dQuantizeNF4`): `u > T[k]` moves `u` above level
/// `k`, so a value exactly at a threshold takes the lower level. They are C `float` literals
/// (e.g. `0.8614784181118011f`), i.e. the f32 nearest to the decimal itself, which for four of
/// them differs from the f32 of the decimal's f64.
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.84809643,  // -0.8480964004993439
    -0.6106329,   // -0.6106329262256622
    -0.45999527,  // -0.4599952697753906
    -0.33967942,  // -0.33967943489551544
    -0.2346074,   // -0.23460740596055984
    -0.13791174,  // -0.13791173323988914
    -0.045525018, // -0.045525018125772476
    0.03979015,   // 0.03979014977812767
    0.120255254,  // 0.1202552504837513
    0.20352125,   // 0.2035212516784668
    0.29201376,   // 0.2920137718319893
    0.38931254,   // 0.3893125355243683
    0.5016634,    // 0.5016634166240692
    0.6427869,    // 0.6427869200706482
    0.8614784,    // 0.8614784181118011
];

/// A NormalFloat grid: levels, thresholds and how a value at a threshold is assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NfGrid {
    /// [`NF3_LEVELS`]; two scales per group (max for `x >= 0`, |min| for `x < 0`).
    Nf3,
    /// [`NF4_LEVELS`]; one scale per group (max |x|).
    Nf4,
}

impl NfGrid {
    pub fn levels(self) -> &'static [f32] {
        match self {
            Self::Nf3 => &NF3_LEVELS,
            Self::Nf4 => &NF4_LEVELS,
        }
    }

    pub fn thresholds(self) -> &'static [f32] {
        match self {
            Self::Nf3 => &NF3_THRESHOLDS,
            Self::Nf4 => &NF4_THRESHOLDS,
        }
    }

    /// Whether `u` passes threshold `t` only if strictly above it (NF4) or also at it (NF3).
    fn strict(self) -> bool {
        self == Self::Nf4
    }

    /// The level index (= code) of a scaled value `u`.
    pub fn index(self, u: f32) -> u8 {
        let t = self.thresholds().iter();
        let n = if self.strict() {
            t.filter(|&&t| u > t).count()
        } else {
            t.filter(|&&t| u >= t).count()
        };
        n as u8
    }
}

/// The value of a group's NF weights `x̂ = level[index(x / s)] · s` for `w: [out, in]` with
/// groups of `group` inputs, in `w`'s dtype (computed in f32, or f64 for f64). No gradient.
pub(crate) fn fake_nf(w: &Tensor, grid: NfGrid, group: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let dt = compute_dtype("fake_weight", w.dtype())?;
    let x = w
        .detach()
        .to_dtype(dt)?
        .reshape((out, inp / group, group))?; // [o, n, g]
    let s = match grid {
        NfGrid::Nf3 => {
            let s_pos = f16_scale(&x.max_keepdim(2)?.abs()?)?.broadcast_as(x.shape())?;
            let s_neg = f16_scale(&x.min_keepdim(2)?.abs()?)?.broadcast_as(x.shape())?;
            x.ge(0.0)?.where_cond(&s_pos, &s_neg)?
        }
        NfGrid::Nf4 => f16_scale(&x.abs()?.max_keepdim(2)?)?.broadcast_as(x.shape())?,
    };
    let s_zero = s.eq(0.0)?;
    let zeros = x.zeros_like()?;
    let safe = s_zero.where_cond(&x.ones_like()?, &s)?;
    let u = s_zero.where_cond(&zeros, &(&x / &safe)?)?;
    // u8 count of the thresholds passed; f64::from(t) is exact and converts back to `dt` exactly.
    let passed = |t: f32| {
        if grid.strict() {
            u.gt(f64::from(t))
        } else {
            u.ge(f64::from(t))
        }
    };
    let (first, rest) = grid.thresholds().split_at(1);
    let mut index = passed(first[0])?;
    for &t in rest {
        index = (index + passed(t)?)?;
    }
    let levels = Tensor::new(grid.levels(), x.device())?.to_dtype(dt)?;
    let level = levels
        .index_select(&index.flatten_all()?.to_dtype(DType::U32)?, 0)?
        .reshape(x.shape())?;
    (level * s)?.reshape((out, inp))?.to_dtype(w.dtype())
}

/// One group's NF codes on the host, in f32 exactly as `fake_nf` computes them: appends the
/// codes (level indices) of `xs` to `codes` and the group's f16 scales to `scales` (NF3: max
/// then |min|; NF4: max |x|). The value of code `c` with scale `s` is [`nf_dequant`].
pub fn nf_group_codes(grid: NfGrid, xs: &[f32], codes: &mut Vec<u8>, scales: &mut Vec<f16>) {
    let round = |a: f32| f16::from_f32(a.min(F16_MAX as f32));
    let mx = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mn = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let (s_pos, s_neg) = match grid {
        NfGrid::Nf3 => (round(mx.abs()), round(mn.abs())),
        NfGrid::Nf4 => {
            let s = round(mx.abs().max(mn.abs()));
            (s, s)
        }
    };
    scales.push(s_pos);
    if grid == NfGrid::Nf3 {
        scales.push(s_neg);
    }
    for &x in xs {
        let s = if x >= 0.0 { s_pos } else { s_neg }.to_f32();
        let u = if s == 0.0 { 0.0 } else { x / s };
        codes.push(grid.index(u));
    }
}

/// The value of NF code `code` with scale `scale` (NF3: the group's positive scale for codes
/// above the zero level 3, the negative scale below it; either for 3), as `fake_nf` computes it.
pub fn nf_dequant(grid: NfGrid, code: u8, scale: f16) -> f32 {
    grid.levels()[usize::from(code)] * scale.to_f32()
}
