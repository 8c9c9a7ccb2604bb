//! Asymmetric MinMax quantization per group of inputs (BitDistiller's `pseudo_quantize_tensor`,
//! format `asym_group`), with BitDistiller's min/max gradient.
//!
//! For each group of `g` consecutive inputs of a row of `w: [out, in]`, with `M = 2^bits - 1`:
//!
//! ```text
//! scale = f16(min(max(max - min, 1e-5) / M, 65504))        (IEEE division, then rounded to f16)
//! zero  = clamp(-round_half_even(min / scale), 0, M)       (an integer, computed with the f16 scale)
//! code  = clamp(round_half_even(w / scale) + zero, 0, M)
//! ŵ     = (code - zero) · scale
//! ```
//!
//! The tensor path here and the host path ([`asym_group_codes`], used by `codes`) perform the
//! same f32 operations, so their results agree bit for bit.

use crate::error::QuantError;
use crate::fake::{compute_dtype, f16_scale, round_half_even, ste, F16_MAX};
use crate::scheme::{MAX_BITS, MIN_BITS};
use crate::weight::WeightGrad;
use candle_core::{Result, Tensor};
use half::f16;

/// BitDistiller's lower bound on a group's range `max - min` (a constant group gets the
/// scale `1e-5 / M` instead of 0). Compared and applied in the computation dtype.
pub const RANGE_MIN: f64 = 1e-5;

/// `2^bits - 1`, the largest code of an asymmetric `bits`-bit quantizer (bits in 2..=8).
pub fn asym_max_int(bits: u8) -> std::result::Result<u8, QuantError> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(QuantError::BitsOutOfRange {
            location: String::new(),
            quantizer: "asym_group",
            bits,
            min: MIN_BITS,
            max: MAX_BITS,
        });
    }
    Ok(((1u16 << bits) - 1) as u8)
}

/// Fake-quantizes `w: [out, in]` with groups of `group` inputs (`group` divides `in`); value =
/// the packed model's weights in `w`'s dtype (computed in f32, or f64 for f64). Gradient:
/// [`WeightGrad::Ste`] = identity; [`WeightGrad::MinMax`] = BitDistiller's, through the clamp
/// and the scale to the group's max and min (`formats/scheme.md`, "Gradients").
pub(crate) fn fake_asym(w: &Tensor, bits: u8, group: usize, grad: WeightGrad) -> Result<Tensor> {
    let m = f64::from(asym_max_int(bits)?);
    let (out, inp) = w.dims2()?;
    let dt = compute_dtype("fake_weight", w.dtype())?;
    let x = w
        .detach()
        .to_dtype(dt)?
        .reshape((out, inp / group, group))?; // [o, n, g]
    let mx = x.max_keepdim(2)?; // [o, n, 1]
    let mn = x.min_keepdim(2)?;
    let range = (&mx - &mn)?;
    let m_t = Tensor::new(m, x.device())?.to_dtype(dt)?;
    let scale = f16_scale(&range.maximum(RANGE_MIN)?.broadcast_div(&m_t)?)?;
    let zero = round_half_even(&mn.broadcast_div(&scale)?)?
        .neg()?
        .clamp(0.0, m)?;
    let u = x.broadcast_div(&scale)?; // [o, n, g]
    let v = round_half_even(&u)?.broadcast_add(&zero)?;
    let code = v.clamp(0.0, m)?;
    // `+ 0.0` turns a -0 into +0, as the packed model (integer codes) has it.
    let value = (code.broadcast_sub(&zero)?.broadcast_mul(&scale)? + 0.0)?;
    if !w.track_op() {
        return value.reshape((out, inp))?.to_dtype(w.dtype());
    }
    match grad {
        WeightGrad::Ste => ste(w, &value.reshape((out, inp))?.to_dtype(w.dtype())?),
        WeightGrad::MinMax => {
            // ∂ŵ_j/∂w_i = inside_j·δ_ij + a_j·∂s/∂w_i with a_j = (code_j - zero) - inside_j·w_j/s
            // and ∂s/∂w_i = [range >= 1e-5]·(is_max_i/n_max - is_min_i/n_min)/M (ties share,
            // as torch's amax/amin). Realized as value + (sur - detach(sur)): exact in value.
            let inside = (v.ge(0.0)?.to_dtype(dt)? * v.le(m)?.to_dtype(dt)?)?;
            let a = (code.broadcast_sub(&zero)? - (&inside * &u)?)?;
            let is_max = x.broadcast_eq(&mx)?.to_dtype(dt)?;
            let is_min = x.broadcast_eq(&mn)?.to_dtype(dt)?;
            let k = (is_max.broadcast_div(&is_max.sum_keepdim(2)?)?
                - is_min.broadcast_div(&is_min.sum_keepdim(2)?)?)?
            .broadcast_mul(&range.ge(RANGE_MIN)?.to_dtype(dt)?)?
            .broadcast_div(&m_t)?;
            let xt = w.to_dtype(dt)?.reshape((out, inp / group, group))?; // tracked
            let s_t = (&xt * &k)?.sum_keepdim(2)?; // [o, n, 1], ∂s_t/∂w_i = k_i
            let sur = ((&inside * &xt)? + a.broadcast_mul(&s_t)?)?;
            let out_t = (value + (&sur - sur.detach())?)?;
            out_t.reshape((out, inp))?.to_dtype(w.dtype())
        }
    }
}

/// One group's asymmetric codes on the host, in f32 exactly as the tensor path of
/// [`fake_weight`](crate::fake::fake_weight) computes them: appends the codes of `xs` to `codes`
/// and returns the group's `(scale, zero)`; the value of code `c` is
/// [`asym_dequant`]`(c, zero, scale)` = `(c - zero) · scale`.
pub fn asym_group_codes(
    xs: &[f32],
    bits: u8,
    codes: &mut Vec<u8>,
) -> std::result::Result<(f16, u8), QuantError> {
    let m = f32::from(asym_max_int(bits)?);
    let mx = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mn = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let range = mx - mn;
    let range = if range < RANGE_MIN as f32 {
        RANGE_MIN as f32
    } else {
        range
    };
    let scale = f16::from_f32((range / m).min(F16_MAX as f32));
    let s = scale.to_f32();
    let zero = (-(mn / s).round_ties_even()).clamp(0.0, m);
    for &x in xs {
        let c = ((x / s).round_ties_even() + zero).clamp(0.0, m);
        codes.push(c as u8);
    }
    Ok((scale, zero as u8))
}

/// The value of asymmetric code `code` with the group's `scale` and `zero` (f32, as
/// [`fake_weight`](crate::fake::fake_weight) computes it).
pub fn asym_dequant(code: u8, zero: u8, scale: f16) -> f32 {
    (f32::from(code) - f32::from(zero)) * scale.to_f32()
}
