//! Integer codes and per-group parameters of a quantized weight, for packing: what a packed
//! model stores, and the f32 values it stands for.
//!
//! For an f32 weight `w`, `dequantize_codes(&quantize_codes(&w, wq)?, wq, dev)` equals
//! `fake_weight(&w, wq)` bit for bit (zeros are +0), for every format. Computed on the host in
//! plain Rust, with the same f32 operations as the tensor path. f16/bf16 weights are widened to
//! f32 (their `fake_weight` is the same values cast back); f64 weights are rounded to f32 first.
//!
//! Layout (row-major, `n_groups = in_features / group_size`):
//!
//! | format | `codes[o·in + i]` | `scales` | `zeros` |
//! |---|---|---|---|
//! | `sym_per_channel` | `q + qmax` in `0..=2·qmax` (offset binary) | `[out, 1]` | `None` |
//! | `asym_group` | code in `0..=2^bits - 1` | `[out, n_groups]` | `Some([out, n_groups])` |
//! | `nf3` | level index `0..=7` (3 = zero) | `[out, n_groups, 2]` = (max, \|min\|) | `None` |
//! | `nf4` | level index `0..=15` (7 = zero) | `[out, n_groups]` | `None` |
//! | `q4_0`, `q4_1` | code `0..=15` | `[out, n_blocks]` = `d` | `None` (`q4_1`: `mins` = `m`) |
//! | `q8_0` | `q + 128` in `1..=255` (offset binary) | `[out, n_blocks]` = `d` | `None` |
//!
//! (GGUF blocks: values as [`GgmlType::value`]; `d` of `q4_0` may be negative.)

use crate::asym::{asym_dequant, asym_group_codes, asym_max_int};
use crate::error::QuantError;
use crate::fake::{sym_dequant, sym_qmax, sym_row_codes};
use crate::ggml::GgmlType;
use crate::nf::{nf_dequant, nf_group_codes, NfGrid};
use crate::weight::{WeightFormat, WeightQuant};
use candle_core::{DType, Device, Result, Tensor};
use half::f16;

/// The integer codes and group parameters of a weight `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightCodes {
    pub out_features: usize,
    pub in_features: usize,
    /// Inputs per group (`in_features` for per-channel formats, `sym_per_channel` included).
    pub group_size: usize,
    /// `[out_features · in_features]`, row-major; meaning per format in the module docs.
    pub codes: Vec<u8>,
    /// `[out_features, n_groups]` (`nf3`: `[out_features, n_groups, 2]` = (max, |min|)).
    pub scales: Vec<f16>,
    /// `[out_features, n_groups]` integer zero points, `asym_group` only.
    pub zeros: Option<Vec<u8>>,
    /// `[out_features, n_groups]` f16 block minimums, `q4_1` only.
    pub mins: Option<Vec<f16>>,
}

impl WeightCodes {
    /// `in_features / group_size`.
    pub fn n_groups(&self) -> usize {
        self.in_features / self.group_size.max(1)
    }

