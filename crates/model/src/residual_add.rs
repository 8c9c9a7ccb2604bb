//! A residual add and the RMSNorm after it as one op, for inference on CUDA.
//!
//! Each decoder block adds its attention output to the residual stream and normalizes the sum
//! for the MLP, then adds the MLP output and normalizes that for the next block's attention.
//! Composed, that is an add and a norm launch each time (four per layer), and decoding a batch
//! one token at a time is bound by such launches, not by arithmetic. This op
//! (kernels/rms_norm.cu, `add_rms_norm`) writes the sum and its norm in one launch, reading the
//! residual and the delta once: `sum = T(x + delta)`, `y = T(sum / d · w)` with `d =
//! sqrt(Σ sum² · (1/n) + eps)` in f32, the values of the composed add and candle's inference
//! RMSNorm up to the norm's rounding.
//!
//! [`crate::Llama`] uses it in inference (fused kernels on, no gradient) on CUDA only, unless
//! `QAT_CUDA_FUSED_ADD_NORM=0`; the CPU keeps the composed ops and their bytes. The CPU
//! implementation here (f64 arithmetic) exists for the tests: they check it against the
//! composed ops, the kernel against it (through the CUDA emulation, tests/rms_norm_emulated.rs,
//! and on a GPU), and the model's wiring through it.

