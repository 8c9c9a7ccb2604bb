//! Next-token negative log-likelihood and rank of each target straight from logits, one pass per
//! row, for perplexity and zero-shot scoring.
//!
//! For row `r` with target `t`: `nll = logsumexp(z_r) − z_r[t]` and `rank = #{ j : z_r[j] >
//! z_r[t], or z_r[j] = z_r[t] with j < t }`, so `rank == 0` exactly when `t` is the row's argmax
//! (the first maximum, as candle's `argmax`). The composed path (`to_dtype(F32)`, `log_softmax`,
//! `gather`, `argmax`) makes about ten passes over a `[rows, vocab]` tensor and three f32 copies
//! of it; with a 32k vocabulary at seq-len 1024 those are 131 MB per sequence. This op reads the
//! logits once, in their own dtype. Not differentiable (evaluation only).
//!
//! CPU (rayon over rows): f32 `exp` that vectorizes, summed in f64 (f64 logits: f64 throughout).
//! CUDA: kernels/token_nll.cu, f32 with a fixed reduction order (checked without a GPU through the CUDA emulation,
//! tests/token_nll_emulated.rs, and on a GPU by this module's CUDA test).

use crate::custom_op::contiguous_range;
use crate::fastmath::exp_nonpositive;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
struct TokenNll;

/// `[nll, rank]` of one row in f64 (f64 logits, and rows with a NaN or an infinite maximum).
fn row_nll_rank(z: impl Iterator<Item = f64> + Clone, target: usize) -> [f64; 2] {
    let zt = z.clone().nth(target).unwrap_or(f64::NAN);
    let max = z.clone().fold(f64::NEG_INFINITY, f64::max);
    let (mut sum, mut rank) = (0f64, 0usize);
    for (j, x) in z.enumerate() {
        sum += (x - max).exp();
        rank += usize::from(x > zt || (x == zt && j < target));
    }
    if max.is_nan() || zt.is_nan() {
        return [f64::NAN, rank as f64];
    }
    [max + sum.ln() - zt, rank as f64]
}

/// [`row_nll_rank`] of a row of f32 values (f32 logits, or bf16 / f16 ones widened exactly),
/// with `exp` in f32 ([`exp_nonpositive`], which vectorizes: within 2 ulp of libm) summed in
/// blocks of 8 per lane and the blocks in f64 (a NaN logit makes the sum NaN). Rows without a
/// finite maximum, or with a NaN target logit, take the f64 path.
fn row_nll_rank_f32(z: &[f32], target: usize) -> [f64; 2] {
    let zt = z[target];
    // Max over 8 lanes (vectorizes; skips NaN, which the sum below propagates).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let exact = z.chunks_exact(8);
    let mut max = exact
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in exact {
        for (lane, &x) in lanes.iter_mut().zip(c) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    for m in lanes {
        max = if m > max { m } else { max };
    }
    if !max.is_finite() || zt.is_nan() {
        return row_nll_rank(z.iter().map(|&x| f64::from(x)), target);
    }
    let rank =
        z.iter().filter(|&&x| x > zt).count() + z[..target].iter().filter(|&&x| x == zt).count();
    let mut sum = 0f64;
    for block in z.chunks(64) {
        let mut lanes = [0f32; 8];
        let exact = block.chunks_exact(8);
        let rest = exact.remainder();
        for c in exact {
            for (lane, &x) in lanes.iter_mut().zip(c) {
                *lane += exp_nonpositive(x - max);
            }
        }
        sum += lanes.iter().map(|&l| f64::from(l)).sum::<f64>()
            + rest
                .iter()
                .map(|&x| f64::from(exp_nonpositive(x - max)))
                .sum::<f64>();
    }
    [f64::from(max) + sum.ln() - f64::from(zt), rank as f64]
}

/// Every row of a contiguous `[rows, vocab]` slice of f32 values.
fn cpu_rows_f32(z: &[f32], targets: &[u32], vocab: usize) -> Vec<[f64; 2]> {
    z.par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| row_nll_rank_f32(row, t as usize))
        .collect()
}

