//! [`GradSum`]: an optimizer step's gradients summed over its micro-batches and parts, each
//! sum updated in place by one pass over the new gradient.
//!
//! The composed sum `prev + g.to_dtype(F32) * scale` makes two fresh tensors and three passes per
//! gradient: 26 bytes of memory traffic per parameter for the bf16 gradient of an f32 weight,
//! about 29 GB per micro-batch for a 1.1B-parameter model. [`GradSum::add`] adds into the running
//! sum instead, `acc ← acc + (g·s + 0)`: 10 bytes per parameter. A first gradient that must be
//! cast or scaled is one pass as well (6 bytes instead of 14). The bits are the composed ops'
//! (candle's `x * s` is `x·f32(s) + 0`; a 16-bit gradient's cast to f32 is exact), so training
//! with gradient accumulation gives the same bytes as before.
//!
//! The CPU runs the in-place ops in Rust (f32 sums of f32, bf16 or f16 gradients; f64 of f64).
//! CUDA (`cuda` builds, f32 sums) runs kernels/grad_sum.cu, unless `QAT_CUDA_FUSED_GRAD_SUM=0`;
//! tests/grad_sum_emulated.rs checks its bits through the CUDA emulation. Anything else (another
//! dtype, a strided gradient) takes the composed ops.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor, Var};
use qat_model::custom_op::contiguous_range;
use std::collections::{HashMap, HashSet};

/// Per variable name, the sum of the gradients added so far (see the module doc).
#[derive(Debug, Default)]
pub struct GradSum {
    sums: HashMap<String, Tensor>,
    /// The sums this accumulator made itself, which it may therefore update in place. A first
    /// gradient taken as it is stays the gradient store's tensor, which other variables'
    /// gradients may share: it is copied before anything is added to it.
    owned: HashSet<String>,
    /// Test hook: the composed ops everywhere (the reference the in-place ops must equal).
    composed: bool,
}

impl GradSum {
    pub fn new() -> Self {
        Self::default()
    }

    /// The composed candle ops only (for tests: the reference path).
    pub fn composed() -> Self {
        Self {
            composed: true,
            ..Self::default()
        }
    }

    /// Adds `scale ·` each of `vars`' gradients in `grads` (those it has) to their sums.
    ///
    /// With `scale` 1 (one micro-batch in one part, the usual case) a first gradient is taken
    /// as it is, without a pass over it: `g · 1 + 0` differs from `g` only in the sign of zeros,
    /// which nothing downstream (clipping, AdamW) can see. A weight's gradient may come in a
    /// narrower dtype than the weight (bf16 for f32 master weights whose forward pass casts them
    /// to bf16: the fake quantizer's backward keeps it so, [`qat_quant`]); it is kept so when
    /// taken as it is, and cast to the weight's dtype (exactly) before any scaling or sum, so
    /// sums are in the weight's dtype.
    pub fn add(&mut self, vars: &[(String, Var)], grads: &GradStore, scale: f64) -> Result<()> {
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let target = var.dtype();
            let scale = (scale != 1.0).then_some(scale);
            // Every sum but a first gradient taken as it is is a fresh tensor of its own.
            let (sum, owned) = match self.sums.remove(name) {
                None if scale.is_none() => (g.clone(), false),
                None => (self.scaled_copy(g, target, scale)?, true),
                Some(prev) => {
                    let owned = self.owned.contains(name);
                    (self.sum(prev, owned, g, target, scale)?, true)
                }
            };
            if owned {
                self.owned.insert(name.clone());
            } else {
                self.owned.remove(name);
            }
            self.sums.insert(name.clone(), sum);
        }
        Ok(())
    }

    /// The sums, per variable name.
    pub fn sums(&self) -> &HashMap<String, Tensor> {
        &self.sums
    }

    pub fn into_sums(self) -> HashMap<String, Tensor> {
        self.sums
    }

    /// `g` cast to `target` (a fresh tensor), times `scale` if any.
    fn scaled_copy(&self, g: &Tensor, target: DType, scale: Option<f64>) -> Result<Tensor> {
        if !self.composed && in_place_supported(target, g) {
            return g.apply_op1_no_bwd(&ScaledCopy { scale });
        }
        let g = g.to_dtype(target)?;
        match scale {
            Some(s) => g * s,
            // A fresh tensor even where the cast was a no-op.
            None => g.copy(),
        }
    }

    /// `prev + scale · g`, in place when `prev` is this accumulator's own tensor.
    fn sum(
        &self,
        prev: Tensor,
        owned: bool,
        g: &Tensor,
        target: DType,
        scale: Option<f64>,
    ) -> Result<Tensor> {
        if !self.composed && in_place_supported(target, g) && prev.shape() == g.shape() {
            let acc = if owned && prev.dtype() == target && prev.is_contiguous() {
                prev
            } else {
                self.scaled_copy(&prev, target, None)?
            };
            acc.inplace_op2(g, &AddScaled { scale })?;
            return Ok(acc);
        }
        let g = g.to_dtype(target)?;
        let g = match scale {
            Some(s) => (g * s)?,
            None => g,
        };
        prev.to_dtype(target)? + g
    }
}

