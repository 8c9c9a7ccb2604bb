//! Fake quantization: quantize-dequantize as composed candle ops, with a straight-through estimator.
//!
//! Every function here returns full-precision tensors holding exactly the values a quantized
//! model holds (`q · scale`), so training sees the quantization error. Gradients use the
//! straight-through estimator (STE, as LLM-QAT's `SymQuantizer`): the backward pass treats
//! quantization as the identity (`asym_group` weights may use BitDistiller's min/max gradient
//! instead, see `asym`). Works for f32 and f64 on any device (no custom kernels); f16/bf16
//! inputs are quantized in f32 and the result is cast back.
//!
//! [`fake_weight`] dispatches on the weight format; this module holds the symmetric quantizer,
//! `asym` and `nf` the group formats.
//!
//! Symmetric quantizer over a "row" (the elements sharing one scale):
//!
//! ```text
//! qmax  = 2^(bits-1) - 1
//! scale = max|x_row| / qmax              (weights: then rounded to f16, see ScaleRounding)
//! q     = clamp(round_half_even(x / scale), -qmax, qmax)   (q = 0 where scale == 0)
//! out   = q · scale
//! ```

use crate::asym::{asym_max_int, fake_asym};
use crate::error::QuantError;
use crate::fused;
use crate::fused_asym;
use crate::fused_nf;
use crate::ggml::fake_ggml;
use crate::nf::{fake_nf, NfGrid};
use crate::scheme::{KvGranularity, KvQuant, WeightFormat, WeightQuant, MAX_BITS, MIN_BITS};
use candle_core::{DType, Result, Tensor};
use half::f16;

/// Largest finite f16; f16 scales saturate here instead of becoming infinite.
pub const F16_MAX: f64 = 65504.0;

/// How a scale is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleRounding {
    /// Keep the scale in the computation dtype (f32/f64): dynamic activation and KV scales,
    /// computed per token at run time.
    Exact,
    /// Round the scale to the nearest f16 (ties to even; saturating at [`F16_MAX`]) before
    /// quantizing: the packed model stores f16 weight scales, so fake quantization must use
    /// exactly those. A scale below the f16 subnormal range rounds to 0 and its row to zeros.
    F16,
}

/// `2^(bits-1) - 1`, the largest code of a symmetric `bits`-bit quantizer (bits in 2..=8).
pub fn sym_qmax(bits: u8) -> std::result::Result<u8, QuantError> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(QuantError::BitsOutOfRange {
            location: String::new(),
            quantizer: "quantizer",
            bits,
            min: MIN_BITS,
            max: MAX_BITS,
        });
    }
    Ok(((1u16 << (bits - 1)) - 1) as u8)
}

/// Rounds to the nearest integer, ties to even (like `torch.round` / IEEE `roundTiesToEven`);
/// candle's `round()` rounds ties away from zero. Any shape; no gradient (use through [`ste`]).
pub fn round_half_even(x: &Tensor) -> Result<Tensor> {
    let r = x.round()?; // ties away from zero
                        // |x - r| is exact for |x| < 2^(mantissa bits), so a tie is detected exactly.
    let tie = (x - &r)?.abs()?.eq(0.5)?;
    let half = (&r * 0.5)?;
    let odd = half.floor()?.ne(&half)?;
    // At a tie, r = x ± 0.5 and the other neighbour is 2x - r (exact), which is even if r is odd.
    let other = ((x * 2.0)? - &r)?;
    tie.where_cond(&odd.where_cond(&other, &r)?, &r)
}

/// The dtype quantization is computed in: f32/f64 as is, f16/bf16 in f32.
pub(crate) fn compute_dtype(op: &'static str, dtype: DType) -> Result<DType> {
    match dtype {
        DType::F32 | DType::F64 => Ok(dtype),
        DType::F16 | DType::BF16 => Ok(DType::F32),
        other => Err(QuantError::BadTensor {
            op,
            what: format!("dtype {other:?}, expected a float dtype (F32, F64, F16, BF16)"),
        }
        .into()),
    }
}

