//! RMSNorm as one op *with* a gradient, for training on CUDA.
//!
//! candle's fused `rms_norm` has no backward pass, so training composed RMSNorm from about ten
//! candle ops (f32 copy, square, mean, add, sqrt, divide, cast, multiply), about 20 passes over
//! the `[rows, hidden]` activations with the backward, for each of a layer's two norms. This op
//! computes the composition's values (kernels/rms_norm.cu: `y = T(T(x / d) · w)`, `d =
//! sqrt(Σx² · (1/n) + eps)` in f32) in one pass, and its gradient in one pass per row for `dx`
//! plus a two-stage column sum for `dw`, in a fixed order (deterministic).
//!
//! Used by [`crate::Llama`] in training on CUDA only (`QAT_CUDA_FUSED_NORM=0` turns it off); the
//! CPU keeps the composed ops and their exact numerics. The CPU implementation here (f64
//! arithmetic) exists for the tests, which check it against the composed ops in value and
//! gradient, and the kernels against it (through the CUDA emulation,
//! tests/rms_norm_emulated.rs, and on a GPU).

use crate::custom_op::{round_to, storage_from_f64, storage_to_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
struct RmsNormWithGrad {
    eps: f64,
}

/// Backward: `(x, w, dy)` → `[rows · n + n]`: `dx` (row-major), then `dw`.
#[derive(Debug, Clone, Copy)]
struct RmsNormBackward {
    eps: f64,
}

const OP: &str = "rms_norm_with_grad";

/// The element range of a contiguous operand (the CUDA kernels take contiguous operands).
#[cfg(feature = "cuda")]
fn contiguous(l: &Layout) -> Result<(usize, usize)> {
    crate::custom_op::contiguous_range(l, OP, "operands")
}

/// `d = sqrt(mean(x²) + eps)` of one row, in f64.
pub(crate) fn denominator(row: &[f64], eps: f64) -> f64 {
    (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt()
}

impl CustomOp2 for RmsNormWithGrad {
    fn name(&self) -> &'static str {
        "rms-norm-with-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ws) = (storage_to_f64(x, lx, OP)?, storage_to_f64(w, lw, OP)?);
        let dtype = x.dtype();
        let n = ws.len().max(1);
        let mut y = Vec::with_capacity(xs.len());
        for row in xs.chunks(n) {
            let d = denominator(row, self.eps);
            y.extend(row.iter().zip(&ws).map(|(v, w)| round_to(dtype, v / d) * w));
        }
        Ok((storage_from_f64(dtype, y), lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::forward(self.eps, (x, contiguous(lx)?), (w, contiguous(lw)?))?;
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let both = x.apply_op3_no_bwd(w, &dy, &RmsNormBackward { eps: self.eps })?;
        let dx = both.narrow(0, 0, x.elem_count())?.reshape(x.shape())?;
        let dw = both.narrow(0, x.elem_count(), n)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-with-grad-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ws, dys) = (
            storage_to_f64(x, lx, OP)?,
            storage_to_f64(w, lw, OP)?,
            storage_to_f64(dy, ldy, OP)?,
        );
        let n = ws.len().max(1);
        let mut out = Vec::with_capacity(xs.len() + n);
        let mut dw = vec![0f64; n];
        for (row, dyr) in xs.chunks(n).zip(dys.chunks(n)) {
            let d = denominator(row, self.eps);
            let g: Vec<f64> = dyr.iter().zip(&ws).map(|(a, b)| a * b).collect();
            let mean_dot = g.iter().zip(row).map(|(g, v)| g * v / d).sum::<f64>() / n as f64;
            out.extend(g.iter().zip(row).map(|(g, v)| (g - v / d * mean_dot) / d));
            for ((acc, dy), v) in dw.iter_mut().zip(dyr).zip(row) {
                *acc += dy * v / d;
            }
        }
        out.extend(dw);
        let len = out.len();
        Ok((storage_from_f64(x.dtype(), out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        dy: &candle_core::CudaStorage,
        ldy: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = lw.shape().elem_count();
        let len = lx.shape().elem_count() + n;
        let out = cuda::backward(
            self.eps,
            (x, contiguous(lx)?),
            (w, contiguous(lw)?),
            (dy, contiguous(ldy)?),
        )?;
        Ok((out, Shape::from(len)))
    }
}

/// RMSNorm of `x: [.., n]` with weight `w: [n]` (cast to `x`'s dtype), differentiable in both:
/// the values of the composed RMSNorm in [`crate::Llama`] (f32 inside for 16-bit `x`).
pub fn rms_norm_with_grad(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let n = w.dims1()?;
    if x.dims().last() != Some(&n) {
        candle_core::bail!("rms_norm_with_grad: x {:?}, weight [{n}]", x.dims());
    }
    let w = w.to_dtype(x.dtype())?;
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormWithGrad { eps })
}

/// Whether training runs RMSNorm as [`rms_norm_with_grad`]: CUDA tensors of a float dtype the
/// kernels take (f32, bf16, f16), in `cuda` builds, unless `QAT_CUDA_FUSED_NORM=0`.
pub fn fused_norm_on(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_NORM", x)
}

/// The CUDA side: kernels/rms_norm.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    const BLOCK: u32 = 256; // NORM_BLOCK, DW_COLS
    const DW_ROWS: usize = 64;

    type Operand<'a> = (&'a CudaStorage, (usize, usize));

    fn suffix(dtype: DType) -> Result<&'static str> {
        crate::kernel_switch::float_kernel_suffix(dtype, "rms_norm_with_grad")
    }

    fn rows_grid(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn forward(
        eps: f64,
        (x, (x0, x1)): Operand<'_>,
        (w, (w0, w1)): Operand<'_>,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr>(
            eps: f64,
            (x, (x0, x1)): Operand<'_>,
            (w, (w0, w1)): Operand<'_>,
        ) -> Result<CudaStorage> {
            let dev = x.device().clone();
            let n = w1 - w0;
            let rows = (x1 - x0) / n.max(1);
            let name = format!("rms_norm_fwd_{}", suffix(x.dtype())?);
            let func = dev.get_or_load_custom_func(&name, "qat_rms_norm", PTX)?;
            let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
            let ws = w.as_cuda_slice::<T>()?.slice(w0..w1);
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(x1 - x0)? };
            let (n32, eps32) = (n as u32, eps as f32);
            let mut b = func.builder();
            b.arg(&xs).arg(&ws).arg(&y).arg(&n32).arg(&eps32);
            // SAFETY: x and y hold rows · n elements, w n.
            unsafe { b.launch(rows_grid(rows)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev))
        }
        match x.dtype() {
            DType::F32 => run::<f32>(eps, (x, (x0, x1)), (w, (w0, w1))),
            DType::BF16 => run::<half::bf16>(eps, (x, (x0, x1)), (w, (w0, w1))),
            DType::F16 => run::<half::f16>(eps, (x, (x0, x1)), (w, (w0, w1))),
            other => candle_core::bail!("rms_norm_with_grad on cuda: dtype {other:?}"),
        }
    }

    pub(super) fn backward(
        eps: f64,
        x: Operand<'_>,
        w: Operand<'_>,
        dy: Operand<'_>,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr>(
            eps: f64,
            (x, (x0, x1)): Operand<'_>,
            (w, (w0, w1)): Operand<'_>,
            (dy, (d0, d1)): Operand<'_>,
        ) -> Result<CudaStorage> {
            let dev = x.device().clone();
            let sfx = suffix(x.dtype())?;
            let n = w1 - w0;
            let el = x1 - x0;
            let rows = el / n.max(1);
            let chunks = rows.div_ceil(DW_ROWS).max(1);
            let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
            let ws = w.as_cuda_slice::<T>()?.slice(w0..w1);
            let dys = dy.as_cuda_slice::<T>()?.slice(d0..d1);
            // SAFETY: the kernels write every element of dx, dw, row_d and partial.
            let out = unsafe { dev.alloc::<T>(el + n)? };
            let row_d = unsafe { dev.alloc::<f32>(rows.max(1))? };
            let partial = unsafe { dev.alloc::<f32>(chunks * n)? };
            let (rows32, n32, chunks32, eps32) = (rows as u32, n as u32, chunks as u32, eps as f32);
            let dx = out.slice(0..el);
            let dw = out.slice(el..el + n);

            let func =
                dev.get_or_load_custom_func(&format!("rms_norm_bwd_{sfx}"), "qat_rms_norm", PTX)?;
            let mut b = func.builder();
            b.arg(&xs)
                .arg(&ws)
                .arg(&dys)
                .arg(&dx)
                .arg(&row_d)
                .arg(&n32)
                .arg(&eps32);
            // SAFETY: x, dy and dx hold rows · n elements, w n, row_d rows.
            unsafe { b.launch(rows_grid(rows)) }.w()?;

            let cols = LaunchConfig {
                grid_dim: ((n as u32).div_ceil(BLOCK), chunks32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let func = dev.get_or_load_custom_func(
                &format!("rms_norm_dw_partial_{sfx}"),
                "qat_rms_norm",
                PTX,
            )?;
            let mut b = func.builder();
            b.arg(&xs)
                .arg(&dys)
                .arg(&row_d)
                .arg(&partial)
                .arg(&rows32)
                .arg(&n32);
            // SAFETY: partial holds chunks · n f32; the kernel reads rows · n of x and dy.
            unsafe { b.launch(cols) }.w()?;

            let last = LaunchConfig {
                grid_dim: ((n as u32).div_ceil(BLOCK), 1, 1),
                ..cols
            };
            let func = dev.get_or_load_custom_func(
                &format!("rms_norm_dw_final_{sfx}"),
                "qat_rms_norm",
                PTX,
            )?;
            let mut b = func.builder();
            b.arg(&partial).arg(&dw).arg(&chunks32).arg(&n32);
            // SAFETY: dw is the last n elements of out; partial holds chunks · n f32.
            unsafe { b.launch(last) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        match x.0.dtype() {
            DType::F32 => run::<f32>(eps, x, w, dy),
            DType::BF16 => run::<half::bf16>(eps, x, w, dy),
            DType::F16 => run::<half::f16>(eps, x, w, dy),
            other => candle_core::bail!("rms_norm_with_grad on cuda: dtype {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custom_op::max_abs_diff;
    use candle_core::{DType, Device, Var, D};

    /// The composed RMSNorm of crates/model/src/llama/mod.rs (f32 inside for 16-bit x).
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let w = w.to_dtype(x.dtype())?;
        let x32 = match x.dtype() {
            DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
        x32.broadcast_div(&(mean_sq + eps)?.sqrt()?)?
            .to_dtype(x.dtype())?
            .broadcast_mul(&w)
    }

    #[test]
    fn hand_worked_row() -> Result<()> {
        // x = [3, 4], w = [1, 2], eps = 0: mean(x²) = 12.5, d = √12.5, y = [3/d, 8/d].
        let x = Tensor::new(&[[3f64, 4.0]], &Device::Cpu)?;
        let w = Tensor::new(&[1f64, 2.0], &Device::Cpu)?;
        let y = rms_norm_with_grad(&x, &w, 0.0)?.to_vec2::<f64>()?;
        let d = 12.5f64.sqrt();
        assert!((y[0][0] - 3.0 / d).abs() < 1e-15 && (y[0][1] - 8.0 / d).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn value_and_gradients_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, n, eps) = (6, 300, 1e-5);
        let x = Var::from_tensor(
            &(Tensor::arange(0f64, (rows * n) as f64, &dev)?
                .reshape((2, rows / 2, n))?
                .affine(0.37, 0.0)?
                .sin()?
                * 3.0)?,
        )?;
        let w = Var::from_tensor(&(Tensor::arange(0f64, n as f64, &dev)?.cos()? + 1.5)?)?;
        let up = Tensor::arange(0f64, (rows * n) as f64, &dev)?
            .reshape((2, rows / 2, n))?
            .affine(0.11, 0.0)?
            .cos()?;
        let (a, b) = (rms_norm_with_grad(&x, &w, eps)?, composed(&x, &w, eps)?);
        assert!(max_abs_diff(&a, &b)? < 1e-14, "{}", max_abs_diff(&a, &b)?);
        let ga = (a * &up)?.sum_all()?.backward()?;
        let gb = (b * &up)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let (p, q) = (ga.get(v).expect("grad"), gb.get(v).expect("grad"));
            assert!(max_abs_diff(p, q)? < 1e-12, "{}", max_abs_diff(p, q)?);
        }
        // bf16 activations (f32 weight cast to bf16): the composed values, to bf16 rounding.
        let xb = x.as_tensor().to_dtype(DType::BF16)?;
        let wf = w.as_tensor().to_dtype(DType::F32)?;
        let (a, b) = (rms_norm_with_grad(&xb, &wf, eps)?, composed(&xb, &wf, eps)?);
        assert_eq!(a.dtype(), DType::BF16);
        assert!(max_abs_diff(&a, &b)? < 2e-2, "{}", max_abs_diff(&a, &b)?);
        Ok(())
    }

    /// The CUDA kernels against the CPU op (f64) on the same inputs, values and both gradients,
    /// f32 / bf16 / f16, at TinyLlama's hidden size. Runs only in a `--features cuda` build on
    /// a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, n, eps) = (300, 2048, 1e-5);
        let x = (Tensor::arange(0f32, (rows * n) as f32, &Device::Cpu)?
            .reshape((rows, n))?
            .affine(0.37, 0.0)?
            .sin()?
            * 3.0)?;
        let w = (Tensor::arange(0f32, n as f32, &Device::Cpu)?.cos()? + 1.5)?;
        let up = Tensor::arange(0f32, (rows * n) as f32, &Device::Cpu)?
            .reshape((rows, n))?
            .affine(0.11, 0.0)?
            .cos()?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let xd = x.to_dtype(dtype)?;
            let wd = w.to_dtype(dtype)?;
            let run = |dev: &Device, fdtype: DType| -> Result<(Tensor, Tensor, Tensor)> {
                let xv = Var::from_tensor(&xd.to_dtype(fdtype)?.to_device(dev)?)?;
                let wv = Var::from_tensor(&wd.to_dtype(fdtype)?.to_device(dev)?)?;
                let y = rms_norm_with_grad(&xv, &wv, eps)?;
                let g = (&y * up.to_dtype(fdtype)?.to_device(dev)?)?
                    .sum_all()?
                    .backward()?;
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
                Ok((
                    cpu(&y)?,
                    cpu(g.get(&xv).expect("dx"))?,
                    cpu(g.get(&wv).expect("dw"))?,
                ))
            };
            let (y, dx, dw) = run(&gpu, dtype)?;
            let (y0, dx0, dw0) = run(&Device::Cpu, DType::F64)?;
            let scale =
                |t: &Tensor| -> Result<f64> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>() };
            assert!(max_abs_diff(&y, &y0)? <= tol * scale(&y0)?, "{dtype:?} y");
            assert!(
                max_abs_diff(&dx, &dx0)? <= tol * scale(&dx0)?,
                "{dtype:?} dx"
            );
            assert!(
                max_abs_diff(&dw, &dw0)? <= tol * scale(&dw0)?,
                "{dtype:?} dw"
            );
        }
        Ok(())
    }
}
