//! AdamW's update as in-place kernels: one pass per moment and one for the weight, instead of the
//! ~15 composed candle ops (each a full pass over the parameters, and a fresh tensor) of
//! [`crate::optim::AdamW`]'s reference path. On a GPU the optimizer step is memory-bound, so
//! for a 1.1B-parameter model this turns about 160 GB of traffic per step into about 40 GB.
//!
//! Bit-identical to the composed ops (tested): the same f32/f64 operations in the same order,
//! with candle's constants (`x * c` is `x · f32(c) + 0`, `x / c` is `x · f32(1/c) + 0`):
//! `m ← (m·β₁ + 0) + (g·(1−β₁) + 0)`, `v ← (v·β₂ + 0) + (g²·(1−β₂) + 0)`,
//! `w ← [w·(1−lr·wd) + 0] − ((m·(1/bc₁) + 0) / (√(v·(1/bc₂) + 0) + ε))·lr + 0`.
//! The CPU runs them in Rust (f32, f64); CUDA (`cuda` feature, f32) runs kernels/adamw.cu,
//! whose operations are the IEEE intrinsics (`__fmul_rn`, ...), never contracted into FMAs. That
//! kernel was written without a GPU at hand: tests/adamw_emulated.rs runs it through the CUDA
//! emulation (crates/model/kernels/emulation) and compares its bits with the composed ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// `m ← m·decay + g·gain` (each product `+ 0`), or with `g²` for the second moment; with a
/// `grad_scale`, `g` is first `g·grad_scale + 0`, the bits of candle's `g * s` (clipping's
/// scaling, folded into the pass instead of a pass of its own).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MomentUpdate {
    pub decay: f64,
    pub gain: f64,
    pub square: bool,
    pub grad_scale: Option<f64>,
}

/// `w ← w·decay − (m·inv_bc1 / (√(v·inv_bc2) + eps))·lr` (`decay` only with weight decay).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightUpdate {
    pub inv_bc1: f64,
    pub inv_bc2: f64,
    pub eps: f64,
    pub lr: f64,
    pub decay: Option<f64>,
}

/// The few float operations the CPU kernels need, in f32 or f64.
trait Float: Copy + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {
    fn of(x: f64) -> Self;
    fn mul(self, other: Self) -> Self;
    fn div(self, other: Self) -> Self;
    fn sqrt(self) -> Self;
    const ZERO: Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            fn of(x: f64) -> Self {
                x as $t
            }
            fn mul(self, other: Self) -> Self {
                self * other
            }
            fn div(self, other: Self) -> Self {
                self / other
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            const ZERO: Self = 0.0;
        }
    };
}
float!(f32);
float!(f64);

impl MomentUpdate {
    fn run<T: Float>(&self, m: &mut [T], g: &[T]) {
        let (decay, gain) = (T::of(self.decay), T::of(self.gain));
        let scale = self.grad_scale.map(T::of);
        for (m, &g) in m.iter_mut().zip(g) {
            let g = match scale {
                Some(s) => g.mul(s) + T::ZERO,
                None => g,
            };
            let g = if self.square { g.mul(g) } else { g };
            *m = (m.mul(decay) + T::ZERO) + (g.mul(gain) + T::ZERO);
        }
    }
}

impl WeightUpdate {
    fn run<T: Float>(&self, w: &mut [T], m: &[T], v: &[T]) {
        let (inv_bc1, inv_bc2, eps, lr) = (
            T::of(self.inv_bc1),
            T::of(self.inv_bc2),
            T::of(self.eps),
            T::of(self.lr),
        );
        let decay = self.decay.map(T::of);
        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
            let m_hat = m.mul(inv_bc1) + T::ZERO;
            let denominator = (v.mul(inv_bc2) + T::ZERO).sqrt().mul(T::of(1.0)) + eps;
            let update = m_hat.div(denominator);
            let decayed = match decay {
                Some(d) => w.mul(d) + T::ZERO,
                None => *w,
            };
            *w = decayed - (update.mul(lr) + T::ZERO);
        }
    }
}

/// The contiguous element range of `l`, or an error naming `what`.
fn range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    qat_model::custom_op::contiguous_range(l, "adamw", what)
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let ((m0, m1), (g0, g1)) = (range(dst_l, "m")?, range(gl, "g")?);
        match (dst, g) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => self.run(&mut m[m0..m1], &g[g0..g1]),
            (CpuStorage::F64(m), CpuStorage::F64(g)) => self.run(&mut m[m0..m1], &g[g0..g1]),
            (m, _) => candle_core::bail!("adamw: dtype {:?}, expected F32 or F64", m.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        cuda::moment(self, (dst, range(dst_l, "m")?), (g, range(gl, "g")?))
    }
}

