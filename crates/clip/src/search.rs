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
    /// `w: [out, in]` clamped to the chosen per-group ranges, on `w`'s device and in its dtype.
    pub fn apply(&self, w: &Tensor, group: usize) -> Result<Tensor> {
        let (dev, cells) = (w.device(), self.max.len());
        let hi = Tensor::from_slice(&self.max, (cells, 1), dev)?.to_dtype(w.dtype())?;
        let lo = Tensor::from_slice(&self.min, (cells, 1), dev)?.to_dtype(w.dtype())?;
        Ok(clamp_groups(&w.reshape((cells, group))?, &lo, &hi)?.reshape(w.shape())?)
    }

    /// Fraction of groups whose range was shrunk at all.
    pub fn clipped_fraction(&self) -> f64 {
        let n = self.choice.iter().filter(|&&c| c != (0, 0)).count();
        n as f64 / self.choice.len().max(1) as f64
    }
}

/// `groups: [cells, group]` clamped to `[lo, hi]` per row (`lo`, `hi`: `[cells, 1]`): the clamp
/// the search measures and the one [`LayerClip::apply`] keeps, so they are the same op.
fn clamp_groups(groups: &Tensor, lo: &Tensor, hi: &Tensor) -> Result<Tensor> {
    Ok(groups.broadcast_maximum(lo)?.broadcast_minimum(hi)?)
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
    /// The groups' Gram matrices `[groups, group, group]` f64 (built on the host, once per layer).
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

    /// `[out · groups]` mean squared changes of the groups' partial outputs for the weight
    /// change `d: [out, groups, group]` f64 (quantized minus original), on the model's device.
    fn errors(&self, d: &Tensor, n: usize) -> Result<Tensor> {
        let (out, groups, _) = d.dims3()?;
        let err = match self {
            Self::Gram(c) => {
                // d → [groups, out, group]; Σ_b (d C_g)_a d_a per row.
                let d = d.transpose(0, 1)?.contiguous()?;
                (d.matmul(c)? * &d)?.sum(2)? // [groups, out]
            }
            Self::Direct(x) => {
                // d → [groups, group, out]; x [groups, n, group] · d → [groups, n, out].
                let d = d.permute((1, 2, 0))?.contiguous()?;
                x.matmul(&d)?.sqr()?.sum(1)? // [groups, out]
            }
        };
        Ok((err / n as f64)?.t()?.contiguous()?.reshape(out * groups)?)
    }

    fn device(&self) -> &Device {
        match self {
            Self::Gram(c) => c.device(),
            Self::Direct(x) => x.device(),
        }
    }
}