/// Whether the in-place ops take a sum of dtype `target` and the gradient `g`: contiguous; on
/// the CPU f32 sums of f32, bf16 or f16 gradients and f64 sums of f64 ones; on CUDA f32 sums
/// (see [`fused_on`]).
fn in_place_supported(target: DType, g: &Tensor) -> bool {
    let sixteen_or_32 = matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16);
    let dtypes = match g.device() {
        candle_core::Device::Cpu => {
            (target == DType::F32 && sixteen_or_32)
                || (target, g.dtype()) == (DType::F64, DType::F64)
        }
        candle_core::Device::Cuda(_) => target == DType::F32 && fused_on(g),
        _ => false,
    };
    dtypes && g.is_contiguous()
}

/// Whether CUDA sums gradients with kernels/grad_sum.cu: f32, bf16 or f16 gradients on CUDA in
/// `cuda` builds, unless `QAT_CUDA_FUSED_GRAD_SUM=0`.
pub fn fused_on(g: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    qat_model::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_GRAD_SUM", g)
}

/// `x · s + 0` (candle's `x * s`) or `x`, in f32 or f64.
trait Scaled: Copy {
    fn scaled(self, s: Option<f64>) -> Self;
}

impl Scaled for f32 {
    fn scaled(self, s: Option<f64>) -> Self {
        s.map_or(self, |s| self * s as f32 + 0.0)
    }
}

impl Scaled for f64 {
    fn scaled(self, s: Option<f64>) -> Self {
        s.map_or(self, |s| self * s + 0.0)
    }
}

/// `out ← cast(g) · scale + 0` (or the cast alone) as a fresh tensor of the sum's dtype: f32 for
/// f32, bf16 and f16 gradients, f64 for f64.
#[derive(Debug, Clone, Copy)]
struct ScaledCopy {
    scale: Option<f64>,
}

impl CustomOp1 for ScaledCopy {
    fn name(&self) -> &'static str {
        "grad-sum-copy"
    }

    fn cpu_fwd(&self, g: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = contiguous_range(l, "grad_sum", "gradient")?;
        let s = self.scale;
        let out = match g {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].iter().map(|&x| x.scaled(s)).collect()),
            CpuStorage::BF16(v) => {
                CpuStorage::F32(v[a..b].iter().map(|&x| x.to_f32().scaled(s)).collect())
            }
            CpuStorage::F16(v) => {
                CpuStorage::F32(v[a..b].iter().map(|&x| x.to_f32().scaled(s)).collect())
            }
            CpuStorage::F64(v) => CpuStorage::F64(v[a..b].iter().map(|&x| x.scaled(s)).collect()),
            other => candle_core::bail!("grad_sum: gradient dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let range = contiguous_range(l, "grad_sum", "gradient")?;
        let out = cuda::copy(self.scale, g, range)?;
        Ok((out, l.shape().clone()))
    }
}

