//! The student's side of the top-K loss ([`super::student_buckets`]) as one differentiable op:
//! per row of logits, `log Σ_j exp(z_j)` over the vocabulary, with a tail `log Σ_{j ∉ ids}
//! exp(z_j)` over the ids outside the row's top K, and the logits at the K ids (the gather).
//!
//! On CUDA (f32, bf16 or f16 logits) this is kernels/bucket_lse.cu: one pass over the `[rows,
//! vocab]` logits forward and one backward, where the composed ops (a cast to f32, two
//! `log_sum_exp`s, a `[rows, vocab]` `-inf` mask built by a scatter, its add, the gather, and all
//! their backward passes: the gather's is a scatter-add into a `[rows, vocab]` tensor of zeros)
//! make about 40. At batch 4 × 1024 with a 32k vocabulary one such pass moves 0.5 GB in f32. The
//! gradient is `dz_j = g_all · exp(z_j − lse_all) + g_tail · exp(z_j − lse_tail) · [j ∉ ids] +
//! Σ_{i: ids_i = j} g_i`, from the saved output, so the backward reads the logits once and writes
//! the gradient once, in the logits' type.
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

/// The forward op: `[rows, vocab]` logits and `[rows, k]` ids → `[rows, 1 + tail + k]`.
#[derive(Debug, Clone, Copy)]
struct BucketLse {
    tail: bool,
}