impl InplaceOp3 for WeightUpdate {
    fn name(&self) -> &'static str {
        "adamw-weight"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let ((w0, w1), (m0, m1), (v0, v1)) = (range(dst_l, "w")?, range(ml, "m")?, range(vl, "v")?);
        match (dst, m, v) {
            (CpuStorage::F32(w), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                self.run(&mut w[w0..w1], &m[m0..m1], &v[v0..v1])
            }
            (CpuStorage::F64(w), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                self.run(&mut w[w0..w1], &m[m0..m1], &v[v0..v1])
            }
            (w, _, _) => candle_core::bail!("adamw: dtype {:?}, expected F32 or F64", w.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        cuda::weight(
            self,
            (dst, range(dst_l, "w")?),
            (m, range(ml, "m")?),
            (v, range(vl, "v")?),
        )
    }
}

/// The whole update of one tensor in one pass on CUDA (`adamw_step_f32`): the two
/// [`MomentUpdate`]s and the [`WeightUpdate`], element by element with each one's operations, so
/// the bits of running them one after another. The destination is the weight; the moments are
/// the op's other operands and are written too, through their device pointers (candle's in-place
/// ops lend only one tensor mutably; one stream orders the accesses); the gradient rides in the
/// op. 28 bytes of memory traffic per parameter instead of 40. CUDA only: the CPU runs the three
/// passes.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct StepUpdate {
    pub first: MomentUpdate,
    pub second: MomentUpdate,
    pub weight: WeightUpdate,
    pub grad: Tensor,
}

impl InplaceOp3 for StepUpdate {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        _w: &mut CpuStorage,
        _wl: &Layout,
        _m: &CpuStorage,
        _ml: &Layout,
        _v: &CpuStorage,
        _vl: &Layout,
    ) -> Result<()> {
        candle_core::bail!("adamw-step runs on CUDA only (the CPU runs the three passes)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (g, gl) = self.grad.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g else {
            candle_core::bail!("adamw-step: the gradient is not on the GPU")
        };
        cuda::step(
            self,
            (dst, range(dst_l, "w")?),
            (m, range(ml, "m")?),
            (v, range(vl, "v")?),
            (g, range(gl, "g")?),
        )
    }
}

/// Whether the in-place kernels take this weight, its gradient and its moments: all
/// contiguous, of one shape and dtype, f32 or f64 on the CPU, f32 on CUDA (`cuda` builds,
/// unless `QAT_CUDA_FUSED_ADAMW=0`), where the gradient may also be bf16 or f16.
pub(crate) fn supported(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    // On CUDA the one-pass kernel also reads a bf16 or f16 gradient of an f32 weight.
    let g_dtype_ok = g.dtype() == w.dtype()
        || (w.device().is_cuda() && matches!(g.dtype(), DType::BF16 | DType::F16));
    let same = g_dtype_ok
        && [g, m, v]
            .iter()
            .all(|x| x.shape() == w.shape() && x.device().same_device(w.device()))
        && [m, v].iter().all(|x| x.dtype() == w.dtype());
    let contiguous = [w, g, m, v].iter().all(|x| x.is_contiguous());
    let dtype_ok = match w.device() {
        candle_core::Device::Cpu => matches!(w.dtype(), DType::F32 | DType::F64),
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda") && w.dtype() == DType::F32 && cuda_kernels_enabled()
        }
        _ => false,
    };
    same && contiguous && dtype_ok
}

/// `QAT_CUDA_FUSED_ADAMW=0` turns the CUDA kernels off (composed candle ops instead), read once.
fn cuda_kernels_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QAT_CUDA_FUSED_ADAMW").map_or(true, |v| v != "0"))
}

