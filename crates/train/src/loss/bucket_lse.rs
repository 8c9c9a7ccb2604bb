//! The student's row log-sum-exps for the top-K loss ([`super::student_buckets`]) as one
//! differentiable op: `log Σ_j exp(z_j)` over the vocabulary and, with a tail,
//! `log Σ_{j ∉ ids} exp(z_j)` over the ids outside the row's top K.
//!
//! On CUDA (f32) this is kernels/bucket_lse.cu: one pass over the `[rows, vocab]` logits forward
//! and one backward, where the composed ops (two `log_sum_exp`s, a `[rows, vocab]` `-inf` mask
//! built by a scatter, its add, and all their backward passes) make about 30. At batch 4 × 1024
//! with a 32k vocabulary one such pass moves 0.5 GB. The gradient is
//! `dz_j = g_all · exp(z_j − lse_all) + g_tail · exp(z_j − lse_tail) · [j ∉ ids]`, from the
//! saved output, so the backward reads the logits once and writes the gradient once.
//!
//! The CPU keeps the composed ops in training (their exact numerics, which README's results
//! come from); this module's CPU implementation (f64 arithmetic) exists for the tests, which
//! check it against the composed ops in value and gradient, and the CUDA kernel against it
//! (through the CUDA emulation, tests/bucket_lse_emulated.rs, and on a GPU).
//! `QAT_CUDA_FUSED_LOSS=0` turns the kernels off.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use qat_model::custom_op::{contiguous_range, storage_from_f64, storage_to_f64};
use qat_model::kernel_switch::cuda_kernel_on;
use rayon::prelude::*;

/// Vocabularies the CUDA kernel's shared-memory bitmask holds (kernels/bucket_lse.cu).
pub const MAX_VOCAB: usize = 8192 * 32;

/// The forward op: `[rows, vocab]` logits and `[rows, k]` ids → `[rows, 1 + tail]`.
#[derive(Debug, Clone, Copy)]
struct BucketLse {
    tail: bool,
}

/// The backward op: logits, ids and `[rows, 2c]` = forward output ‖ its gradient → `dz`.
#[derive(Debug, Clone, Copy)]
struct BucketLseBackward {
    tail: bool,
}

/// Which of `0..vocab` are among `ids` (ids out of range ignored, as the kernel does).
fn id_set(ids: &[u32], vocab: usize) -> Vec<bool> {
    let mut set = vec![false; vocab];
    for &id in ids {
        if let Some(slot) = set.get_mut(id as usize) {
            *slot = true;
        }
    }
    set
}

/// `log Σ exp` of the values `keep` selects, in f64 (−inf for none).
fn logsumexp(z: &[f64], keep: impl Fn(usize) -> bool) -> f64 {
    let max = (0..z.len())
        .filter(|&j| keep(j))
        .map(|j| z[j])
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    let sum: f64 = (0..z.len())
        .filter(|&j| keep(j))
        .map(|j| (z[j] - max).exp())
        .sum();
    max + sum.ln()
}

/// The contiguous element ranges of two or three operands, or an error naming the op.
fn ranges<const N: usize>(layouts: [&Layout; N], op: &str) -> Result<[(usize, usize); N]> {
    let mut out = [(0, 0); N];
    for (o, l) in out.iter_mut().zip(layouts) {
        *o = contiguous_range(l, op, "operands")?;
    }
    Ok(out)
}

fn u32_ids(storage: &CpuStorage, (a, b): (usize, usize)) -> Result<&[u32]> {
    match storage {
        CpuStorage::U32(ids) => Ok(&ids[a..b]),
        other => candle_core::bail!(
            "bucket_logsumexp: ids dtype {:?}, expected U32",
            other.dtype()
        ),
    }
}