/// The backward op: logits, ids and `[rows, 2c + k]` = the forward's log-sum-exps ‖ the gradient
/// of the whole output (c = 1 + tail) → `dz`.
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
        let cols = 1 + usize::from(self.tail) + k;
        let out: Vec<f64> = values
            .par_chunks(vocab.max(1))
            .zip(ids.par_chunks(k.max(1)))
            .flat_map_iter(|(row, ids)| {
                let all = logsumexp(row, |_| true);
                let tail = self.tail.then(|| {
                    let set = id_set(ids, vocab);
                    logsumexp(row, |j| !set[j])
                });
                let gathered = ids
                    .iter()
                    .map(|&id| row.get(id as usize).copied().unwrap_or(f64::NEG_INFINITY));
                std::iter::once(all).chain(tail).chain(gathered)
            })
            .collect();
        Ok((
            storage_from_f64(output_dtype(z.dtype()), out),
            Shape::from((rows, cols)),
        ))
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
        Ok((out, Shape::from((rows, 1 + usize::from(self.tail) + k))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        ids: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = 1 + usize::from(self.tail);
        let saved = Tensor::cat(
            &[&res.narrow(1, 0, c)?, &grad_res.to_dtype(res.dtype())?],
            1,
        )?;
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
            .zip(saved.par_chunks(2 * c + k))
            .flat_map_iter(|((row, ids), s)| {
                let (lse_all, g_all) = (s[0], s[c]);
                let set = id_set(ids, vocab);
                let tail = self.tail.then(|| (s[1], s[c + 1]));
                let mut d: Vec<f64> = row
                    .iter()
                    .enumerate()
                    .map(|(j, &x)| {
                        let mut v = g_all * (x - lse_all).exp();
                        if let (Some((lse_tail, g_tail)), false) = (tail, set[j]) {
                            v += g_tail * (x - lse_tail).exp();
                        }
                        v
                    })
                    .collect();
                // The gathered logits' gradients, added in id order (ids out of range have none).
                for (&id, &g) in ids.iter().zip(&s[2 * c..]) {
                    if let Some(slot) = d.get_mut(id as usize) {
                        *slot += g;
                    }
                }
                d
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

/// The type of the op's output: f64 for f64 logits (the tests' CPU reference), else f32.
fn output_dtype(logits: DType) -> DType {
    match logits {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `[rows, c + k]` per row of `logits` (`[rows, vocab]`, f32, bf16 or f16; f64 on the CPU) and
/// `ids` (`[rows, k]` u32), c = 1 + `tail`: the log-sum-exp over the vocabulary, with `tail` the
/// log-sum-exp over the ids not in that row of `ids`, then the logits at the `k` ids (`-inf` for
/// an id out of range). In f32 (f64 for f64 logits); differentiable in `logits`, whose gradient
/// has their type.
pub fn top_k_buckets(logits: &Tensor, ids: &Tensor, tail: bool) -> Result<Tensor> {
    let ((rows, _), (id_rows, _)) = (logits.dims2()?, ids.dims2()?);
    if rows != id_rows || ids.dtype() != DType::U32 {
        candle_core::bail!(
            "top_k_buckets: ids {:?} {:?}, expected U32 with {rows} rows",
            ids.dims(),
            ids.dtype()
        );
    }
    logits
        .contiguous()?
        .apply_op2(&ids.contiguous()?, BucketLse { tail })
}

/// Whether [`super::student_buckets`] takes the fused op for these logits: f32, bf16 or f16 on
/// CUDA (`cuda` builds, unless `QAT_CUDA_FUSED_LOSS=0`), with a vocabulary the kernel's bitmask
/// holds.
pub fn fused_on(logits: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    logits.dims().last().is_some_and(|&v| v <= MAX_VOCAB)
        && cuda_kernel_on(&ON, "QAT_CUDA_FUSED_LOSS", logits)
}

/// The CUDA side: kernels/bucket_lse.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bucket_lse.ptx"));

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1), // LSE_BLOCK
            shared_mem_bytes: 0,    // static: the id bitmask and the reduction scratch
        }
    }

    type Operand<'a> = (&'a CudaStorage, (usize, usize));

    /// The kernel `name` + `_f32` / `_bf16` / `_f16` for the logits' dtype.
    fn kernel_name(z: &CudaStorage, name: &str) -> Result<String> {
        let suffix = qat_model::kernel_switch::float_kernel_suffix(z.dtype(), name)?;
        Ok(format!("{name}_{suffix}"))
    }

    pub(super) fn forward(
        tail: bool,
        z: Operand<'_>,
        ids: Operand<'_>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<CudaStorage> {
        match z.0.dtype() {
            DType::BF16 => forward_as::<half::bf16>(tail, z, ids, rows, vocab, k),
            DType::F16 => forward_as::<half::f16>(tail, z, ids, rows, vocab, k),
            _ => forward_as::<f32>(tail, z, ids, rows, vocab, k),
        }
    }

    fn forward_as<T: CudaDType + DeviceRepr>(
        tail: bool,
        (z, (z0, z1)): Operand<'_>,
        (ids, (i0, i1)): Operand<'_>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<CudaStorage> {
        let dev = z.device().clone();
        let func =
            dev.get_or_load_custom_func(&kernel_name(z, "bucket_lse")?, "qat_bucket_lse", PTX)?;
        let zs = z.as_cuda_slice::<T>()?.slice(z0..z1);
        let is = ids.as_cuda_slice::<u32>()?.slice(i0..i1);
        // SAFETY: the kernel writes every output element (the log-sum-exps by thread 0 of each
        // row's block, the k gathered logits by the block's threads).
        let out = unsafe { dev.alloc::<f32>(rows * (1 + usize::from(tail) + k))? };
        let (vocab, k, tail) = (vocab as u32, k as u32, i32::from(tail));
        let mut b = func.builder();
        b.arg(&zs).arg(&is).arg(&out).arg(&vocab).arg(&k).arg(&tail);
        // SAFETY: z holds rows · vocab T, ids rows · k u32, out rows · (1 + tail + k) f32.
        unsafe { b.launch(config(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn backward(
        tail: bool,
        z: Operand<'_>,
        ids: Operand<'_>,
        saved: Operand<'_>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<CudaStorage> {
        match z.0.dtype() {
            DType::BF16 => backward_as::<half::bf16>(tail, z, ids, saved, rows, vocab, k),
            DType::F16 => backward_as::<half::f16>(tail, z, ids, saved, rows, vocab, k),
            _ => backward_as::<f32>(tail, z, ids, saved, rows, vocab, k),
        }
    }

    fn backward_as<T: CudaDType + DeviceRepr>(
        tail: bool,
        (z, (z0, z1)): Operand<'_>,
        (ids, (i0, i1)): Operand<'_>,
        (saved, (s0, s1)): Operand<'_>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<CudaStorage> {
        let dev = z.device().clone();
        let name = kernel_name(z, "bucket_lse_backward")?;
        let func = dev.get_or_load_custom_func(&name, "qat_bucket_lse", PTX)?;
        // [rows, 2c + k]: each row's log-sum-exps, then the gradient of its whole output.
        let saved = saved.as_cuda_slice::<f32>()?.slice(s0..s1);
        let zs = z.as_cuda_slice::<T>()?.slice(z0..z1);
        let is = ids.as_cuda_slice::<u32>()?.slice(i0..i1);
        // SAFETY: the kernel writes every element of every row (the columns outside the ids in
        // one loop, the ids' columns in another).
        let dz = unsafe { dev.alloc::<T>(rows * vocab)? };
        let (vocab, k, tail) = (vocab as u32, k as u32, i32::from(tail));
        let mut b = func.builder();
        b.arg(&zs).arg(&is).arg(&saved).arg(&dz);
        b.arg(&vocab).arg(&k).arg(&tail);
        // SAFETY: z and dz hold rows · vocab T, ids rows · k u32, saved rows · (2c + k) f32.
        unsafe { b.launch(config(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dz, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{Loss, LossKind, TopKTargets};
    use candle_core::{Device, Var, D};
    use qat_model::custom_op::max_abs_diff;

    /// The composed ops this op replaces: log_sum_exp, log_sum_exp of the logits plus a mask
    /// that is -inf at the ids, and the gather.
    fn composed(z: &Tensor, ids: &Tensor, tail: bool) -> Result<Tensor> {
        let all = z.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
        let gathered = z.gather(ids, D::Minus1)?;
        if !tail {
            return Tensor::cat(&[&all, &gathered], 1);
        }
        let neg_inf = Tensor::full(f64::NEG_INFINITY, ids.dims2()?, z.device())?;
        let mask = z.zeros_like()?.scatter(ids, &neg_inf, 1)?;
        let rest = (z + mask)?.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
        Tensor::cat(&[&all, &rest, &gathered], 1)
    }

    #[test]
    fn hand_worked_row() -> Result<()> {
        // Row [0, ln 3, 0, ln 2] with ids 1 and 3: Σ exp = 7, the tail without them sums 2;
        // gathered ln 3, ln 2. Gradient of lse_all + 2·lse_tail + 3·z_1 − z_3:
        // p_j + 2·p_tail_j + 3·[j = 1] − [j = 3] = [1/7 + 1, 3/7 + 3, 1/7 + 1, 2/7 − 1].
        let z = Var::new(&[[0f64, 3f64.ln(), 0.0, 2f64.ln()]], &Device::Cpu)?;
        let ids = Tensor::new(&[[1u32, 3]], &Device::Cpu)?;
        let out = top_k_buckets(&z, &ids, true)?;
        let v = out.to_vec2::<f64>()?;
        let want = [7f64.ln(), 2f64.ln(), 3f64.ln(), 2f64.ln()];
        for (a, b) in v[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{:?}", v[0]);
        }
        let w = Tensor::new(&[[1f64, 2.0, 3.0, -1.0]], &Device::Cpu)?;
        let grads = (out * w)?.sum_all()?.backward()?;
        let g = grads.get(&z).expect("gradient").to_vec2::<f64>()?;
        let want = [
            1.0 / 7.0 + 1.0,
            3.0 / 7.0 + 3.0,
            1.0 / 7.0 + 1.0,
            2.0 / 7.0 - 1.0,
        ];
        for (a, b) in g[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{:?}", g[0]);
        }
        // A repeated id gets both gradients, an id out of range is gathered as -inf and gets
        // none: ids [1, 1, 9], weights 0 on the log-sum-exps, 2 and 5 on the gathers.
        let ids = Tensor::new(&[[1u32, 1, 9]], &Device::Cpu)?;
        let out = top_k_buckets(&z, &ids, false)?;
        assert_eq!(out.to_vec2::<f64>()?[0][3], f64::NEG_INFINITY);
        let w = Tensor::new(&[[0f64, 2.0, 5.0, 0.0]], &Device::Cpu)?;
        let grads = (out.narrow(1, 0, 3)? * w.narrow(1, 0, 3)?)?
            .sum_all()?
            .backward()?;
        let g = grads.get(&z).expect("gradient").to_vec2::<f64>()?;
        assert_eq!(g[0], [0.0, 7.0, 0.0, 0.0]);
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
        // Distinct ids per row, as top-K ids are.
        let ids: Vec<u32> = (0..rows * k)
            .map(|i| ((i % k * 17 + i / k * 7) % vocab) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (rows, k), &dev)?;
        for tail in [false, true] {
            let cols = 1 + usize::from(tail) + k;
            let w = Tensor::arange(0f64, (rows * cols) as f64, &dev)?
                .reshape((rows, cols))?
                .cos()?;
            let (a, b) = (top_k_buckets(&z, &ids, tail)?, composed(&z, &ids, tail)?);
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

    /// The CUDA kernels against the CPU op (f64) on the same logits, value and gradient, at a
    /// 32k vocabulary with K = 64, for f32 and bf16 logits. Runs only in a `--features cuda`
    /// build on a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, vocab, k) = (37, 32000, 64);
        let z32 = (Tensor::arange(0f32, (rows * vocab) as f32, &Device::Cpu)?
            .reshape((rows, vocab))?
            .affine(0.377, 0.0)?
            .sin()?
            * 9.0)?;
        let ids: Vec<u32> = (0..rows * k)
            .map(|i| ((i % k * 499 + i / k) % vocab) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (rows, k), &Device::Cpu)?;
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let z = z32.to_dtype(dtype)?;
            for tail in [false, true] {
                let cols = 1 + usize::from(tail) + k;
                let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
                    .reshape((rows, cols))?
                    .cos()?;
                let zc = Var::from_tensor(&z.to_dtype(DType::F64)?)?;
                let want = top_k_buckets(&zc, &ids, tail)?;
                let want_g = (&want * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
                let zg = Var::from_tensor(&z.to_device(&gpu)?)?;
                let got = top_k_buckets(&zg, &ids.to_device(&gpu)?, tail)?;
                assert_eq!(got.dtype(), DType::F32);
                let got_g = (&got * w.to_device(&gpu)?)?.sum_all()?.backward()?;
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
                assert!(max_abs_diff(&got, &want)? < 1e-4, "{dtype:?} tail {tail}");
                let gg = got_g.get(&zg).expect("grad").to_device(&Device::Cpu)?;
                assert_eq!(gg.dtype(), dtype);
                let wg = want_g.get(&zc).expect("grad");
                let diff = max_abs_diff(&gg.to_dtype(DType::F64)?, wg)?;
                assert!(diff < tol, "{dtype:?} tail {tail}: {diff}");
            }
        }

        // The whole student side of every loss: the fused path on the GPU (bf16 logits, as
        // training feeds them) against the composed ops on the CPU (the same values in f32),
        // loss and gradient, with a tail bucket (K = 64 < V).
        let logp: Vec<f32> = (0..rows * k)
            .map(|i| -4.0 - (i % k) as f32 * 0.05)
            .collect();
        let z = z32.to_dtype(DType::BF16)?;
        for kind in LossKind::ALL {
            let gamma = (kind == LossKind::Cakld).then_some(0.3);
            let loss = Loss::new(kind, gamma).expect("loss");
            let mut per_device = Vec::new();
            for (dev, fused) in [(&gpu, true), (&Device::Cpu, false)] {
                let targets = TopKTargets::new(
                    ids.flatten_all()?.to_vec1()?,
                    logp.clone(),
                    rows,
                    k,
                    vocab,
                    dev,
                )?;
                let zv = Var::from_tensor(&z.to_device(dev)?)?;
                assert_eq!(fused_on(zv.as_tensor()), fused);
                let value = loss.mean(zv.as_tensor(), &targets)?;
                let grad = value.backward()?.get(&zv).expect("grad").clone();
                per_device.push((
                    value.to_device(&Device::Cpu)?.to_scalar::<f32>()?,
                    grad.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
                ));
            }
            let ((a, ga), (b, gb)) = (&per_device[0], &per_device[1]);
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{kind}: {a} vs {b}"
            );
            // Both gradients are bf16, each rounded once from f32 (exp and sums may differ
            // in the last f32 bits between the devices): a bf16 step of the largest at most.
            let (diff, scale) = (
                max_abs_diff(ga, gb)?,
                gb.abs()?.max_all()?.to_scalar::<f64>()?,
            );
            assert!(
                diff <= scale / 128.0,
                "{kind}: gradient {diff} (largest {scale})"
            );
        }
        Ok(())
    }
}