/// Every row of a contiguous `[rows, vocab]` slice of 16-bit floats, widened to f32 per row.
fn cpu_rows_16<T: Copy + Sync>(
    z: &[T],
    targets: &[u32],
    vocab: usize,
    to_f32: impl Fn(T) -> f32 + Sync,
) -> Vec<[f64; 2]> {
    z.par_chunks(vocab)
        .zip(targets.par_iter())
        .map_init(Vec::new, |wide, (row, &t)| {
            wide.clear();
            wide.extend(row.iter().map(|&x| to_f32(x)));
            row_nll_rank_f32(wide, t as usize)
        })
        .collect()
}

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "token-nll"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        ll: &Layout,
        targets: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "logits and targets";
        let ((z1, z2), (t1, t2)) = (
            contiguous_range(ll, "token_nll", what)?,
            contiguous_range(lt, "token_nll", what)?,
        );
        let (rows, vocab) = ll.shape().dims2()?;
        let CpuStorage::U32(targets) = targets else {
            candle_core::bail!(
                "token_nll: targets dtype {:?}, expected U32",
                targets.dtype()
            )
        };
        let targets = &targets[t1..t2];
        let pairs = match logits {
            CpuStorage::F32(z) => cpu_rows_f32(&z[z1..z2], targets, vocab),
            CpuStorage::F64(z) => z[z1..z2]
                .par_chunks(vocab)
                .zip(targets.par_iter())
                .map(|(row, &t)| row_nll_rank(row.iter().copied(), t as usize))
                .collect(),
            CpuStorage::BF16(z) => cpu_rows_16(&z[z1..z2], targets, vocab, half::bf16::to_f32),
            CpuStorage::F16(z) => cpu_rows_16(&z[z1..z2], targets, vocab, half::f16::to_f32),
            other => candle_core::bail!(
                "token_nll: logits dtype {:?}, expected a float type",
                other.dtype()
            ),
        };
        let flat = pairs.into_iter().flatten();
        let out = match logits {
            CpuStorage::F64(_) => CpuStorage::F64(flat.collect()),
            _ => CpuStorage::F32(flat.map(|x| x as f32).collect()),
        };
        Ok((out, Shape::from((rows, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        ll: &Layout,
        targets: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaStorage, WrapErr};
        use candle_core::DType;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/token_nll.ptx"));
        let what = "logits and targets";
        let ((z1, z2), (t1, t2)) = (
            contiguous_range(ll, "token_nll", what)?,
            contiguous_range(lt, "token_nll", what)?,
        );
        let (rows, vocab) = ll.shape().dims2()?;
        let dev = logits.device();
        let targets = targets.as_cuda_slice::<u32>()?.slice(t1..t2);
        // SAFETY: the kernel writes both values of every row.
        let out = unsafe { dev.alloc::<f32>(rows * 2)? };
        let name = match logits.dtype() {
            DType::F32 => "token_nll_f32",
            DType::BF16 => "token_nll_bf16",
            DType::F16 => "token_nll_f16",
            other => candle_core::bail!(
                "token_nll on cuda: logits dtype {other:?}, expected F32, BF16 or F16"
            ),
        };
        let func = dev.get_or_load_custom_func(name, "qat_token_nll", PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1), // NLL_BLOCK
            shared_mem_bytes: 0,
        };
        let vocab = vocab as u32;
        let mut b = func.builder();
        macro_rules! launch {
            ($ty:ty) => {{
                let z = logits.as_cuda_slice::<$ty>()?.slice(z1..z2);
                b.arg(&z).arg(&targets).arg(&out).arg(&vocab);
                // SAFETY: logits hold rows · vocab elements, targets rows, out 2 · rows.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match logits.dtype() {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(half::bf16),
            _ => launch!(half::f16),
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, 2)),
        ))
    }
}

