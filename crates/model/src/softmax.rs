//! Softmax over the last dim as one kernel *with* a gradient, for training on CUDA.
//!
//! candle's fused `softmax_last_dim` has no backward pass, so training composed max, sub, exp,
//! sum and div, and kept four f32 `[batch, heads, t, s]` tensors per layer for the backward
//! pass: at seq 1024 that, not the weights, bounds the batch. This op runs candle's own softmax
//! kernel (f32 accumulation for bf16/f16 inputs) and keeps only its output `y`, from which the
//! gradient is `y · (g − Σ g·y)`. Used by [`crate::Llama`] on CUDA only (the CPU keeps its fused
//! attention op and its exact numerics); the CPU implementation here exists for the tests.
//! The CUDA path launches the same kernel candle-nn's op does; it was written without a GPU at
//! hand and is first exercised by `make pipeline-gpu` and `make bench-gpu` (training on cuda).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

#[derive(Debug, Clone, Copy)]
struct SoftmaxWithGrad;

fn cpu_softmax<T: num_like::Float>(src: &[T], cols: usize) -> Vec<T> {
    let mut out = vec![T::zero(); src.len()];
    for (o, x) in out.chunks_mut(cols).zip(src.chunks(cols)) {
        let max = x.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for (o, &v) in o.iter_mut().zip(x) {
            *o = (v - max).exp();
            sum = sum + *o;
        }
        for o in o.iter_mut() {
            *o = *o / sum;
        }
    }
    out
}

/// The few float operations the CPU implementations need (f32 and f64; also
/// [`crate::causal_softmax`]'s).
pub(crate) mod num_like {
    pub trait Float:
        Copy
        + PartialOrd
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn zero() -> Self;
        fn neg_infinity() -> Self;
        fn exp(self) -> Self;
        fn max(self, other: Self) -> Self;
    }
    macro_rules! float {
        ($t:ty) => {
            impl Float for $t {
                fn zero() -> Self {
                    0.0
                }
                fn neg_infinity() -> Self {
                    <$t>::NEG_INFINITY
                }
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn max(self, other: Self) -> Self {
                    <$t>::max(self, other)
                }
            }
        };
    }
    float!(f32);
    float!(f64);
}

impl CustomOp1 for SoftmaxWithGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-with-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax_with_grad: input must be contiguous")
        };
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(cpu_softmax(&x[o1..o2], cols)),
            CpuStorage::F64(x) => CpuStorage::F64(cpu_softmax(&x[o1..o2], cols)),
            other => candle_core::bail!(
                "softmax_with_grad on the CPU: dtype {:?}, expected F32 or F64",
                other.dtype()
            ),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{kernel_name, kernels, CudaStorage, Map1, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        // candle-nn's SoftmaxLastDim::cuda_fwd (private there): one block row per softmax row.
        struct S;
        impl Map1 for S {
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                dev: &CudaDevice,
                layout: &Layout,
            ) -> Result<CudaSlice<T>> {
                let Some((o1, o2)) = layout.contiguous_offsets() else {
                    candle_core::bail!("softmax_with_grad: input must be contiguous")
                };
                let src = src.slice(o1..o2);
                let el = layout.shape().elem_count();
                let cols = layout.dims().last().copied().unwrap_or(1).max(1);
                let cfg = LaunchConfig {
                    grid_dim: ((el / cols) as u32, 1, 1),
                    block_dim: (1, 32, 1),
                    shared_mem_bytes: 0,
                };
                let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<T>(el)? };
                let mut b = func.builder();
                b.arg(&src).arg(&dst);
                candle_core::builder_arg!(b, cols as i32);
                // SAFETY: ffi; the kernel reads and writes `el` elements.
                unsafe { b.launch(cfg) }.w()?;
                Ok(dst)
            }
        }
        let dev = storage.device();
        let slice = S.map(&storage.slice, dev, layout)?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dx = y · (g − Σ_j g_j y_j), in the dtype of y.
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

/// `softmax(x)` over the last dim, differentiable, keeping only its output for the backward pass.
pub fn softmax_last_dim_with_grad(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxWithGrad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn value_and_gradient_match_the_composed_softmax() -> Result<()> {
        let x = Var::from_tensor(
            &(Tensor::arange(0f64, 24.0, &Device::Cpu)?
                .reshape((2, 3, 4))?
                .sin()?
                * 3.0)?,
        )?;
        let w = Tensor::arange(0f64, 24.0, &Device::Cpu)?
            .reshape((2, 3, 4))?
            .cos()?;
        let (a, b) = (
            softmax_last_dim_with_grad(&x)?,
            candle_nn::ops::softmax(&x, D::Minus1)?,
        );
        let diff = |p: &Tensor, q: &Tensor| -> Result<f64> {
            (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
        };
        assert!(diff(&a, &b)? < 1e-15);
        let (ga, gb) = (
            (&a * &w)?.sum_all()?.backward()?,
            (&b * &w)?.sum_all()?.backward()?,
        );
        let (ga, gb) = (ga.get(&x).expect("grad"), gb.get(&x).expect("grad"));
        assert!(diff(ga, gb)? < 1e-15, "{}", diff(ga, gb)?);
        Ok(())
    }

    /// The CUDA kernel path against the composed f64 softmax on the CPU, value and gradient.
    /// Runs only in a `--features cuda` build on a machine with a GPU (skipped otherwise).
    #[test]
    fn cuda_matches_the_composed_softmax() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let x = (Tensor::arange(0f64, 3000.0, &Device::Cpu)?
            .reshape((3, 1000))?
            .sin()?
            * 4.0)?;
        let w = Tensor::arange(0f64, 3000.0, &Device::Cpu)?
            .reshape((3, 1000))?
            .cos()?;
        let xv = Var::from_tensor(&x)?;
        let y = candle_nn::ops::softmax(&xv, D::Minus1)?;
        let g = (&y * &w)?
            .sum_all()?
            .backward()?
            .get(&xv)
            .expect("grad")
            .clone();
        for (dtype, tol) in [
            (candle_core::DType::F32, 1e-6),
            (candle_core::DType::BF16, 2e-2),
        ] {
            let xg = Var::from_tensor(&x.to_dtype(dtype)?.to_device(&gpu)?)?;
            let yg = softmax_last_dim_with_grad(&xg)?;
            let gg = (&yg * &w.to_dtype(dtype)?.to_device(&gpu)?)?
                .sum_all()?
                .backward()?
                .get(&xg)
                .expect("grad")
                .clone();
            let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                let a = a
                    .to_device(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F64)?;
                let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()? / scale)
            };
            assert!(rel(&yg, &y)? < tol, "{dtype:?} value: {}", rel(&yg, &y)?);
            assert!(
                rel(&gg, &g)? < tol * 10.0,
                "{dtype:?} gradient: {}",
                rel(&gg, &g)?
            );
        }
        Ok(())
    }
}
