//! SwiGLU, `silu(gate) · up`, as one op *with* a gradient, for training on CUDA.
//!
//! The MLP's composed `silu` and multiply, with candle's backward of each (sigmoid, products,
//! sums), make about ten passes over the `[tokens, intermediate]` activations per layer: at
//! TinyLlama's 5632 intermediate features and 4096 tokens a pass is 46 MB in bf16. This op reads
//! `gate` and `up` once forward and `gate`, `up` and the output gradient once backward
//! (kernels/swiglu.cu), in f32 arithmetic with one rounding per output:
//! `y = silu(g) · u`, `dg = dy · u · σ(g) · (1 + g (1 − σ(g)))`, `du = dy · silu(g)`.
//!
//! Used by [`crate::Llama`] on CUDA, in training and in inference, where it also saves the
//! composed path's intermediate `silu(gate)` tensor (`QAT_CUDA_FUSED_SWIGLU=0` turns it off);
//! the CPU keeps the composed ops and their exact numerics. The CPU implementation here (f64
//! arithmetic) exists for the tests, which check it against the composed ops in value and
//! gradient, and the kernels against it (through the CUDA emulation, tests/swiglu_emulated.rs,
//! and on a GPU).

use crate::custom_op::{storage_from_f64, storage_to_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
struct SwiGlu;

/// Backward: `(gate, up, dy)` → `[2n]`: `d gate`, then `d up`.
#[derive(Debug, Clone, Copy)]
struct SwiGluBackward;

const OP: &str = "swiglu";

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gs, us) = (storage_to_f64(g, lg, OP)?, storage_to_f64(u, lu, OP)?);
        let y = gs
            .iter()
            .zip(&us)
            .map(|(g, u)| g * sigmoid(*g) * u)
            .collect();
        Ok((storage_from_f64(g.dtype(), y), lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::launch("swiglu_fwd", &[(g, lg), (u, lu)], lg.shape().elem_count())?;
        Ok((out, lg.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let dy = dy.to_dtype(g.dtype())?.contiguous()?;
        let both = g.apply_op3_no_bwd(u, &dy, &SwiGluBackward)?;
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gs, us, dys) = (
            storage_to_f64(g, lg, OP)?,
            storage_to_f64(u, lu, OP)?,
            storage_to_f64(dy, ldy, OP)?,
        );
        let n = gs.len();
        let mut out = Vec::with_capacity(2 * n);
        out.extend(gs.iter().zip(&us).zip(&dys).map(|((g, u), d)| {
            let s = sigmoid(*g);
            d * u * s * (1.0 + g * (1.0 - s))
        }));
        out.extend(gs.iter().zip(&dys).map(|(g, d)| d * g * sigmoid(*g)));
        Ok((storage_from_f64(g.dtype(), out), Shape::from(2 * n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
        dy: &candle_core::CudaStorage,
        ldy: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = lg.shape().elem_count();
        let out = cuda::launch("swiglu_bwd", &[(g, lg), (u, lu), (dy, ldy)], 2 * n)?;
        Ok((out, Shape::from(2 * n)))
    }
}

/// `silu(gate) · up` for `gate` and `up` of one shape and float dtype, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?}, up {:?} {:?}",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `silu(gate) · up` from a joined gate/up projection's output `gate_up: [.., 2 inter]` (each
/// row's `inter` gate columns, then its up columns: [`crate::linear::fuse_frozen`] of gate_proj
/// and up_proj) → `[.., inter]`, in one pass and without the two column views' copies. For
/// inference (no gradient); on CUDA the separate op's arithmetic, so its bits.
pub fn swiglu_joined(gate_up: &Tensor) -> Result<Tensor> {
    let two_inter = gate_up.dim(candle_core::D::Minus1)?;
    if two_inter % 2 != 0 {
        candle_core::bail!(
            "swiglu_joined: last dim {two_inter} of {:?} is odd",
            gate_up.dims()
        );
    }
    gate_up.contiguous()?.apply_op1_no_bwd(&SwiGluJoined)
}

/// [`swiglu_joined`]'s op.
#[derive(Debug, Clone, Copy)]
struct SwiGluJoined;

/// `[.., 2 inter]` → (rows, inter, the output shape `[.., inter]`).
fn joined_dims(l: &Layout) -> Result<(usize, usize, Shape)> {
    let mut dims = l.dims().to_vec();
    let inter = dims.last().copied().unwrap_or(0) / 2;
    *dims.last_mut().expect("swiglu_joined checks the last dim") = inter;
    let shape = Shape::from(dims);
    let rows = shape.elem_count().checked_div(inter).unwrap_or(0);
    Ok((rows, inter, shape))
}

impl candle_core::CustomOp1 for SwiGluJoined {
    fn name(&self) -> &'static str {
        "swiglu-joined"
    }

    fn cpu_fwd(&self, gu: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inter, shape) = joined_dims(l)?;
        let v = storage_to_f64(gu, l, OP)?;
        let mut y = Vec::with_capacity(rows * inter);
        for row in v.chunks_exact(2 * inter.max(1)).take(rows) {
            let (g, u) = row.split_at(inter);
            y.extend(g.iter().zip(u).map(|(g, u)| g * sigmoid(*g) * u));
        }
        Ok((storage_from_f64(gu.dtype(), y), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gu: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, inter, shape) = joined_dims(l)?;
        Ok((cuda::joined(gu, l, rows, inter)?, shape))
    }
}

/// Whether the MLP runs `silu(gate) · up` as [`swiglu`]: CUDA tensors of f32, bf16 or f16, in
/// `cuda` builds, unless `QAT_CUDA_FUSED_SWIGLU=0`.
pub fn fused_swiglu_on(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_SWIGLU", x)
}

/// The CUDA side: kernels/swiglu.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));

    /// Launches `{prefix}_{dtype}` over the contiguous `inputs` (n elements each), writing a
    /// fresh buffer of `out_len` elements.
    pub(super) fn launch(
        prefix: &str,
        inputs: &[(&CudaStorage, &Layout)],
        out_len: usize,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr>(
            name: String,
            inputs: &[(&CudaStorage, &Layout)],
            out_len: usize,
        ) -> Result<CudaStorage> {
            let dev = inputs[0].0.device().clone();
            let n = inputs[0].1.shape().elem_count();
            let func = dev.get_or_load_custom_func(&name, "qat_swiglu", PTX)?;
            let mut views = Vec::with_capacity(inputs.len());
            for (s, l) in inputs {
                let (a, b) = crate::custom_op::contiguous_range(l, "swiglu", "operands")?;
                if b - a != n {
                    candle_core::bail!("swiglu: operands of {} and {n} elements", b - a);
                }
                views.push(s.as_cuda_slice::<T>()?.slice(a..b));
            }
            // SAFETY: the kernel writes every output element.
            let out = unsafe { dev.alloc::<T>(out_len)? };
            let n64 = n as u64;
            let mut b = func.builder();
            for v in &views {
                b.arg(v);
            }
            b.arg(&out).arg(&n64);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
                block_dim: (256, 1, 1), // SWIGLU_BLOCK
                shared_mem_bytes: 0,
            };
            // SAFETY: each input holds n elements, out holds out_len (n or 2n, as the kernel
            // writes); the kernel strides over the grid.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let dtype = inputs[0].0.dtype();
        if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
            candle_core::bail!("swiglu: operands of different dtypes");
        }
        match dtype {
            DType::F32 => run::<f32>(format!("{prefix}_f32"), inputs, out_len),
            DType::BF16 => run::<half::bf16>(format!("{prefix}_bf16"), inputs, out_len),
            DType::F16 => run::<half::f16>(format!("{prefix}_f16"), inputs, out_len),
            other => candle_core::bail!("swiglu on cuda: dtype {other:?}"),
        }
    }

    /// Launches `swiglu_joined_fwd_{dtype}` over the contiguous `gu: [rows, 2 inter]`, writing a
    /// fresh `[rows, inter]` buffer.
    pub(super) fn joined(
        gu: &CudaStorage,
        l: &Layout,
        rows: usize,
        inter: usize,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr>(
            name: &str,
            gu: &CudaStorage,
            l: &Layout,
            rows: usize,
            inter: usize,
        ) -> Result<CudaStorage> {
            let dev = gu.device().clone();
            let (a, b) = crate::custom_op::contiguous_range(l, "swiglu_joined", "gate_up")?;
            if b - a != 2 * rows * inter {
                candle_core::bail!(
                    "swiglu_joined: {} elements for {rows} rows of 2 x {inter}",
                    b - a
                );
            }
            let func = dev.get_or_load_custom_func(name, "qat_swiglu", PTX)?;
            let view = gu.as_cuda_slice::<T>()?.slice(a..b);
            // SAFETY: the kernel writes every output element.
            let out = unsafe { dev.alloc::<T>(rows * inter)? };
            let (rows64, inter64) = (rows as u64, inter as u64);
            let mut builder = func.builder();
            builder.arg(&view).arg(&out).arg(&rows64).arg(&inter64);
            let n = rows * inter;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
                block_dim: (256, 1, 1), // SWIGLU_BLOCK
                shared_mem_bytes: 0,
            };
            // SAFETY: gu holds 2 rows inter elements, out rows inter; the kernel strides over the
            // grid.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        match gu.dtype() {
            DType::F32 => run::<f32>("swiglu_joined_fwd_f32", gu, l, rows, inter),
            DType::BF16 => run::<half::bf16>("swiglu_joined_fwd_bf16", gu, l, rows, inter),
            DType::F16 => run::<half::f16>("swiglu_joined_fwd_f16", gu, l, rows, inter),
            other => candle_core::bail!("swiglu_joined on cuda: dtype {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custom_op::max_abs_diff;
    use candle_core::{DType, Device, Var};

    #[test]
    fn value_and_gradients_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let g = Var::from_tensor(
            &(Tensor::arange(0f64, 600.0, &dev)?
                .reshape((2, 3, 100))?
                .affine(0.37, 0.0)?
                .sin()?
                * 8.0)?,
        )?;
        let u = Var::from_tensor(
            &Tensor::arange(0f64, 600.0, &dev)?
                .reshape((2, 3, 100))?
                .cos()?,
        )?;
        let w = Tensor::arange(0f64, 600.0, &dev)?
            .reshape((2, 3, 100))?
            .affine(0.3, 0.0)?
            .sin()?;
        let (a, b) = (swiglu(&g, &u)?, (g.silu()? * u.as_tensor())?);
        assert!(max_abs_diff(&a, &b)? < 1e-14, "{}", max_abs_diff(&a, &b)?);
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gb = (b * &w)?.sum_all()?.backward()?;
        for v in [&g, &u] {
            let (p, q) = (ga.get(v).expect("grad"), gb.get(v).expect("grad"));
            assert!(max_abs_diff(p, q)? < 1e-13, "{}", max_abs_diff(p, q)?);
        }
        // Hand-worked: silu(0) = 0, silu'(0) = 1/2; at g = 0, u = 3, dy = 1: dg = 1.5, du = 0.
        let g0 = Var::new(&[0f64], &dev)?;
        let u0 = Var::new(&[3f64], &dev)?;
        let grads = swiglu(&g0, &u0)?.sum_all()?.backward()?;
        assert_eq!(grads.get(&g0).expect("dg").to_vec1::<f64>()?, [1.5]);
        assert_eq!(grads.get(&u0).expect("du").to_vec1::<f64>()?, [0.0]);
        Ok(())
    }

    /// The joined op equals the separate one on the same gate and up (the same f64 arithmetic);
    /// an odd last dim is an error.
    #[test]
    fn joined_gate_up_gives_the_separate_ops_values() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inter) = (6, 50);
        let g = (Tensor::arange(0f64, (rows * inter) as f64, &dev)?
            .reshape((2, 3, inter))?
            .affine(0.37, 0.0)?
            .sin()?
            * 8.0)?;
        let u = Tensor::arange(0f64, (rows * inter) as f64, &dev)?
            .reshape((2, 3, inter))?
            .cos()?;
        let joined = swiglu_joined(&Tensor::cat(&[&g, &u], 2)?)?;
        assert_eq!(joined.dims(), [2, 3, inter]);
        assert_eq!(max_abs_diff(&joined, &swiglu(&g, &u)?)?, 0.0);
        let err = swiglu_joined(&Tensor::zeros((2, 5), DType::F32, &dev)?).unwrap_err();
        assert!(err.to_string().contains("odd"), "{err}");
        Ok(())
    }

    /// On the GPU the joined kernel gives the separate kernel's bits (f32, bf16, f16). Runs only
    /// in a `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_joined_gives_the_separate_kernels_bits() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, inter) = (37, 5632);
        let base =
            Tensor::arange(0f32, (rows * inter) as f32, &Device::Cpu)?.reshape((rows, inter))?;
        let g = (base.affine(0.37, 0.0)?.sin()? * 8.0)?;
        let u = base.cos()?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (g, u) = (
                g.to_dtype(dtype)?.to_device(&gpu)?,
                u.to_dtype(dtype)?.to_device(&gpu)?,
            );
            let joined = swiglu_joined(&Tensor::cat(&[&g, &u], 1)?)?;
            let separate = swiglu(&g, &u)?;
            let bits = |t: &Tensor| crate::custom_op::f32_bits(&t.to_dtype(DType::F32)?);
            assert_eq!(bits(&joined)?, bits(&separate)?, "{dtype:?}");
        }
        Ok(())
    }

    /// The CUDA kernels against the CPU op (f64) on the same inputs, value and both gradients,
    /// f32 / bf16 / f16. Runs only in a `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let n = 100_003;
        let base = Tensor::arange(0f32, n as f32, &Device::Cpu)?;
        let g = (base.affine(0.37, 0.0)?.sin()? * 8.0)?;
        let u = base.cos()?;
        let w = base.affine(0.3, 0.0)?.sin()?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let run = |dev: &Device, fdtype: DType| -> Result<Vec<Tensor>> {
                let cast = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(fdtype)?.to_device(dev);
                let (gv, uv) = (Var::from_tensor(&cast(&g)?)?, Var::from_tensor(&cast(&u)?)?);
                let y = swiglu(&gv, &uv)?;
                let grads = (&y * cast(&w)?)?.sum_all()?.backward()?;
                [&y, grads.get(&gv).expect("dg"), grads.get(&uv).expect("du")]
                    .iter()
                    .map(|t| t.to_device(&Device::Cpu)?.to_dtype(DType::F64))
                    .collect()
            };
            let (got, want) = (run(&gpu, dtype)?, run(&Device::Cpu, DType::F64)?);
            for (a, b) in got.iter().zip(&want) {
                let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                assert!(max_abs_diff(a, b)? <= tol * scale, "{dtype:?}");
            }
        }
        Ok(())
    }
}