/// `[rows, 2]`: per row of `logits` (`[rows, vocab]`, any float dtype), the negative
/// log-likelihood of its target in column 0 and the target's rank in column 1 (0: the target is
/// the row's first maximum). f32, or f64 for f64 logits. `targets` holds one id per row, each
/// below `vocab`; other lengths or ids are an error.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        candle_core::bail!(
            "token_nll: {} targets for {rows} rows of logits",
            targets.len()
        );
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!(
            "token_nll: target id {bad}, expected below the vocabulary size {vocab}"
        );
    }
    let targets = Tensor::from_slice(targets, rows, logits.device())?;
    logits.contiguous()?.apply_op2_no_bwd(&targets, &TokenNll)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// The composed path the op replaces: f32 log-softmax, gather, argmax.
    fn composed(logits: &Tensor, targets: &[u32]) -> Result<(Vec<f32>, Vec<u32>)> {
        let logits = logits.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ids = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
        let nll = logp.gather(&ids, 1)?.squeeze(1)?.neg()?.to_vec1()?;
        Ok((nll, logits.argmax(D::Minus1)?.to_vec1()?))
    }

    #[test]
    fn hand_worked_rows() -> Result<()> {
        // Row 0: logits [0, ln 3, 0], target 1: p = 3/5, nll = ln(5/3), rank 0.
        // Row 1: logits [2, 2, 1], target 1: tie with the lower id 0, so rank 1; nll =
        // ln(2e^2 + e) - 2 = ln(2 + 1/e).
        let z = Tensor::new(&[[0f64, 3f64.ln(), 0.0], [2.0, 2.0, 1.0]], &Device::Cpu)?;
        let out = token_nll(&z, &[1, 1])?.to_vec2::<f64>()?;
        assert!((out[0][0] - (5f64 / 3.0).ln()).abs() < 1e-15, "{out:?}");
        assert!(
            (out[1][0] - (2.0 + (-1f64).exp()).ln()).abs() < 1e-15,
            "{out:?}"
        );
        assert_eq!((out[0][1], out[1][1]), (0.0, 1.0));
        // Target 0 of row 1 is the first maximum: rank 0.
        assert_eq!(token_nll(&z, &[0, 0])?.to_vec2::<f64>()?[1][1], 0.0);
        Ok(())
    }

    #[test]
    fn matches_the_composed_path_in_every_dtype() -> Result<()> {
        let (rows, vocab) = (7, 515);
        let z = (Tensor::arange(0f32, (rows * vocab) as f32, &Device::Cpu)?
            .reshape((rows, vocab))?
            .affine(0.37, 0.0)?
            .sin()?
            * 6.0)?;
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 73) % vocab as u32).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let z = z.to_dtype(dtype)?;
            let out = token_nll(&z, &targets)?.to_vec2::<f32>()?;
            let (nll, argmax) = composed(&z, &targets)?;
            for r in 0..rows {
                assert!((out[r][0] - nll[r]).abs() < 2e-5, "{dtype:?} row {r}");
                assert_eq!(
                    out[r][1] == 0.0,
                    argmax[r] == targets[r],
                    "{dtype:?} row {r}"
                );
            }
        }
        // Ranks against a sort, on a row with a known order.
        let z = Tensor::new(&[[0.5f32, 3.0, -1.0, 2.0, 3.0]], &Device::Cpu)?;
        let ranks: Vec<f32> = (0..5u32)
            .map(|t| Ok(token_nll(&z, &[t])?.to_vec2::<f32>()?[0][1]))
            .collect::<Result<_>>()?;
        assert_eq!(ranks, [3.0, 0.0, 4.0, 2.0, 1.0]);
        Ok(())
    }

    #[test]
    fn bad_targets_and_nan_rows() -> Result<()> {
        let z = Tensor::new(&[[0f32, 1.0], [f32::NAN, 1.0]], &Device::Cpu)?;
        let err = token_nll(&z, &[0, 2]).unwrap_err().to_string();
        assert!(
            err.contains("target id 2") && err.contains("size 2"),
            "{err}"
        );
        let err = token_nll(&z, &[0]).unwrap_err().to_string();
        assert!(err.contains("1 targets for 2 rows"), "{err}");
        let out = token_nll(&z, &[0, 1])?.to_vec2::<f32>()?;
        assert!(out[0][0].is_finite() && out[1][0].is_nan(), "{out:?}");
        Ok(())
    }

    /// The CUDA kernel against the CPU op (f64) on the same rows, f32 / bf16 / f16, with a
    /// 32k vocabulary. Runs only in a `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, vocab) = (37, 32000);
        let z = (Tensor::arange(0f32, (rows * vocab) as f32, &Device::Cpu)?
            .reshape((rows, vocab))?
            .affine(0.731, 0.0)?
            .sin()?
            * 9.0)?;
        let targets: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 7919) % vocab as u32)
            .collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let z = z.to_dtype(dtype)?;
            let want = token_nll(&z.to_dtype(DType::F64)?, &targets)?.to_vec2::<f64>()?;
            let got = token_nll(&z.to_device(&gpu)?, &targets)?.to_vec2::<f32>()?;
            for r in 0..rows {
                let err = (f64::from(got[r][0]) - want[r][0]).abs();
                assert!(
                    err < 1e-4 * want[r][0].abs().max(1.0),
                    "{dtype:?} row {r}: {err}"
                );
                assert_eq!(f64::from(got[r][1]), want[r][1], "{dtype:?} row {r}");
            }
        }
        Ok(())
    }
}