/// Symmetric quantization of `x` with one scale per row, where a row is all elements that share
/// the indices of the dims *not* in `reduce_dims`.
///
/// Returns `(q, scale)`: `q` has `x`'s shape and integer values in `-qmax..=qmax`; `scale` has
/// `x`'s shape with every dim of `reduce_dims` set to 1 (keepdim). Both are f64 for f64 input and
/// f32 otherwise. Rows whose scale is 0 (all-zero rows) give `q = 0`, never NaN. No gradient.
pub fn sym_quantize(
    x: &Tensor,
    bits: u8,
    reduce_dims: &[usize],
    rounding: ScaleRounding,
) -> Result<(Tensor, Tensor)> {
    let qmax = f64::from(sym_qmax(bits)?);
    let dt = compute_dtype("sym_quantize", x.dtype())?;
    let x = x.detach().to_dtype(dt)?;
    for (i, &d) in reduce_dims.iter().enumerate() {
        if d >= x.rank() || reduce_dims[..i].contains(&d) {
            let what = format!(
                "reduce dims {reduce_dims:?} must be distinct and < rank {} (shape {:?})",
                x.rank(),
                x.dims()
            );
            return Err(QuantError::BadTensor {
                op: "sym_quantize",
                what,
            }
            .into());
        }
    }
    let mut amax = x.abs()?;
    for &d in reduce_dims {
        amax = amax.max_keepdim(d)?;
    }
    // True division (not multiplication by 1/qmax), as the spec and the packer compute it.
    let qmax_t = Tensor::new(qmax, x.device())?.to_dtype(dt)?;
    let mut scale = amax.broadcast_div(&qmax_t)?;
    if rounding == ScaleRounding::F16 {
        scale = f16_scale(&scale)?;
    }
    let zero = scale.eq(0.0)?;
    let safe = zero.where_cond(&scale.ones_like()?, &scale)?;
    let q = round_half_even(&x.broadcast_div(&safe)?)?.clamp(-qmax, qmax)?;
    Ok((q, scale))
}

/// A scale rounded to the nearest f16 (ties to even, saturating at [`F16_MAX`]), returned in
/// its own dtype: what the packed model stores.
pub(crate) fn f16_scale(scale: &Tensor) -> Result<Tensor> {
    scale
        .minimum(F16_MAX)?
        .to_dtype(DType::F16)?
        .to_dtype(scale.dtype())
}

/// `q · scale` from [`sym_quantize`], in `x`'s dtype. Value only: no gradient reaches `x`.
pub fn sym_quant_dequant(
    x: &Tensor,
    bits: u8,
    reduce_dims: &[usize],
    rounding: ScaleRounding,
) -> Result<Tensor> {
    let (q, scale) = sym_quantize(x, bits, reduce_dims, rounding)?;
    q.broadcast_mul(&scale)?.to_dtype(x.dtype())
}

/// Straight-through estimator: the value of `q` with the gradient of `x` (identity).
///
/// `q` must have `x`'s shape and dtype and carry no graph of its own (compute it from
/// `x.detach()`). Computed as `q + (x - x.detach())`, which equals LLM-QAT's
/// `x + (q - x).detach()` in gradient but is bit-exactly `q` in value (`x - x` is exactly 0,
/// whereas `x + (q - x)` can differ from `q` by one ulp). If `x` is not tracked (inference),
/// returns `q` unchanged.
pub fn ste(x: &Tensor, q: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(q.clone());
    }
    q + (x - x.detach())?
}