/// Searches the clipping of one layer. `w: [out, in]` f32 is on `dev`, `x: [n, in]` the
/// calibration inputs (row-major, host); `group` divides `in`; `fake_quant` quantize-dequantizes
/// a whole `[out, in]` matrix with the layer's weight format (min/max taken per group, as
/// training will). The error is measured the cheaper way for the shapes
/// ([`ErrorModel::for_inputs`]); clamping, quantizing and measuring all stay on `dev`.
pub fn search_layer(
    w: &Tensor,
    x: &[f32],
    group: usize,
    dev: &Device,
    fake_quant: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<LayerClip> {
    let in_features = w.dim(1)?;
    let model = ErrorModel::for_inputs(x, in_features, group, dev)?;
    search_layer_with(w, x.len() / in_features, group, &model, fake_quant)
}

/// [`search_layer`] with the error measured by `errors` (of `n` calibration rows), on its device.
/// Each of the 100 pairs costs a clamp, a fake quantization and one batched matmul there, and
/// the running best of every group stays there too: nothing crosses to the host but the final
/// choices and the two mean errors.
pub fn search_layer_with(
    w: &Tensor,
    n: usize,
    group: usize,
    errors: &ErrorModel,
    fake_quant: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<LayerClip> {
    let dev = errors.device();
    let (out, in_features) = w.dims2()?;
    let (groups, cells) = (in_features / group, w.elem_count() / group);
    let cells_view = w
        .to_device(dev)?
        .to_dtype(DType::F32)?
        .reshape((cells, group))?;
    let org_max = cells_view.max_keepdim(1)?; // [cells, 1]
    let org_min = cells_view.min_keepdim(1)?;
    let original = cells_view.to_dtype(DType::F64)?;
    let ratio = |r: f32| Tensor::new(&[r], dev);
    // The 10 lower bounds, shared by the 10 upper ones.
    let los = SHRINK_RATIOS
        .iter()
        .map(|&r| Ok(org_min.broadcast_mul(&ratio(r)?)?))
        .collect::<Result<Vec<_>>>()?;
    let mut best_err = Tensor::full(f64::INFINITY, cells, dev)?;
    let mut best_pair = Tensor::zeros(cells, DType::U32, dev)?;
    let mut mse_before = 0.0;
    for (i, &r_max) in SHRINK_RATIOS.iter().enumerate() {
        let hi = org_max.broadcast_mul(&ratio(r_max)?)?;
        for (j, lo) in los.iter().enumerate() {
            let clamped = clamp_groups(&cells_view, lo, &hi)?.reshape((out, in_features))?;
            let wq = fake_quant(&clamped)?.reshape((cells, group))?;
            let d = (wq.to_dtype(DType::F64)? - &original)?.reshape((out, groups, group))?;
            let err = errors.errors(&d, n)?;
            if (i, j) == (0, 0) {
                mse_before = err.sum_all()?.to_scalar::<f64>()? / cells as f64;
            }
            // Strict `<`: the first pair with the smallest error wins (NaN never does).
            let better = err.lt(&best_err)?;
            best_err = better.where_cond(&err, &best_err)?;
            let pair = Tensor::full((i * SHRINK_RATIOS.len() + j) as u32, cells, dev)?;
            best_pair = better.where_cond(&pair, &best_pair)?;
        }
    }
    let mse_after = best_err.sum_all()?.to_scalar::<f64>()? / cells as f64;
    let org_max = org_max.flatten_all()?.to_vec1::<f32>()?;
    let org_min = org_min.flatten_all()?.to_vec1::<f32>()?;
    let choice: Vec<(u8, u8)> = best_pair
        .to_vec1::<u32>()?
        .into_iter()
        .map(|p| {
            let p = p as usize;
            (
                (p / SHRINK_RATIOS.len()) as u8,
                (p % SHRINK_RATIOS.len()) as u8,
            )
        })
        .collect();
    let max = (0..cells)
        .map(|c| org_max[c] * SHRINK_RATIOS[choice[c].0 as usize])
        .collect();
    let min = (0..cells)
        .map(|c| org_min[c] * SHRINK_RATIOS[choice[c].1 as usize])
        .collect();
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

    /// [`asym2`] of a tensor, as `search_layer` calls it.
    fn asym2_tensor(w: &Tensor, group: usize) -> Result<Tensor> {
        let q = asym2(&w.flatten_all()?.to_vec1::<f32>()?, group);
        Ok(Tensor::from_vec(q, w.shape(), w.device())?)
    }

    fn matrix(v: &[f32], cols: usize) -> Tensor {
        Tensor::from_slice(v, (v.len() / cols, cols), &Device::Cpu).unwrap()
    }

    /// `[out, groups, group]` f64 change from `w` to `wq`.
    fn change(w: &[f32], wq: &[f32], inp: usize, group: usize) -> Tensor {
        let d: Vec<f64> = wq
            .iter()
            .zip(w)
            .map(|(&q, &v)| f64::from(q) - f64::from(v))
            .collect();
        let n = d.len();
        Tensor::from_vec(d, (n / inp, inp / group, group), &Device::Cpu).unwrap()
    }

    #[test]
    fn two_bit_gaussian_groups_gain_from_clipping_and_match_brute_force() -> Result<()> {
        let (out, inp, group, n) = (8, 64, 32, 96);
        let w = normals(out * inp, 1);
        let x = normals(n * inp, 2);
        let q = |w: &Tensor| asym2_tensor(w, group);
        let clip = search_layer(&matrix(&w, inp), &x, group, &Device::Cpu, &q)?;
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
            let q = |w: &Tensor| asym2_tensor(w, group);
            let gram = ErrorModel::gram_of(&x, inp, group, &Device::Cpu)?;
            let direct = ErrorModel::direct_of(&x, inp, group, &Device::Cpu)?;
            let wq = asym2(&w, group);
            let d = change(&w, &wq, inp, group);
            let (a, b) = (
                gram.errors(&d, n)?.to_vec1::<f64>()?,
                direct.errors(&d, n)?.to_vec1::<f64>()?,
            );
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-9 * x.abs().max(1e-12), "{a:?} vs {b:?}");
            }
            let by_gram = search_layer_with(&matrix(&w, inp), n, group, &gram, &q)?;
            let by_direct = search_layer_with(&matrix(&w, inp), n, group, &direct, &q)?;
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
            let err = model
                .errors(&change(&[0.0, 0.0], &[0.5, -0.25], 2, 2), 2)
                .unwrap();
            assert_eq!(err.to_vec1::<f64>().unwrap(), vec![0.125]);
        }
    }

    /// The search on a GPU picks the clipping the CPU picks, with the quantizer training uses
    /// (asymmetric 2-bit groups: crates/quant/kernels/asym_group.cu on the GPU, the composed ops
    /// on the CPU, the same values) and the symmetric per-channel one (its CUDA kernel), by
    /// either error model. Runs only in a `--features cuda` build on a machine
    /// with a GPU (`make pipeline-gpu` runs it first); skipped otherwise.
    #[test]
    fn cuda_search_picks_the_clipping_of_the_cpu() -> Result<()> {
        use qat_quant::{WeightFormat, WeightGrad, WeightQuant};
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (out, inp, n) = (48, 128, 40);
        let w = normals(out * inp, 5);
        let x = normals(n * inp, 6);
        for (format, bits, group) in [
            (
                WeightFormat::AsymGroup {
                    group_size: Some(32),
                },
                2,
                32,
            ),
            (WeightFormat::SymPerChannel, 4, inp),
        ] {
            let wq = WeightQuant {
                bits,
                format,
                grad: WeightGrad::Ste,
            };
            let q = |w: &Tensor| Ok(qat_quant::fake::fake_weight(w, &wq)?);
            let on = |dev: &Device| -> Result<LayerClip> {
                let w = Tensor::from_slice(&w, (out, inp), dev)?;
                search_layer(&w, &x, group, dev, &q)
            };
            let (cpu, cuda) = (on(&Device::Cpu)?, on(&gpu)?);
            assert_eq!(cpu.choice, cuda.choice, "{format:?}");
            assert_eq!((&cpu.max, &cpu.min), (&cuda.max, &cuda.min));
            let rel = (cpu.mse_after - cuda.mse_after).abs() / cpu.mse_after;
            assert!(
                rel < 1e-9,
                "{format:?}: {} vs {}",
                cpu.mse_after,
                cuda.mse_after
            );
        }
        Ok(())
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
        let w = matrix(&[-3.0f32, 2.0, -3.0, 2.0], 4);
        let clamped = clip.apply(&w, 2).unwrap();
        assert_eq!(clamped.dims(), [1, 4]);
        assert_eq!(
            clamped.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-1.0, 1.0, 0.0, 2.0]
        );
        assert_eq!(clip.clipped_fraction(), 0.5);
    }
}
