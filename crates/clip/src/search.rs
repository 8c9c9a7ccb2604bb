//! The clipping grid search of one linear layer: for every group of `group` consecutive inputs of
//! every output row, the pair (max shrink, min shrink) whose clamped-then-quantized weights change
//! the group's partial outputs on calibration inputs least (BitDistiller's `auto_2clip_layer`).
//!
//! For row `o`, group `g`, inputs `x_n` (n = 1..N) and weights `w` (original) / `ŵ` (clamped to
//! `[min·r_min, max·r_max]`, then fake-quantized), the error is the mean over tokens of the
//! squared change of the partial dot product:
//!
//! ```text
//! err(o, g) = 1/N Σ_n (x_n,g · (ŵ_o,g − w_o,g))² = dᵀ C_g d / N,   d = ŵ_o,g − w_o,g,
//! C_g = Σ_n x_n,g x_n,gᵀ   (the group's Gram matrix, computed once, in f64)
//! ```
//!
//! Every pair of [`SHRINK_RATIOS`] for max and for min is tried (10 × 10); the first pair with
//! the smallest error wins (strict `<`, so ties keep the smaller shrink, as the reference does).
//!
//! The Gram form costs `group` multiply-adds per weight and pair; computing the partial outputs
//! `x_n,g · d` themselves (as the reference does) costs `N`. So groups of up to `N` inputs use
//! the Gram matrices, and wider ones (per-channel formats on layers wider than the calibration
//! token count) the partial outputs ([`ErrorModel`]). Either way a pair costs one batched f64
//! matmul over the groups, on the model's device.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Shrink ratios tried for the max and, independently, for the min: 1 − i/20, i = 0..10.
pub const SHRINK_RATIOS: [f32; 10] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55];

/// The chosen clipping range of every group of a layer and what it achieved.
#[derive(Debug, Clone)]
pub struct LayerClip {
    /// `[out, groups]` upper and lower clamp bounds.
    pub max: Vec<f32>,
    pub min: Vec<f32>,
    /// `[out, groups]` indices into [`SHRINK_RATIOS`] of the chosen (max, min) shrink.
    pub choice: Vec<(u8, u8)>,
    /// Mean over groups of the error without clipping (plain round-to-nearest) and with the
    /// chosen clipping.
    pub mse_before: f64,
    pub mse_after: f64,
}

impl LayerClip {
    /// Clamps `w: [out, in]` (row-major) to the chosen per-group ranges, in place.
    pub fn apply(&self, w: &mut [f32], in_features: usize, group: usize) {
        let groups = in_features / group;
        for (o, row) in w.chunks_mut(in_features).enumerate() {
            for (g, chunk) in row.chunks_mut(group).enumerate() {
                let (lo, hi) = (self.min[o * groups + g], self.max[o * groups + g]);
                for v in chunk {
                    *v = v.max(lo).min(hi);
                }
            }
        }
    }

    /// Fraction of groups whose range was shrunk at all.
    pub fn clipped_fraction(&self) -> f64 {
        let n = self.choice.iter().filter(|&&c| c != (0, 0)).count();
        n as f64 / self.choice.len().max(1) as f64
    }
}

/// Per-group Gram matrices `C_g = Σ_n x_n,g x_n,gᵀ` of `x: [n, in]`, `[groups, group, group]`.
fn gram(x: &[f32], in_features: usize, group: usize) -> Vec<f64> {
    let groups = in_features / group;
    let mut c = vec![0f64; groups * group * group];
    c.par_chunks_mut(group * group)
        .enumerate()
        .for_each(|(g, c)| {
            for row in x.chunks(in_features) {
                let xg = &row[g * group..(g + 1) * group];
                for a in 0..group {
                    let xa = f64::from(xg[a]);
                    for b in 0..group {
                        c[a * group + b] += xa * f64::from(xg[b]);
                    }
                }
            }
        });
    c
}