    /// The f32 values the codes stand for, `[out_features · in_features]` row-major (what
    /// [`dequantize_codes`] returns as a tensor). Errors if the vectors do not fit the shape
    /// and format.
    pub fn dequantize(&self, wq: &WeightQuant) -> Result<Vec<f32>> {
        wq.check("")?;
        let (out, inp, g) = (self.out_features, self.in_features, self.group_size);
        let group = wq.format.group_len(inp).map_err(bad)?;
        if g != group {
            return Err(bad(format!(
                "group_size {g}, expected {group} for {}",
                wq.format
            ))
            .into());
        }
        let n = inp / g;
        let per_group = if matches!(wq.format, WeightFormat::Nf3 { .. }) {
            2
        } else {
            1
        };
        let want = [
            (self.codes.len(), out * inp, "codes"),
            (self.scales.len(), out * n * per_group, "scales"),
        ];
        for (len, expected, what) in want {
            if len != expected {
                return Err(bad(format!(
                    "{what} has {len} entries, expected {expected} for [{out}, {inp}] with {}",
                    wq.format
                ))
                .into());
            }
        }
        let zeros = match (&self.zeros, wq.format) {
            (Some(z), WeightFormat::AsymGroup { .. }) if z.len() == out * n => z.as_slice(),
            (z, WeightFormat::AsymGroup { .. }) => {
                let len = z.as_ref().map(|z| z.len());
                return Err(bad(format!(
                    "zeros {len:?}, expected {} entries for asym_group",
                    out * n
                ))
                .into());
            }
            (None, _) => &[],
            (Some(_), f) => {
                return Err(bad(format!("zeros given for format {f}, which has none")).into())
            }
        };
        let mins = match (&self.mins, wq.format) {
            (Some(m), WeightFormat::Ggml(GgmlType::Q4_1)) if m.len() == out * n => m.as_slice(),
            (None, f) if f != WeightFormat::Ggml(GgmlType::Q4_1) => &[],
            (m, f) => {
                let len = m.as_ref().map(|m| m.len());
                return Err(bad(format!(
                    "mins {len:?}, expected {} for {f}",
                    if f == WeightFormat::Ggml(GgmlType::Q4_1) {
                        format!("{} entries", out * n)
                    } else {
                        "none".to_string()
                    }
                ))
                .into());
            }
        };
        let qmax = sym_qmax(wq.bits)?;
        let max_code = match wq.format {
            WeightFormat::SymPerChannel => 2 * qmax,
            WeightFormat::AsymGroup { .. } => asym_max_int(wq.bits)?,
            WeightFormat::Nf3 { .. } => 7,
            WeightFormat::Nf4 { .. } => 15,
            WeightFormat::Ggml(t) => t.max_code(),
        };
        let out_of_range = |what: &str, v: &[u8]| {
            v.iter().position(|&c| c > max_code).map(|i| {
                bad(format!(
                    "{what}[{i}] = {} out of range 0..={max_code} for {} with bits {}",
                    v[i], wq.format, wq.bits
                ))
            })
        };
        if let Some(e) = out_of_range("codes", &self.codes).or(out_of_range("zeros", zeros)) {
            return Err(e.into());
        }
        let values = self.codes.iter().enumerate().map(|(i, &c)| {
            let grp = i / g; // = row · n + group within the row
            match wq.format {
                WeightFormat::SymPerChannel => sym_dequant(c, qmax, self.scales[grp]),
                WeightFormat::AsymGroup { .. } => asym_dequant(c, zeros[grp], self.scales[grp]),
                WeightFormat::Nf3 { .. } => {
                    let s = if c >= 3 {
                        self.scales[2 * grp]
                    } else {
                        self.scales[2 * grp + 1]
                    };
                    nf_dequant(NfGrid::Nf3, c, s)
                }
                WeightFormat::Nf4 { .. } => nf_dequant(NfGrid::Nf4, c, self.scales[grp]),
                WeightFormat::Ggml(t) => t.value(
                    c,
                    self.scales[grp],
                    mins.get(grp).copied().unwrap_or(f16::ZERO),
                ),
            }
        });
        Ok(values.collect())
    }
}

fn bad(what: String) -> QuantError {
    QuantError::BadTensor {
        op: "dequantize_codes",
        what,
    }
}

/// The codes and group parameters of `w: [out, in]` under `wq` (see the module docs).
pub fn quantize_codes(w: &Tensor, wq: &WeightQuant) -> Result<WeightCodes> {
    wq.check("")?;
    let (out, inp) = w.dims2()?;
    let g = wq
        .format
        .group_len(inp)
        .map_err(|what| QuantError::BadTensor {
            op: "quantize_codes",
            what: format!("weight [{out}, {inp}] with format {}: {what}", wq.format),
        })?;
    let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut codes = Vec::with_capacity(data.len());
    let mut scales = Vec::new();
    let mut zeros = Vec::new();
    let mut mins = Vec::new();
    for xs in data.chunks(g) {
        match wq.format {
            WeightFormat::SymPerChannel => scales.push(sym_row_codes(xs, wq.bits, &mut codes)?),
            WeightFormat::AsymGroup { .. } => {
                let (s, z) = asym_group_codes(xs, wq.bits, &mut codes)?;
                scales.push(s);
                zeros.push(z);
            }
            WeightFormat::Nf3 { .. } => nf_group_codes(NfGrid::Nf3, xs, &mut codes, &mut scales),
            WeightFormat::Nf4 { .. } => nf_group_codes(NfGrid::Nf4, xs, &mut codes, &mut scales),
            WeightFormat::Ggml(t) => {
                let b = t.quantize_block(xs);
                codes.extend_from_slice(&b.codes);
                scales.push(b.d);
                mins.push(b.m);
            }
        }
    }
    let zeros = matches!(wq.format, WeightFormat::AsymGroup { .. }).then_some(zeros);
    let mins = (wq.format == WeightFormat::Ggml(GgmlType::Q4_1)).then_some(mins);
    Ok(WeightCodes {
        out_features: out,
        in_features: inp,
        group_size: g,
        codes,
        scales,
        zeros,
        mins,
    })
}

/// The f32 weight `[out, in]` on `dev` that codes `c` of quantizer `wq` stand for.
pub fn dequantize_codes(c: &WeightCodes, wq: &WeightQuant, dev: &Device) -> Result<Tensor> {
    let values = c.dequantize(wq)?;
    Tensor::from_vec(values, (c.out_features, c.in_features), dev)
}