/// `acc ← acc + (cast(g) · scale + 0)` (or `acc + cast(g)`), `acc` the in-place op's destination.
#[derive(Debug, Clone, Copy)]
struct AddScaled {
    scale: Option<f64>,
}

impl InplaceOp2 for AddScaled {
    fn name(&self) -> &'static str {
        "grad-sum-add"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        la: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<()> {
        let ((a0, a1), (g0, g1)) = (
            contiguous_range(la, "grad_sum", "sum")?,
            contiguous_range(lg, "grad_sum", "gradient")?,
        );
        if a1 - a0 != g1 - g0 {
            candle_core::bail!(
                "grad_sum: a sum of {} elements, a gradient of {}",
                a1 - a0,
                g1 - g0
            );
        }
        let s = self.scale;
        fn add<T: Scaled + std::ops::Add<Output = T>>(
            acc: &mut [T],
            g: impl Iterator<Item = T>,
            s: Option<f64>,
        ) {
            acc.iter_mut()
                .zip(g)
                .for_each(|(a, x)| *a = *a + x.scaled(s));
        }
        match (acc, g) {
            (CpuStorage::F32(acc), CpuStorage::F32(v)) => {
                add(&mut acc[a0..a1], v[g0..g1].iter().copied(), s)
            }
            (CpuStorage::F32(acc), CpuStorage::BF16(v)) => {
                add(&mut acc[a0..a1], v[g0..g1].iter().map(|x| x.to_f32()), s)
            }
            (CpuStorage::F32(acc), CpuStorage::F16(v)) => {
                add(&mut acc[a0..a1], v[g0..g1].iter().map(|x| x.to_f32()), s)
            }
            (CpuStorage::F64(acc), CpuStorage::F64(v)) => {
                add(&mut acc[a0..a1], v[g0..g1].iter().copied(), s)
            }
            (acc, g) => candle_core::bail!(
                "grad_sum: a sum of {:?} and a gradient of {:?}",
                acc.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        la: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        let (acc_range, g_range) = (
            contiguous_range(la, "grad_sum", "sum")?,
            contiguous_range(lg, "grad_sum", "gradient")?,
        );
        cuda::add(self.scale, acc, acc_range, g, g_range)
    }
}

/// The CUDA side: kernels/grad_sum.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::Result;
    use qat_model::custom_op::FloatView;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/grad_sum.ptx"));

    /// Pushes the gradient view and the trailing `n, scale, scaled` arguments, and launches.
    fn launch<'a>(
        mut b: LaunchArgs<'a>,
        g: &'a FloatView<'a>,
        n: &'a u64,
        scale: &'a (f32, i32),
    ) -> Result<()> {
        g.push(&mut b);
        b.arg(n).arg(&scale.0).arg(&scale.1);
        let cfg = LaunchConfig {
            grid_dim: ((*n as usize).div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the destination and g hold n elements each (checked by the callers); the
        // kernel touches no others.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    fn scale_args(scale: Option<f64>) -> (f32, i32) {
        (scale.unwrap_or(1.0) as f32, i32::from(scale.is_some()))
    }

    pub(super) fn copy(
        scale: Option<f64>,
        g: &CudaStorage,
        (g0, g1): (usize, usize),
    ) -> Result<CudaStorage> {
        let dev = g.device().clone();
        let sfx = qat_model::kernel_switch::float_kernel_suffix(g.dtype(), "grad_sum")?;
        let func =
            dev.get_or_load_custom_func(&format!("grad_sum_copy_{sfx}"), "qat_grad_sum", PTX)?;
        let n = (g1 - g0) as u64;
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<f32>(g1 - g0)? };
        let view = FloatView::of(g, (g0, g1), "grad_sum")?;
        let scale = scale_args(scale);
        let mut b = func.builder();
        b.arg(&out);
        launch(b, &view, &n, &scale)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn add(
        scale: Option<f64>,
        acc: &mut CudaStorage,
        (a0, a1): (usize, usize),
        g: &CudaStorage,
        (g0, g1): (usize, usize),
    ) -> Result<()> {
        if a1 - a0 != g1 - g0 {
            candle_core::bail!(
                "grad_sum: a sum of {} elements, a gradient of {}",
                a1 - a0,
                g1 - g0
            );
        }
        let dev = g.device().clone();
        let sfx = qat_model::kernel_switch::float_kernel_suffix(g.dtype(), "grad_sum")?;
        let func =
            dev.get_or_load_custom_func(&format!("grad_sum_add_{sfx}"), "qat_grad_sum", PTX)?;
        let n = (g1 - g0) as u64;
        let mut acc = acc.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a1);
        let view = FloatView::of(g, (g0, g1), "grad_sum")?;
        let scale = scale_args(scale);
        let mut b = func.builder();
        b.arg(&mut acc);
        launch(b, &view, &n, &scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Gradient stores holding `values[i]` (of `dtype`) for `vars[i]`.
    fn store(vars: &[(String, Var)], values: &[Tensor]) -> Result<GradStore> {
        let total = vars
            .iter()
            .map(|(_, v)| v.as_tensor().sum_all())
            .reduce(|a, b| a? + b?)
            .expect("vars")?;
        let mut grads = total.backward()?;
        for ((_, var), g) in vars.iter().zip(values) {
            grads.insert(var.as_tensor(), g.clone());
        }
        Ok(grads)
    }

    fn vars(n: usize, len: usize, dtype: DType) -> Result<Vec<(String, Var)>> {
        (0..n)
            .map(|i| {
                let w = Tensor::zeros(len, dtype, &Device::Cpu)?;
                Ok((format!("w{i}"), Var::from_tensor(&w)?))
            })
            .collect()
    }

    /// Zeros of both signs, tiny, huge and plain values, as `dtype`.
    fn edge(len: usize, seed: u64, dtype: DType) -> Result<Tensor> {
        let t = qat_model::custom_op::lcg_tensor(&[len], seed, -1.0, 1.0)?;
        let scales: Vec<f64> = (0..len)
            .map(|i| [0.0, -0.0, 1e-30, 3e7, 1e-7, 1.0, 1.0, 1.0][i % 8])
            .collect();
        (t * Tensor::from_vec(scales, len, &Device::Cpu)?)?.to_dtype(dtype)
    }

    fn bits(t: &Tensor) -> Result<Vec<u64>> {
        Ok(match t.dtype() {
            DType::F64 => t.to_vec1::<f64>()?.iter().map(|x| x.to_bits()).collect(),
            _ => qat_model::custom_op::f32_bits(t)?
                .iter()
                .map(|&b| u64::from(b))
                .collect(),
        })
    }

    /// Hand-worked: 0.5 · [1, −2, 0.5] + 0.5 · [3, 0, 4] (bf16) = [2, −1, 2.25], in f32.
    #[test]
    fn sums_scaled_gradients_in_the_weights_dtype() -> Result<()> {
        let vars = vars(1, 3, DType::F32)?;
        let mut sum = GradSum::new();
        let g1 = Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
        let g2 = Tensor::new(&[3f32, 0.0, 4.0], &Device::Cpu)?.to_dtype(DType::BF16)?;
        sum.add(&vars, &store(&vars, &[g1])?, 0.5)?;
        sum.add(&vars, &store(&vars, &[g2])?, 0.5)?;
        let got = &sum.sums()["w0"];
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.to_vec1::<f32>()?, [2.0, -1.0, 2.25]);
        Ok(())
    }

    /// The in-place ops give the composed ops' bits, for every gradient dtype, scaled or not,
    /// a first gradient taken as it is or not, over several additions; and after the first
    /// owned sum they update it in place (the same tensor).
    #[test]
    fn in_place_sums_give_the_composed_bits() -> Result<()> {
        let cases = [
            (DType::F32, DType::F32),
            (DType::F32, DType::BF16),
            (DType::F32, DType::F16),
            (DType::F64, DType::F64),
        ];
        for (weight, grad) in cases {
            for scales in [[1.0, 0.37, 1.0, 0.25], [0.5, 1.0, 0.37, 2.0]] {
                let vars = vars(2, 203, weight)?;
                let (mut fast, mut composed) = (GradSum::new(), GradSum::composed());
                let mut ids = Vec::new();
                for (k, &s) in scales.iter().enumerate() {
                    let g = [
                        edge(203, 10 + k as u64, grad)?,
                        edge(203, 20 + k as u64, grad)?,
                    ];
                    fast.add(&vars, &store(&vars, &g)?, s)?;
                    composed.add(&vars, &store(&vars, &g)?, s)?;
                    ids.push(fast.sums()["w0"].id());
                }
                for name in ["w0", "w1"] {
                    let (a, b) = (&fast.sums()[name], &composed.sums()[name]);
                    assert_eq!(a.dtype(), weight);
                    assert_eq!(
                        bits(a)?,
                        bits(b)?,
                        "{weight:?} sums of {grad:?}, {scales:?}"
                    );
                }
                // A scaled first gradient is already a sum of its own; one taken as it is
                // is copied at the second addition.
                let first_own = if scales[0] == 1.0 { 1 } else { 0 };
                assert_eq!(
                    ids[first_own], ids[3],
                    "summed in place, {weight:?} {grad:?}"
                );
            }
        }
        Ok(())
    }

    /// Two variables given one and the same gradient tensor, taken as it is: adding to one
    /// sum leaves the other (and the gradient) unchanged.
    #[test]
    fn a_shared_first_gradient_is_copied_before_adding() -> Result<()> {
        let vars = vars(2, 3, DType::F32)?;
        let shared = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        let mut sum = GradSum::new();
        sum.add(
            &vars,
            &store(&vars, &[shared.clone(), shared.clone()])?,
            1.0,
        )?;
        let more = Tensor::new(&[10f32, 10.0, 10.0], &Device::Cpu)?;
        sum.add(&vars[..1], &store(&vars, &[more.clone(), more])?, 1.0)?;
        assert_eq!(sum.sums()["w0"].to_vec1::<f32>()?, [11.0, 12.0, 13.0]);
        assert_eq!(sum.sums()["w1"].to_vec1::<f32>()?, [1.0, 2.0, 3.0]);
        assert_eq!(shared.to_vec1::<f32>()?, [1.0, 2.0, 3.0]);
        Ok(())
    }

    /// The CUDA kernels against the CPU ops, bit for bit (f32, bf16 and f16 gradients of f32
    /// weights, scaled and not). Runs only in a `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_sums_give_the_cpu_bits() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        for grad in [DType::F32, DType::BF16, DType::F16] {
            let (cpu_vars, gpu_vars) = (vars(1, 70_001, DType::F32)?, vars(1, 70_001, DType::F32)?);
            let gpu_vars: Vec<(String, Var)> = gpu_vars
                .into_iter()
                .map(|(n, v)| Ok((n, Var::from_tensor(&v.as_tensor().to_device(&gpu)?)?)))
                .collect::<Result<_>>()?;
            let (mut cpu, mut cuda) = (GradSum::new(), GradSum::new());
            for (k, s) in [0.5, 1.0, 0.37].into_iter().enumerate() {
                let g = edge(70_001, 30 + k as u64, grad)?;
                cpu.add(&cpu_vars, &store(&cpu_vars, std::slice::from_ref(&g))?, s)?;
                cuda.add(&gpu_vars, &store(&gpu_vars, &[g.to_device(&gpu)?])?, s)?;
            }
            let (a, b) = (&cpu.sums()["w0"], &cuda.sums()["w0"]);
            assert_eq!(bits(a)?, bits(&b.to_device(&Device::Cpu)?)?, "{grad:?}");
        }
        Ok(())
    }
}