/// How the search measures the error of a clamped-then-quantized layer.
pub enum ErrorModel {
    /// The groups' Gram matrices `[groups, group, group]` f64 ([`gram`]).
    Gram(Tensor),
    /// The calibration inputs as `[groups, n, group]` f64: the partial outputs of every token.
    Direct(Tensor),
}

impl ErrorModel {
    /// The cheaper of the two for `x: [n, in]` (row-major) and groups of `group` inputs; the
    /// direct form's matmuls run on `dev`.
    pub fn for_inputs(x: &[f32], in_features: usize, group: usize, dev: &Device) -> Result<Self> {
        let n = x.len() / in_features;
        if group <= n {
            Self::gram_of(x, in_features, group, dev)
        } else {
            Self::direct_of(x, in_features, group, dev)
        }
    }

    pub fn gram_of(x: &[f32], in_features: usize, group: usize, dev: &Device) -> Result<Self> {
        let groups = in_features / group;
        let c = Tensor::from_vec(gram(x, in_features, group), (groups, group, group), dev)?;
        Ok(Self::Gram(c))
    }

    pub fn direct_of(x: &[f32], in_features: usize, group: usize, dev: &Device) -> Result<Self> {
        let n = x.len() / in_features;
        let groups = in_features / group;
        let x = Tensor::from_slice(x, (n, groups, group), dev)?
            .to_dtype(DType::F64)?
            .transpose(0, 1)?
            .contiguous()?;
        Ok(Self::Direct(x))
    }

    /// `[out, groups]` mean squared changes of the groups' partial outputs, `wq` against `w`.
    fn errors(
        &self,
        w: &[f32],
        wq: &[f32],
        n: usize,
        in_features: usize,
        group: usize,
    ) -> Result<Vec<f64>> {
        let (out, groups) = (w.len() / in_features, in_features / group);
        let d: Vec<f64> = wq
            .iter()
            .zip(w)
            .map(|(&q, &v)| f64::from(q) - f64::from(v))
            .collect();
        let err = match self {
            Self::Gram(c) => {
                // d [out, groups, group] → [groups, out, group]; Σ_b (d C_g)_a d_a per row.
                let d = Tensor::from_vec(d, (out, groups, group), c.device())?
                    .transpose(0, 1)?
                    .contiguous()?;
                (d.matmul(c)? * &d)?.sum(2)? // [groups, out]
            }
            Self::Direct(x) => {
                // d [out, groups, group] → [groups, group, out]; x [groups, n, group] · d → [groups, n, out].
                let d = Tensor::from_vec(d, (out, groups, group), x.device())?
                    .permute((1, 2, 0))?
                    .contiguous()?;
                x.matmul(&d)?.sqr()?.sum(1)? // [groups, out]
            }
        };
        let err = (err / n as f64)?;
        Ok(err.t()?.contiguous()?.flatten_all()?.to_vec1::<f64>()?)
    }
}

/// Searches the clipping of one layer. `w: [out, in]` and `x: [n, in]` are row-major; `group`
/// divides `in`; `fake_quant` quantize-dequantizes a whole `[out, in]` matrix with the layer's
/// weight format (min/max taken per group, as training will). The error is measured the
/// cheaper way for the shapes ([`ErrorModel::for_inputs`]), its matmuls on `dev`.
pub fn search_layer(
    w: &[f32],
    in_features: usize,
    x: &[f32],
    group: usize,
    dev: &Device,
    fake_quant: &dyn Fn(&[f32]) -> Result<Vec<f32>>,
) -> Result<LayerClip> {
    let model = ErrorModel::for_inputs(x, in_features, group, dev)?;
    search_layer_with(
        w,
        in_features,
        x.len() / in_features,
        group,
        &model,
        fake_quant,
    )
}