/// Fake-quantizes a weight `w: [out, in]` with `wq`; value = the packed model's weights
/// (bit for bit the values `codes::dequantize_codes` gives for f32 weights, zeros as +0),
/// gradient as `wq.grad` says (identity for `ste`).
///
/// `SymPerChannel`: one f16-rounded scale per output channel (row); `AsymGroup`: see `asym`;
/// `Nf3`/`Nf4`: see `nf`; `Ggml` (llama.cpp's blocks): see `ggml` (untracked weights may hold
/// -0 there, as llama.cpp dequantizes them). Errors if `wq` fails [`WeightQuant::check`] or its
/// group size does
/// not divide `in`.
pub fn fake_weight(w: &Tensor, wq: &WeightQuant) -> Result<Tensor> {
    let group = checked_group(w, wq)?;
    let x = w.detach();
    let q = match wq.format {
        WeightFormat::SymPerChannel if fused::supported(w) => {
            // One CPU pass, same values (zeros +0), identity gradient.
            return fused::sym_fake_quant_rows(w, sym_qmax(wq.bits)?, ScaleRounding::F16);
        }
        WeightFormat::SymPerChannel => {
            // `+ 0.0` turns -0 into +0, as the packed model (integer codes) has it.
            (sym_quant_dequant(&x, wq.bits, &[1], ScaleRounding::F16)? + 0.0)?
        }
        WeightFormat::AsymGroup { .. } if fused_asym::supported(w) => {
            // One CUDA pass each way, the composed path's values.
            return fused_asym::fake_asym_group(w, asym_max_int(wq.bits)?, group, wq.grad, false);
        }
        WeightFormat::AsymGroup { .. } => return fake_asym(w, wq.bits, group, wq.grad),
        WeightFormat::Nf3 { .. } | WeightFormat::Nf4 { .. } if fused_nf::supported(w) => {
            // One CUDA pass, the composed path's values, identity gradient.
            return fused_nf::fake_nf_group(w, nf_grid(&wq.format), group, false);
        }
        WeightFormat::Nf3 { .. } => fake_nf(&x, NfGrid::Nf3, group)?,
        WeightFormat::Nf4 { .. } => fake_nf(&x, NfGrid::Nf4, group)?,
        WeightFormat::Ggml(ty) => return fake_ggml(w, ty),
    };
    ste(w, &q)
}

/// [`fake_weight`] in the compute dtype `dtype` (the layer's input dtype). Symmetric
/// per-channel weights go from f32 master weights to bf16 in one fused pass where
/// [`fused::supported_to`] holds, with the bits of quantizing and then casting (and the cast's
/// gradient), and so do `asym_group` and NF3/NF4 weights on CUDA ([`fused_asym::supported`],
/// [`fused_nf::supported`]); anything else is `fake_weight(w, wq)?.to_dtype(dtype)`.
pub fn fake_weight_in(w: &Tensor, wq: &WeightQuant, dtype: DType) -> Result<Tensor> {
    let fused_cast = matches!(wq.format, WeightFormat::SymPerChannel)
        && w.dtype() != dtype
        && w.rank() == 2
        && fused::supported_to(w, dtype);
    if fused_cast {
        wq.check("")?;
        return fused::sym_fake_quant_rows_to(w, sym_qmax(wq.bits)?, ScaleRounding::F16, dtype);
    }
    let group_kernel = match wq.format {
        WeightFormat::AsymGroup { .. } => fused_asym::supported(w),
        WeightFormat::Nf3 { .. } | WeightFormat::Nf4 { .. } => fused_nf::supported(w),
        _ => false,
    };
    if group_kernel && dtype == DType::BF16 {
        let group = checked_group(w, wq)?;
        return match wq.format {
            WeightFormat::AsymGroup { .. } => {
                fused_asym::fake_asym_group(w, asym_max_int(wq.bits)?, group, wq.grad, true)
            }
            _ => fused_nf::fake_nf_group(w, nf_grid(&wq.format), group, true),
        };
    }
    fake_weight(w, wq)?.to_dtype(dtype)
}