use crate::custom_op::{round_to, storage_from_f64, storage_to_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
struct AddRmsNorm {
    eps: f64,
}

const OP: &str = "add_rms_norm";

/// `[2, ..]`: the shape of the op's output for an operand of shape `shape`.
fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend(shape.dims());
    Shape::from(dims)
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        delta: &CpuStorage,
        ld: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ds, ws) = (
            storage_to_f64(x, lx, OP)?,
            storage_to_f64(delta, ld, OP)?,
            storage_to_f64(w, lw, OP)?,
        );
        let dtype = x.dtype();
        let n = ws.len().max(1);
        let sums: Vec<f64> = xs
            .iter()
            .zip(&ds)
            .map(|(a, b)| round_to(dtype, a + b))
            .collect();
        let mut out = sums.clone();
        for row in sums.chunks(n) {
            let d = crate::norm::denominator(row, self.eps);
            out.extend(row.iter().zip(&ws).map(|(v, w)| round_to(dtype, v / d * w)));
        }
        Ok((storage_from_f64(dtype, out), stacked(lx.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        delta: &candle_core::CudaStorage,
        ld: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let range = |l: &Layout| crate::custom_op::contiguous_range(l, OP, "operands");
        let out = cuda::forward(
            self.eps,
            (x, range(lx)?),
            (delta, range(ld)?),
            (w, range(lw)?),
        )?;
        Ok((out, stacked(lx.shape())))
    }
}

/// `x + delta` and the RMSNorm of it with weight `w: [n]` (cast to `x`'s dtype), for
/// `x, delta: [.., n]` of one dtype: `(sum, normed)`, both shaped like `x`. No gradient
/// (inference). Runs the op on any device; [`crate::Llama`] calls it where [`fused_add_norm_on`].
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let n = w.dims1()?;
    if x.dims().last() != Some(&n) || x.dims() != delta.dims() || x.dtype() != delta.dtype() {
        candle_core::bail!(
            "{OP}: x {:?} {:?} and delta {:?} {:?} must agree, with weight [{n}] last",
            x.dims(),
            x.dtype(),
            delta.dims(),
            delta.dtype()
        );
    }
    let w = w.to_dtype(x.dtype())?;
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &w.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// Whether inference runs the residual add and the next RMSNorm as [`add_rms_norm`]: CUDA
/// tensors of a float dtype the kernel takes (f32, bf16, f16), in `cuda` builds, unless
/// `QAT_CUDA_FUSED_ADD_NORM=0`.
pub fn fused_add_norm_on(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if tests::ON_CPU.get() {
        return true;
    }
    crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_ADD_NORM", x)
}

/// The CUDA side: `add_rms_norm_*` of kernels/rms_norm.cu.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    const BLOCK: u32 = 256; // NORM_BLOCK

    type Operand<'a> = (&'a CudaStorage, (usize, usize));

    pub(super) fn forward(
        eps: f64,
        x: Operand<'_>,
        delta: Operand<'_>,
        w: Operand<'_>,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr>(
            eps: f64,
            (x, (x0, x1)): Operand<'_>,
            (delta, (d0, d1)): Operand<'_>,
            (w, (w0, w1)): Operand<'_>,
        ) -> Result<CudaStorage> {
            let dev = x.device().clone();
            let (el, n) = (x1 - x0, w1 - w0);
            if d1 - d0 != el || n == 0 || el % n != 0 {
                candle_core::bail!(
                    "add_rms_norm on cuda: x has {el} elements, delta {}, weight {n}",
                    d1 - d0
                );
            }
            let rows = el / n;
            let sfx = crate::kernel_switch::float_kernel_suffix(x.dtype(), super::OP)?;
            let func =
                dev.get_or_load_custom_func(&format!("add_rms_norm_{sfx}"), "qat_rms_norm", PTX)?;
            let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
            let ds = delta.as_cuda_slice::<T>()?.slice(d0..d1);
            let ws = w.as_cuda_slice::<T>()?.slice(w0..w1);
            // SAFETY: the kernel writes every element of out (the sums, then the norms).
            let out = unsafe { dev.alloc::<T>(2 * el)? };
            let (rows32, n32, eps32) = (rows as u32, n as u32, eps as f32);
            let mut b = func.builder();
            b.arg(&xs)
                .arg(&ds)
                .arg(&ws)
                .arg(&out)
                .arg(&rows32)
                .arg(&n32)
                .arg(&eps32);
            let cfg = LaunchConfig {
                grid_dim: (rows32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x and delta hold rows · n elements, w n, out 2 · rows · n.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        match x.0.dtype() {
            DType::F32 => run::<f32>(eps, x, delta, w),
            DType::BF16 => run::<half::bf16>(eps, x, delta, w),
            DType::F16 => run::<half::f16>(eps, x, delta, w),
            other => candle_core::bail!("add_rms_norm on cuda: dtype {other:?}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::custom_op::max_abs_diff;
    use candle_core::{DType, Device};
    use std::cell::Cell;

    thread_local! {
        /// Unit tests of the model's wiring can turn the op on for CPU tensors.
        pub(crate) static ON_CPU: Cell<bool> = const { Cell::new(false) };
    }

    fn values(shape: &[usize], seed: f64, dev: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        (Tensor::arange(0f64, n as f64, dev)?
            .affine(0.37, seed)?
            .sin()?
            * 3.0)?
            .reshape(shape)
    }

    #[test]
    fn hand_worked_row() -> Result<()> {
        // x + delta = [3, 4], w = [1, 2], eps = 0: mean(sum²) = 12.5, d = √12.5.
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f64, 5.0]], &dev)?;
        let delta = Tensor::new(&[[2f64, -1.0]], &dev)?;
        let w = Tensor::new(&[1f64, 2.0], &dev)?;
        let (sum, y) = add_rms_norm(&x, &delta, &w, 0.0)?;
        assert_eq!(sum.to_vec2::<f64>()?, [[3.0, 4.0]]);
        let (y, d) = (y.to_vec2::<f64>()?, 12.5f64.sqrt());
        assert!((y[0][0] - 3.0 / d).abs() < 1e-15 && (y[0][1] - 8.0 / d).abs() < 1e-15);
        Ok(())
    }

    /// Against the composed ops the model runs without it: the add, then candle's RMSNorm.
    #[test]
    fn matches_the_add_and_candles_rms_norm() -> Result<()> {
        let dev = Device::Cpu;
        let (x, delta) = (
            values(&[2, 3, 300], 0.0, &dev)?,
            values(&[2, 3, 300], 1.0, &dev)?,
        );
        let w = values(&[300], 2.0, &dev)?.affine(0.2, 1.0)?;
        for (dtype, tol) in [(DType::F32, 2e-6), (DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let (x, delta, w) = (
                x.to_dtype(dtype)?,
                delta.to_dtype(dtype)?,
                w.to_dtype(dtype)?,
            );
            let (sum, y) = add_rms_norm(&x, &delta, &w, 1e-5)?;
            assert_eq!(
                (sum.dims(), y.dims(), y.dtype()),
                (x.dims(), x.dims(), dtype)
            );
            let want_sum = (&x + &delta)?;
            let f32s = |t: &Tensor| t.to_dtype(DType::F32);
            let want_y = candle_nn::ops::rms_norm(&f32s(&want_sum)?, &f32s(&w)?, 1e-5)?;
            assert_eq!(
                max_abs_diff(&f32s(&sum)?, &f32s(&want_sum)?)?,
                0.0,
                "{dtype:?} sum"
            );
            let diff = max_abs_diff(&f32s(&y)?, &want_y)?;
            assert!(diff < tol * 4.0, "{dtype:?} y: {diff}");
        }
        let err = add_rms_norm(&x, &x.narrow(2, 0, 299)?, &w, 1e-5).unwrap_err();
        assert!(err.to_string().contains("must agree"), "{err}");
        Ok(())
    }

    /// The CUDA kernel against the CPU op (f64) on the same inputs, f32 / bf16 / f16, at
    /// TinyLlama's hidden size, and against the composed add and candle's RMSNorm on the GPU.
    /// Runs only in a `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let cpu = Device::Cpu;
        let (x, delta) = (
            values(&[300, 2048], 0.0, &cpu)?,
            values(&[300, 2048], 1.0, &cpu)?,
        );
        let w = values(&[2048], 2.0, &cpu)?.affine(0.2, 1.0)?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let (x, delta, w) = (
                x.to_dtype(dtype)?,
                delta.to_dtype(dtype)?,
                w.to_dtype(dtype)?,
            );
            let on = |t: &Tensor| t.to_device(&gpu);
            let (sum, y) = add_rms_norm(&on(&x)?, &on(&delta)?, &on(&w)?, 1e-5)?;
            let f64s = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F64);
            let (want_sum, want_y) = add_rms_norm(&x, &delta, &w, 1e-5)?;
            let scale =
                |t: &Tensor| -> Result<f64> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>() };
            let (sum, y, want_sum, want_y) =
                (f64s(&sum)?, f64s(&y)?, f64s(&want_sum)?, f64s(&want_y)?);
            assert!(
                max_abs_diff(&sum, &want_sum)? <= tol * scale(&want_sum)?,
                "{dtype:?} sum"
            );
            assert!(
                max_abs_diff(&y, &want_y)? <= tol * scale(&want_y)?,
                "{dtype:?} y"
            );
            let composed = candle_nn::ops::rms_norm(&(on(&x)? + on(&delta)?)?, &on(&w)?, 1e-5)?;
            let composed = f64s(&composed)?;
            assert!(
                max_abs_diff(&y, &composed)? <= tol * scale(&composed)?,
                "{dtype:?} vs candle"
            );
        }
        Ok(())
    }
}