/// [`search_layer`] with the error measured by `errors` (of `n` calibration rows).
pub fn search_layer_with(
    w: &[f32],
    in_features: usize,
    n: usize,
    group: usize,
    errors: &ErrorModel,
    fake_quant: &dyn Fn(&[f32]) -> Result<Vec<f32>>,
) -> Result<LayerClip> {
    let groups = in_features / group;
    let cells = w.len() / group;
    let mut org_max = vec![0f32; cells];
    let mut org_min = vec![0f32; cells];
    for (i, chunk) in w.chunks(group).enumerate() {
        org_max[i] = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        org_min[i] = chunk.iter().copied().fold(f32::INFINITY, f32::min);
    }
    let mut best_err = vec![f64::INFINITY; cells];
    let mut choice = vec![(0u8, 0u8); cells];
    let mut mse_before = 0.0;
    let mut clamped = vec![0f32; w.len()];
    for (i, &r_max) in SHRINK_RATIOS.iter().enumerate() {
        for (j, &r_min) in SHRINK_RATIOS.iter().enumerate() {
            for (cell, (dst, src)) in clamped.chunks_mut(group).zip(w.chunks(group)).enumerate() {
                let (lo, hi) = (org_min[cell] * r_min, org_max[cell] * r_max);
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s.max(lo).min(hi);
                }
            }
            let wq = fake_quant(&clamped)?;
            let err = errors.errors(w, &wq, n, in_features, group)?;
            if (i, j) == (0, 0) {
                mse_before = err.iter().sum::<f64>() / cells as f64;
            }
            for cell in 0..cells {
                if err[cell] < best_err[cell] {
                    best_err[cell] = err[cell];
                    choice[cell] = (i as u8, j as u8);
                }
            }
        }
    }
    let max = (0..cells)
        .map(|c| org_max[c] * SHRINK_RATIOS[choice[c].0 as usize])
        .collect();
    let min = (0..cells)
        .map(|c| org_min[c] * SHRINK_RATIOS[choice[c].1 as usize])
        .collect();
    let mse_after = best_err.iter().sum::<f64>() / cells as f64;
    debug_assert_eq!(cells, w.len() / in_features * groups);
    Ok(LayerClip {
        max,
        min,
        choice,
        mse_before,
        mse_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asymmetric 2-bit round-to-nearest per group (the test's own, independent quantizer).
    fn asym2(w: &[f32], group: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(w.len());
        for g in w.chunks(group) {
            let (lo, hi) = (
                g.iter().copied().fold(f32::INFINITY, f32::min),
                g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            );
            let s = ((hi - lo).max(1e-5)) / 3.0;
            let z = (-(lo / s)).round_ties_even().clamp(0.0, 3.0);
            out.extend(
                g.iter()
                    .map(|&v| (((v / s).round_ties_even() + z).clamp(0.0, 3.0) - z) * s),
            );
        }
        out
    }

    /// Deterministic values roughly N(0, 1) (sum of uniforms), from an LCG.
    fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..n)
            .map(|_| (0..12).map(|_| uniform()).sum::<f32>() - 6.0)
            .collect()
    }

    #[test]
    fn two_bit_gaussian_groups_gain_from_clipping_and_match_brute_force() -> Result<()> {
        let (out, inp, group, n) = (8, 64, 32, 96);
        let w = normals(out * inp, 1);
        let x = normals(n * inp, 2);
        let clip = search_layer(&w, inp, &x, group, &Device::Cpu, &|w| Ok(asym2(w, group)))?;
        // 2-bit MinMax of Gaussian groups wastes levels on the tails: clipping must help a lot.
        assert!(
            clip.mse_after < 0.8 * clip.mse_before,
            "{} vs {}",
            clip.mse_after,
            clip.mse_before
        );
        assert!(clip.clipped_fraction() > 0.5);
        // Brute force for row 3, group 1: partial outputs directly (no Gram matrix), all 100 pairs.
        let (o, g) = (3, 1);
        let wg = &w[o * inp + g * group..o * inp + (g + 1) * group];
        let (mx, mn) = (
            wg.iter().copied().fold(f32::MIN, f32::max),
            wg.iter().copied().fold(f32::MAX, f32::min),
        );
        let mut best = (f64::INFINITY, 0, 0);
        for (i, &ri) in SHRINK_RATIOS.iter().enumerate() {
            for (j, &rj) in SHRINK_RATIOS.iter().enumerate() {
                let clamped: Vec<f32> = wg.iter().map(|&v| v.max(mn * rj).min(mx * ri)).collect();
                let q = asym2(&clamped, group);
                let mut err = 0.0;
                for row in x.chunks(inp) {
                    let xg = &row[g * group..(g + 1) * group];
                    let y: f64 = xg
                        .iter()
                        .zip(wg)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let yq: f64 = xg
                        .iter()
                        .zip(&q)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    err += (yq - y) * (yq - y);
                }
                if err / (n as f64) < best.0 {
                    best = (err / n as f64, i, j);
                }
            }
        }
        let cell = o * (inp / group) + g;
        assert_eq!(clip.choice[cell], (best.1 as u8, best.2 as u8));
        assert_eq!(clip.max[cell], mx * SHRINK_RATIOS[best.1]);
        assert_eq!(clip.min[cell], mn * SHRINK_RATIOS[best.2]);
        Ok(())
    }

    /// The two error models agree (to f64 rounding) on every pair, so the search picks the same
    /// clipping with either; groups wider than the token count go the direct way.
    #[test]
    fn gram_and_direct_errors_agree_and_wide_groups_go_direct() -> Result<()> {
        for (out, inp, group, n) in [(8, 64, 64, 16), (6, 96, 32, 20), (4, 48, 16, 40)] {
            let w = normals(out * inp, 3);
            let x = normals(n * inp, 4);
            let q = |w: &[f32]| Ok(asym2(w, group));
            let gram = ErrorModel::gram_of(&x, inp, group, &Device::Cpu)?;
            let direct = ErrorModel::direct_of(&x, inp, group, &Device::Cpu)?;
            let wq = asym2(&w, group);
            let (a, b) = (
                gram.errors(&w, &wq, n, inp, group)?,
                direct.errors(&w, &wq, n, inp, group)?,
            );
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-9 * x.abs().max(1e-12), "{a:?} vs {b:?}");
            }
            let by_gram = search_layer_with(&w, inp, n, group, &gram, &q)?;
            let by_direct = search_layer_with(&w, inp, n, group, &direct, &q)?;
            assert_eq!(by_gram.choice, by_direct.choice);
            assert!((by_gram.mse_after - by_direct.mse_after).abs() <= 1e-9 * by_gram.mse_after);
            let auto = ErrorModel::for_inputs(&x, inp, group, &Device::Cpu)?;
            assert_eq!(matches!(auto, ErrorModel::Direct(_)), group > n);
        }
        Ok(())
    }

    #[test]
    fn error_is_exact_for_a_hand_worked_case() {
        // x = [[1, 2], [3, 4]] → C = [[10, 14], [14, 20]]; d = (0.5, -0.25):
        // dᵀCd = 10·0.25 − 2·14·0.125 + 20·0.0625 = 2.5 − 3.5 + 1.25 = 0.25; / n=2 → 0.125.
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(gram(&x, 2, 2), vec![10.0, 14.0, 14.0, 20.0]);
        for model in [
            ErrorModel::gram_of(&x, 2, 2, &Device::Cpu).unwrap(),
            ErrorModel::direct_of(&x, 2, 2, &Device::Cpu).unwrap(),
        ] {
            let err = model.errors(&[0.0, 0.0], &[0.5, -0.25], 2, 2, 2).unwrap();
            assert_eq!(err, vec![0.125]);
        }
    }

    #[test]
    fn apply_clamps_per_group() {
        let clip = LayerClip {
            max: vec![1.0, 5.0],
            min: vec![-1.0, 0.0],
            choice: vec![(1, 1), (0, 0)],
            mse_before: 0.0,
            mse_after: 0.0,
        };
        let mut w = vec![-3.0f32, 2.0, -3.0, 2.0];
        clip.apply(&mut w, 4, 2);
        assert_eq!(w, vec![-1.0, 1.0, 0.0, 2.0]);
        assert_eq!(clip.clipped_fraction(), 0.5);
    }
}