/// The group length of `wq` for the weight `w: [out, in]`, after [`WeightQuant::check`]; an
/// error names the shape and format where the group does not fit.
fn checked_group(w: &Tensor, wq: &WeightQuant) -> Result<usize> {
    wq.check("")?;
    let (out, inp) = w.dims2()?;
    Ok(wq
        .format
        .group_len(inp)
        .map_err(|what| QuantError::BadTensor {
            op: "fake_weight",
            what: format!("weight [{out}, {inp}] with format {}: {what}", wq.format),
        })?)
}

/// The grid of an NF format (NF3 for anything but NF4: callers pass NF formats only).
fn nf_grid(format: &WeightFormat) -> NfGrid {
    match format {
        WeightFormat::Nf4 { .. } => NfGrid::Nf4,
        _ => NfGrid::Nf3,
    }
}

/// One row's symmetric codes on the host, in f32 exactly as [`sym_quantize`] computes them for
/// weights (f16 scale): appends `q + qmax` (offset binary, `0..=2·qmax`) for each element of `xs`
/// to `codes` and returns the row's scale; the value of code `c` is [`sym_dequant`].
pub fn sym_row_codes(
    xs: &[f32],
    bits: u8,
    codes: &mut Vec<u8>,
) -> std::result::Result<f16, QuantError> {
    let qmax = f32::from(sym_qmax(bits)?);
    let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = f16::from_f32((amax / qmax).min(F16_MAX as f32));
    let s = scale.to_f32();
    let safe = if s == 0.0 { 1.0 } else { s };
    for &x in xs {
        let q = (x / safe).round_ties_even().clamp(-qmax, qmax);
        codes.push((q + qmax) as u8);
    }
    Ok(scale)
}

/// The value of symmetric code `code` (= `q + qmax`) with scale `scale`, as [`fake_weight`]
/// computes it.
pub fn sym_dequant(code: u8, qmax: u8, scale: f16) -> f32 {
    (f32::from(code) - f32::from(qmax)) * scale.to_f32()
}

/// Fake-quantizes activations `x: [.., in]` per token (one f32 scale per position, over the
/// last dim); gradient = identity.
pub fn fake_act(x: &Tensor, bits: u8) -> Result<Tensor> {
    let last = x
        .rank()
        .checked_sub(1)
        .ok_or_else(|| QuantError::BadTensor {
            op: "fake_act",
            what: "a scalar, expected [.., in]".into(),
        })?;
    if fused::supported(x) {
        return fused::sym_fake_quant_rows(x, sym_qmax(bits)?, ScaleRounding::Exact);
    }
    let q = sym_quant_dequant(&x.detach(), bits, &[last], ScaleRounding::Exact)?;
    ste(x, &q)
}

/// Fake-quantizes a k_proj/v_proj output `x: [batch, kv_heads, seq, head_dim]` per token with
/// `kq`; gradient = identity.
///
/// [`KvGranularity::Token`] (LLM-QAT): one f32 scale per (batch, position) over all
/// kv_heads × head_dim; [`KvGranularity::Head`]: one per (batch, kv head, position) over head_dim.
pub fn fake_kv(x: &Tensor, kq: KvQuant) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let qmax = sym_qmax(kq.bits)?;
    match kq.granularity {
        KvGranularity::Token => {
            if fused::supported(x) {
                // Rows = (batch, position): bring kv_heads next to head_dim, quantize, restore.
                let rows = x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?;
                let q = fused::sym_fake_quant_rows(&rows, qmax, ScaleRounding::Exact)?;
                return q.reshape((b, t, h, d))?.transpose(1, 2);
            }
            let q = sym_quant_dequant(&x.detach(), kq.bits, &[1, 3], ScaleRounding::Exact)?;
            ste(x, &q)
        }
        KvGranularity::Head => {
            if fused::supported(x) {
                // Rows = (batch, kv head, position): already the last dim.
                return fused::sym_fake_quant_rows(&x.contiguous()?, qmax, ScaleRounding::Exact);
            }
            let q = sym_quant_dequant(&x.detach(), kq.bits, &[3], ScaleRounding::Exact)?;
            ste(x, &q)
        }
    }
}