/// The CUDA side: kernels/adamw.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{MomentUpdate, WeightUpdate};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{DType, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

    fn config(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    type Operand<'a> = (&'a CudaStorage, (usize, usize));

    pub(super) fn moment(
        op: &MomentUpdate,
        (m, (m0, m1)): (&mut CudaStorage, (usize, usize)),
        (g, (g0, g1)): Operand<'_>,
    ) -> Result<()> {
        let n = m1 - m0;
        if g1 - g0 != n {
            candle_core::bail!("adamw: m has {n} elements, g {}", g1 - g0);
        }
        let dev = m.device.clone();
        let func = dev.get_or_load_custom_func("adamw_moment_f32", "qat_adamw", PTX)?;
        let g = g.as_cuda_slice::<f32>()?.slice(g0..g1);
        let mut m = m.as_cuda_slice_mut::<f32>()?.slice_mut(m0..m1);
        let (decay, gain, square, len) = (
            op.decay as f32,
            op.gain as f32,
            i32::from(op.square),
            n as u64,
        );
        let (grad_scale, scaled) = (
            op.grad_scale.unwrap_or(1.0) as f32,
            i32::from(op.grad_scale.is_some()),
        );
        let mut b = func.builder();
        b.arg(&mut m)
            .arg(&g)
            .arg(&len)
            .arg(&decay)
            .arg(&gain)
            .arg(&square)
            .arg(&grad_scale)
            .arg(&scaled);
        // SAFETY: both views hold `len` f32 elements; the kernel touches no others.
        unsafe { b.launch(config(n)) }.w()?;
        Ok(())
    }

    pub(super) fn step(
        op: &super::StepUpdate,
        (w, (w0, w1)): (&mut CudaStorage, (usize, usize)),
        (m, (m0, m1)): Operand<'_>,
        (v, (v0, v1)): Operand<'_>,
        (g, (g0, g1)): Operand<'_>,
    ) -> Result<()> {
        let n = w1 - w0;
        if m1 - m0 != n || v1 - v0 != n || g1 - g0 != n {
            candle_core::bail!(
                "adamw: w has {n} elements, m {}, v {}, g {}",
                m1 - m0,
                v1 - v0,
                g1 - g0
            );
        }
        let dev = w.device.clone();
        // An f32 gradient, or the exact bf16 / f16 one of an f32 weight cast in the forward pass.
        let name = match g.dtype() {
            DType::F32 => "adamw_step_f32",
            DType::BF16 => "adamw_step_f32_gbf16",
            DType::F16 => "adamw_step_f32_gf16",
            other => candle_core::bail!("adamw on cuda: gradient dtype {other:?}"),
        };
        let func = dev.get_or_load_custom_func(name, "qat_adamw", PTX)?;
        // m and v are written by the kernel through these views (see StepUpdate).
        let m = m.as_cuda_slice::<f32>()?.slice(m0..m1);
        let v = v.as_cuda_slice::<f32>()?.slice(v0..v1);
        let mut w = w.as_cuda_slice_mut::<f32>()?.slice_mut(w0..w1);
        let (a, b2, u) = (&op.first, &op.second, &op.weight);
        let f = |x: f64| x as f32;
        let (decay1, gain1, decay2, gain2) = (f(a.decay), f(a.gain), f(b2.decay), f(b2.gain));
        let (grad_scale, scaled) = (
            f(a.grad_scale.unwrap_or(1.0)),
            i32::from(a.grad_scale.is_some()),
        );
        let (inv_bc1, inv_bc2, eps, lr) = (f(u.inv_bc1), f(u.inv_bc2), f(u.eps), f(u.lr));
        let (decay, decayed, len) = (
            f(u.decay.unwrap_or(1.0)),
            i32::from(u.decay.is_some()),
            n as u64,
        );
        let g = qat_model::custom_op::FloatView::of(g, (g0, g1), "adamw")?;
        let mut b = func.builder();
        b.arg(&mut w).arg(&m).arg(&v);
        g.push(&mut b);
        b.arg(&len);
        b.arg(&decay1).arg(&gain1).arg(&decay2).arg(&gain2);
        b.arg(&grad_scale).arg(&scaled);
        b.arg(&inv_bc1)
            .arg(&inv_bc2)
            .arg(&eps)
            .arg(&lr)
            .arg(&decay)
            .arg(&decayed);
        // SAFETY: the four views hold `len` elements (f32, g of its dtype); the kernel touches
        // no others. m and v are written through shared views: nothing else reads or writes them while the update
        // runs, and the one stream orders the kernels around it.
        unsafe { b.launch(config(n)) }.w()?;
        Ok(())
    }

    pub(super) fn weight(
        op: &WeightUpdate,
        (w, (w0, w1)): (&mut CudaStorage, (usize, usize)),
        (m, (m0, m1)): Operand<'_>,
        (v, (v0, v1)): Operand<'_>,
    ) -> Result<()> {
        let n = w1 - w0;
        if m1 - m0 != n || v1 - v0 != n {
            candle_core::bail!("adamw: w has {n} elements, m {}, v {}", m1 - m0, v1 - v0);
        }
        let dev = w.device.clone();
        let func = dev.get_or_load_custom_func("adamw_weight_f32", "qat_adamw", PTX)?;
        let m = m.as_cuda_slice::<f32>()?.slice(m0..m1);
        let v = v.as_cuda_slice::<f32>()?.slice(v0..v1);
        let mut w = w.as_cuda_slice_mut::<f32>()?.slice_mut(w0..w1);
        let (inv_bc1, inv_bc2, eps, lr) = (
            op.inv_bc1 as f32,
            op.inv_bc2 as f32,
            op.eps as f32,
            op.lr as f32,
        );
        let (decay, decayed, len) = (
            op.decay.unwrap_or(1.0) as f32,
            i32::from(op.decay.is_some()),
            n as u64,
        );
        let mut b = func.builder();
        b.arg(&mut w).arg(&m).arg(&v).arg(&len);
        b.arg(&inv_bc1)
            .arg(&inv_bc2)
            .arg(&eps)
            .arg(&lr)
            .arg(&decay)
            .arg(&decayed);
        // SAFETY: the three views hold `len` f32 elements; the kernel touches no others.
        unsafe { b.launch(config(n)) }.w()?;
        Ok(())
    }
}