impl CustomOp2 for BucketLse {
    fn name(&self) -> &'static str {
        "bucket-logsumexp"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        ids: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [_, ri] = ranges([lz, li], "bucket_logsumexp")?;
        let ((rows, vocab), (_, k)) = (lz.shape().dims2()?, li.shape().dims2()?);
        let (values, ids) = (
            storage_to_f64(z, lz, "bucket_logsumexp")?,
            u32_ids(ids, ri)?,
        );
        let cols = 1 + usize::from(self.tail);
        let out: Vec<f64> = values
            .par_chunks(vocab.max(1))
            .zip(ids.par_chunks(k.max(1)))
            .flat_map_iter(|(row, ids)| {
                let all = logsumexp(row, |_| true);
                let tail = self.tail.then(|| {
                    let set = id_set(ids, vocab);
                    logsumexp(row, |j| !set[j])
                });
                std::iter::once(all).chain(tail)
            })
            .collect();
        Ok((storage_from_f64(z.dtype(), out), Shape::from((rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        ids: &candle_core::CudaStorage,
        li: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [rz, ri] = ranges([lz, li], "bucket_logsumexp")?;
        let ((rows, vocab), (_, k)) = (lz.shape().dims2()?, li.shape().dims2()?);
        let out = cuda::forward(self.tail, (z, rz), (ids, ri), rows, vocab, k)?;
        Ok((out, Shape::from((rows, 1 + usize::from(self.tail)))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        ids: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = Tensor::cat(&[res, &grad_res.to_dtype(res.dtype())?], 1)?;
        let dz = z.apply_op3_no_bwd(ids, &saved, &BucketLseBackward { tail: self.tail })?;
        Ok((Some(dz), None))
    }
}

impl CustomOp3 for BucketLseBackward {
    fn name(&self) -> &'static str {
        "bucket-logsumexp-backward"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        ids: &CpuStorage,
        li: &Layout,
        saved: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "bucket_logsumexp backward";
        let [_, ri, _] = ranges([lz, li, ls], OP)?;
        let ((_, vocab), (_, k)) = (lz.shape().dims2()?, li.shape().dims2()?);
        let (values, ids, saved) = (
            storage_to_f64(z, lz, OP)?,
            u32_ids(ids, ri)?,
            storage_to_f64(saved, ls, OP)?,
        );
        let c = 1 + usize::from(self.tail);
        let dz: Vec<f64> = values
            .par_chunks(vocab.max(1))
            .zip(ids.par_chunks(k.max(1)))
            .zip(saved.par_chunks(2 * c))
            .flat_map_iter(|((row, ids), s)| {
                let (lse_all, g_all) = (s[0], s[c]);
                let tail = self.tail.then(|| (s[1], s[c + 1], id_set(ids, vocab)));
                row.iter()
                    .enumerate()
                    .map(move |(j, &x)| {
                        let mut v = g_all * (x - lse_all).exp();
                        if let Some((lse_tail, g_tail, set)) = &tail {
                            if !set[j] {
                                v += g_tail * (x - lse_tail).exp();
                            }
                        }
                        v
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok((storage_from_f64(z.dtype(), dz), lz.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        ids: &candle_core::CudaStorage,
        li: &Layout,
        saved: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [rz, ri, rs] = ranges([lz, li, ls], "bucket_logsumexp backward")?;
        let ((rows, vocab), (_, k)) = (lz.shape().dims2()?, li.shape().dims2()?);
        let dz = cuda::backward(self.tail, (z, rz), (ids, ri), (saved, rs), rows, vocab, k)?;
        Ok((dz, lz.shape().clone()))
    }
}

/// `[rows, 1]` (or `[rows, 2]` with `tail`): per row of `logits` (`[rows, vocab]`, f32 or f64),
/// the log-sum-exp over the vocabulary and, with `tail`, over the ids not in that row of `ids`
/// (`[rows, k]` u32). Differentiable in `logits`.
pub fn bucket_logsumexp(logits: &Tensor, ids: &Tensor, tail: bool) -> Result<Tensor> {
    let ((rows, _), (id_rows, _)) = (logits.dims2()?, ids.dims2()?);
    if rows != id_rows || ids.dtype() != DType::U32 {
        candle_core::bail!(
            "bucket_logsumexp: ids {:?} {:?}, expected U32 with {rows} rows",
            ids.dims(),
            ids.dtype()
        );
    }
    logits
        .contiguous()?
        .apply_op2(&ids.contiguous()?, BucketLse { tail })
}

/// Whether [`super::student_buckets`] takes the fused op for these logits: f32 on CUDA (`cuda`
/// builds, unless `QAT_CUDA_FUSED_LOSS=0`), with a vocabulary the kernel's bitmask holds.
pub fn fused_on(logits: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    logits.dims().last().is_some_and(|&v| v <= MAX_VOCAB)
        && cuda_kernel_on(&ON, "QAT_CUDA_FUSED_LOSS", logits, &[DType::F32])
}

/// The CUDA side: kernels/bucket_lse.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bucket_lse.ptx"));

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1), // LSE_BLOCK
            shared_mem_bytes: 0,    // static: the id bitmask and the reduction scratch
        }
    }

    type Operand<'a> = (&'a CudaStorage, (usize, usize));

    pub(super) fn forward(
        tail: bool,
        (z, (z0, z1)): Operand<'_>,
        (ids, (i0, i1)): Operand<'_>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<CudaStorage> {
        let dev = z.device().clone();
        let func = dev.get_or_load_custom_func("bucket_lse_f32", "qat_bucket_lse", PTX)?;
        let zs = z.as_cuda_slice::<f32>()?.slice(z0..z1);
        let is = ids.as_cuda_slice::<u32>()?.slice(i0..i1);
        // SAFETY: the kernel writes every output element (thread 0 of each row's block).
        let out = unsafe { dev.alloc::<f32>(rows * (1 + usize::from(tail)))? };
        let (vocab, k, tail) = (vocab as u32, k as u32, i32::from(tail));
        let mut b = func.builder();
        b.arg(&zs).arg(&is).arg(&out).arg(&vocab).arg(&k).arg(&tail);
        // SAFETY: z holds rows · vocab f32, ids rows · k u32, out rows · (1 + tail) f32.
        unsafe { b.launch(config(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn backward(
        tail: bool,
        (z, (z0, z1)): Operand<'_>,
        (ids, (i0, i1)): Operand<'_>,
        (saved, (s0, s1)): Operand<'_>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<CudaStorage> {
        let dev = z.device().clone();
        let func = dev.get_or_load_custom_func("bucket_lse_backward_f32", "qat_bucket_lse", PTX)?;
        // [rows, 2c]: each row's forward output, then its gradient (the kernel reads both).
        let saved = saved.as_cuda_slice::<f32>()?.slice(s0..s1);
        let zs = z.as_cuda_slice::<f32>()?.slice(z0..z1);
        let is = ids.as_cuda_slice::<u32>()?.slice(i0..i1);
        // SAFETY: the kernel writes every element of every row.
        let dz = unsafe { dev.alloc::<f32>(rows * vocab)? };
        let (vocab, k, tail) = (vocab as u32, k as u32, i32::from(tail));
        let mut b = func.builder();
        b.arg(&zs).arg(&is).arg(&saved).arg(&dz);
        b.arg(&vocab).arg(&k).arg(&tail);
        // SAFETY: z and dz hold rows · vocab f32, ids rows · k u32, saved rows · 2c f32.
        unsafe { b.launch(config(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dz, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use qat_model::custom_op::max_abs_diff;

    /// The composed ops this op replaces: log_sum_exp, and log_sum_exp of the logits plus a
    /// mask that is -inf at the ids.
    fn composed(z: &Tensor, ids: &Tensor, tail: bool) -> Result<Tensor> {
        let all = z.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
        if !tail {
            return Ok(all);
        }
        let neg_inf = Tensor::full(f64::NEG_INFINITY, ids.dims2()?, z.device())?;
        let mask = z.zeros_like()?.scatter(ids, &neg_inf, 1)?;
        let rest = (z + mask)?.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
        Tensor::cat(&[&all, &rest], 1)
    }

    #[test]
    fn hand_worked_row() -> Result<()> {
        // Row [0, ln 3, 0, ln 2] with id 1 (and an out-of-range id, ignored): Σ exp = 7, the
        // tail without id 1 sums 4. Gradient of lse_all + 2·lse_tail: p_j + 2·p_tail_j.
        let z = Var::new(&[[0f64, 3f64.ln(), 0.0, 2f64.ln()]], &Device::Cpu)?;
        let ids = Tensor::new(&[[1u32, 9]], &Device::Cpu)?;
        let out = bucket_logsumexp(&z, &ids, true)?;
        let v = out.to_vec2::<f64>()?;
        assert!((v[0][0] - 7f64.ln()).abs() < 1e-15 && (v[0][1] - 4f64.ln()).abs() < 1e-15);
        let w = Tensor::new(&[[1f64, 2.0]], &Device::Cpu)?;
        let grads = (out * w)?.sum_all()?.backward()?;
        let g = grads.get(&z).expect("gradient").to_vec2::<f64>()?;
        let want = [
            1.0 / 7.0 + 2.0 / 4.0,
            3.0 / 7.0,
            1.0 / 7.0 + 2.0 / 4.0,
            2.0 / 7.0 + 1.0,
        ];
        for (a, b) in g[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{:?}", g[0]);
        }
        Ok(())
    }

    #[test]
    fn value_and_gradient_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, vocab, k) = (5, 300, 17);
        let z = Var::from_tensor(
            &(Tensor::arange(0f64, (rows * vocab) as f64, &dev)?
                .reshape((rows, vocab))?
                .affine(0.713, 0.0)?
                .sin()?
                * 7.0)?,
        )?;
        let ids: Vec<u32> = (0..rows * k)
            .map(|i| ((i * 131 + i / k * 7) % vocab) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (rows, k), &dev)?;
        for tail in [false, true] {
            let cols = 1 + usize::from(tail);
            let w = Tensor::arange(0f64, (rows * cols) as f64, &dev)?
                .reshape((rows, cols))?
                .cos()?;
            let (a, b) = (bucket_logsumexp(&z, &ids, tail)?, composed(&z, &ids, tail)?);
            assert!(
                max_abs_diff(&a, &b)? < 1e-12,
                "tail {tail}: {}",
                max_abs_diff(&a, &b)?
            );
            let ga = (a * &w)?.sum_all()?.backward()?;
            let gb = (b * &w)?.sum_all()?.backward()?;
            let (ga, gb) = (ga.get(&z).expect("grad"), gb.get(&z).expect("grad"));
            assert!(
                max_abs_diff(ga, gb)? < 1e-14,
                "tail {tail}: {}",
                max_abs_diff(ga, gb)?
            );
        }
        Ok(())
    }

    /// The CUDA kernels against the CPU op (f64) on the same f32 logits, value and gradient, at
    /// a 32k vocabulary with K = 64, and through `student_buckets` against its composed path.
    /// Runs only in a `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device (or a CPU-only build): skipped");
            return Ok(());
        };
        let (rows, vocab, k) = (37, 32000, 64);
        let z = (Tensor::arange(0f32, (rows * vocab) as f32, &Device::Cpu)?
            .reshape((rows, vocab))?
            .affine(0.377, 0.0)?
            .sin()?
            * 9.0)?;
        let ids: Vec<u32> = (0..rows * k)
            .map(|i| ((i * 7919 + i / k) % vocab) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (rows, k), &Device::Cpu)?;
        for tail in [false, true] {
            let cols = 1 + usize::from(tail);
            let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
                .reshape((rows, cols))?
                .cos()?;
            let zc = Var::from_tensor(&z.to_dtype(DType::F64)?)?;
            let want = bucket_logsumexp(&zc, &ids, tail)?;
            let want_g = (&want * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let zg = Var::from_tensor(&z.to_device(&gpu)?)?;
            let got = bucket_logsumexp(&zg, &ids.to_device(&gpu)?, tail)?;
            let got_g = (&got * w.to_device(&gpu)?)?.sum_all()?.backward()?;
            let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
            assert!(max_abs_diff(&got, &want)? < 1e-4, "tail {tail}");
            let gg = got_g.get(&zg).expect("grad").to_device(&Device::Cpu)?;
            let wg = want_g.get(&zc).expect("grad");
            assert!(
                max_abs_diff(&gg.to_dtype(DType::F64)?, wg)? < 1e-6,
                "tail {tail}"
            );
        }
        Ok(())
    }
}
