//! The global gradient norm's per-tensor sums of squares as one read of each gradient, on CUDA.
//!
//! The composed `g.sqr().sum_all()` writes an f32 copy of every gradient and reads it back: for
//! a 1.1B-parameter model, about 13 GB of memory traffic per step where one read, 4.4 GB, is
//! enough. [`sum_squares_into`] sums `g²` in f64 (kernels/sum_squares.cu: per-block sums over a
//! grid-stride slice, then one block over the blocks, both in a fixed order) into one slot of a
//! per-step f64 buffer, which the caller copies to the host once for all tensors.
//!
//! Used by [`crate::optim::grad_norm`] for f32 gradients on CUDA (`QAT_CUDA_FUSED_GRAD_NORM=0`
//! turns it off); the CPU keeps the composed ops, so CPU runs are byte-identical to before. The
//! CPU implementation (f64) exists for the tests: the kernels run against it through the CUDA
//! emulation (tests/sum_squares_emulated.rs) and on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use qat_model::custom_op::contiguous_range;
use qat_model::kernel_switch::cuda_kernel_on;

/// Blocks of the first stage at most (the second stage sums their partial sums).
pub const PARTIALS: usize = 1024;

/// `out[slot] ← Σ g²` (f64), `out` being the destination of the in-place op.
#[derive(Debug, Clone, Copy)]
struct SumSquaresInto {
    slot: usize,
}

impl InplaceOp2 for SumSquaresInto {
    fn name(&self) -> &'static str {
        "sum-squares-into"
    }

    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        lo: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<()> {
        let ((o0, o1), (g0, g1)) = (
            contiguous_range(lo, "sum_squares_into", "operands")?,
            contiguous_range(lg, "sum_squares_into", "operands")?,
        );
        let sum: f64 = match g {
            CpuStorage::F32(v) => v[g0..g1].iter().map(|&x| f64::from(x) * f64::from(x)).sum(),
            CpuStorage::F64(v) => v[g0..g1].iter().map(|&x| x * x).sum(),
            CpuStorage::BF16(v) => v[g0..g1].iter().map(|&x| x.to_f64() * x.to_f64()).sum(),
            CpuStorage::F16(v) => v[g0..g1].iter().map(|&x| x.to_f64() * x.to_f64()).sum(),
            other => candle_core::bail!(
                "sum_squares_into: dtype {:?}, expected F32, F64, BF16 or F16",
                other.dtype()
            ),
        };
        match out {
            CpuStorage::F64(o) if self.slot < o1 - o0 => o[o0 + self.slot] = sum,
            _ => candle_core::bail!(
                "sum_squares_into: slot {} of an f64 buffer of {} elements",
                self.slot,
                o1 - o0
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &mut candle_core::CudaStorage,
        lo: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sum_squares.ptx"));

        let ((o0, o1), (g0, g1)) = (
            contiguous_range(lo, "sum_squares_into", "operands")?,
            contiguous_range(lg, "sum_squares_into", "operands")?,
        );
        if self.slot >= o1 - o0 {
            candle_core::bail!(
                "sum_squares_into: slot {} of a buffer of {} elements",
                self.slot,
                o1 - o0
            );
        }
        let dev = g.device().clone();
        let n = g1 - g0;
        let blocks = n.div_ceil(256).clamp(1, PARTIALS);
        let sfx = qat_model::kernel_switch::float_kernel_suffix(g.dtype(), "sum_squares_into")?;
        // SAFETY: the first kernel writes all `blocks` partial sums.
        let partial = unsafe { dev.alloc::<f64>(blocks)? };
        let func = dev.get_or_load_custom_func(
            &format!("sum_squares_partial_{sfx}"),
            "qat_sum_squares",
            PTX,
        )?;
        let n64 = n as u64;
        let gs = qat_model::custom_op::FloatView::of(g, (g0, g1), "sum_squares_into")?;
        let mut b = func.builder();
        gs.push(&mut b);
        b.arg(&n64).arg(&partial);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1), // SQ_BLOCK
            shared_mem_bytes: 0,
        };
        // SAFETY: g holds n elements of its dtype, partial `blocks` f64.
        unsafe { b.launch(cfg) }.w()?;
        let func = dev.get_or_load_custom_func("sum_squares_final_f64", "qat_sum_squares", PTX)?;
        let mut os = out.as_cuda_slice_mut::<f64>()?.slice_mut(o0..o1);
        let (blocks32, slot32) = (blocks as u32, self.slot as u32);
        let mut b = func.builder();
        b.arg(&partial).arg(&blocks32).arg(&mut os).arg(&slot32);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            ..cfg
        };
        // SAFETY: partial holds `blocks` f64; slot is inside out (checked).
        unsafe { b.launch(one) }.w()?;
        Ok(())
    }
}

/// Writes `Σ g²` (f64) into `out[slot]`; `out` is a contiguous f64 vector on `g`'s device.
pub fn sum_squares_into(out: &Tensor, slot: usize, g: &Tensor) -> Result<()> {
    out.inplace_op2(&g.contiguous()?, &SumSquaresInto { slot })
}

/// Whether [`crate::optim::grad_norm`] sums squares with [`sum_squares_into`]: f32 gradients on
/// CUDA, and the bf16 / f16 ones of f32 weights cast to 16 bits in the forward pass
/// ([`crate::grad_sum::GradSum`]), in `cuda` builds, unless `QAT_CUDA_FUSED_GRAD_NORM=0`.
pub fn fused_on(g: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cuda_kernel_on(&ON, "QAT_CUDA_FUSED_GRAD_NORM", g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn slots_hold_each_tensors_sum_of_squares() -> Result<()> {
        let dev = Device::Cpu;
        let out = Tensor::zeros(3, DType::F64, &dev)?;
        let a = Tensor::new(&[3f32, 4.0], &dev)?;
        let b = Tensor::new(&[[1f32, -2.0], [0.5, 0.0]], &dev)?;
        sum_squares_into(&out, 0, &a)?;
        sum_squares_into(&out, 2, &b)?;
        assert_eq!(out.to_vec1::<f64>()?, [25.0, 0.0, 5.25]);
        let err = sum_squares_into(&out, 3, &a).unwrap_err().to_string();
        assert!(err.contains("slot 3"), "{err}");
        Ok(())
    }

    /// The CUDA kernels against the CPU op on the same gradients (a tensor longer than
    /// PARTIALS blocks of 256 and a short one). Runs only in a `--features cuda` build on a
    /// machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let long = (Tensor::arange(0f32, 600_001.0, &Device::Cpu)?
            .affine(0.37, 0.0)?
            .sin()?
            * 3.0)?;
        let short = Tensor::new(&[1f32, -2.0, 3.5], &Device::Cpu)?;
        let (cpu, cuda) = (
            Tensor::zeros(2, DType::F64, &Device::Cpu)?,
            Tensor::zeros(2, DType::F64, &gpu)?,
        );
        for (slot, g) in [&long, &short].into_iter().enumerate() {
            sum_squares_into(&cpu, slot, g)?;
            sum_squares_into(&cuda, slot, &g.to_device(&gpu)?)?;
        }
        let (a, b) = (cpu.to_vec1::<f64>()?, cuda.to_vec1::<f64>()?);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-12 * x.abs(), "{a:?} vs {b:?}");
        }
        Ok(())
    }
}
