//! BitDistiller's asymmetric per-group fake quantization ([`crate::asym`], format `asym_group`)
//! as one op on CUDA, with its min/max gradient (or the STE) as one more.
//!
//! The composed path makes about 35 passes over the weight per forward pass (max, min, the f16
//! scale, two ties-to-even roundings of about eight ops each, clamps, casts) and about 15 more
//! for the min/max gradient, each a fresh `[out, in]` tensor, several of them kept for the
//! backward pass: for TinyLlama's 1B linear weights in f32, about 150 GB of memory traffic per
//! training step, tens of milliseconds on a GPU. kernels/asym_group.cu reads a weight once
//! forward (writing f32, or bf16 for bf16 compute, in the same pass) and the weight and its
//! gradient once backward: one warp per group (any group length), the composed path's f32
//! operations in its order, so the values are bit for bit the composed path's. The min/max
//! gradient's per-group sum is summed in another order (per lane, then a fixed tree), so the
//! gradient equals the composed one to f32 rounding.
//!
//! Used by [`crate::fake::fake_weight`] for f32 weights on CUDA (`cuda` builds; unless
//! `QAT_CUDA_FUSED_ASYM=0`); the CPU keeps the composed ops, so CPU runs are byte-identical to
//! before. The CPU implementation here is the reference the kernels are tested against (through
//! the CUDA emulation, tests/asym_group_emulated.rs, and on a GPU); it is itself tested against
//! the composed ops.

use crate::weight::WeightGrad;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Lower bound on a group's range, as [`crate::asym::RANGE_MIN`] in f32.
const RANGE_MIN: f32 = crate::asym::RANGE_MIN as f32;

/// candle's `maximum` / `minimum`: the first operand unless the second is strictly larger /
/// smaller (`clamp` is `maximum`, then `minimum`).
fn cmax(a: f32, b: f32) -> f32 {
    if a < b {
        b
    } else {
        a
    }
}

fn cmin(a: f32, b: f32) -> f32 {
    if a > b {
        b
    } else {
        a
    }
}

/// One group's quantizer, as the composed path computes it in f32.
#[derive(Debug, Clone, Copy)]
struct GroupQuant {
    mx: f32,
    mn: f32,
    scale: f32,
    zero: f32,
    m: f32,
}

impl GroupQuant {
    fn of(xs: &[f32], m: f32) -> Self {
        let mx = xs.iter().copied().fold(f32::NEG_INFINITY, cmax);
        let mn = xs.iter().copied().fold(f32::INFINITY, cmin);
        let scale = cmin(cmax(mx - mn, RANGE_MIN) / m, crate::fake::F16_MAX as f32);
        let scale = half::f16::from_f32(scale).to_f32();
        let zero = cmin(cmax(-(mn / scale).round_ties_even(), 0.0), m);
        Self {
            mx,
            mn,
            scale,
            zero,
            m,
        }
    }

    /// `x / scale` and the code before its clamp, `rint(x / scale) + zero`.
    fn unclamped(&self, x: f32) -> (f32, f32) {
        let u = x / self.scale;
        (u, u.round_ties_even() + self.zero)
    }

    fn value(&self, x: f32) -> f32 {
        let code = cmin(cmax(self.unclamped(x).1, 0.0), self.m);
        (code - self.zero) * self.scale + 0.0
    }

    /// The min/max gradient of the group `xs` for the incoming gradient `g`, into `dx`.
    fn minmax_grad(&self, xs: &[f32], g: impl Iterator<Item = f32> + Clone, dx: &mut [f32]) {
        let (mut s, mut n_max, mut n_min) = (0f32, 0f32, 0f32);
        for (&x, gi) in xs.iter().zip(g.clone()) {
            let (u, v) = self.unclamped(x);
            let code = cmin(cmax(v, 0.0), self.m);
            let inside = f32::from(u8::from(v >= 0.0 && v <= self.m));
            s += gi * ((code - self.zero) - inside * u);
            n_max += f32::from(u8::from(x == self.mx));
            n_min += f32::from(u8::from(x == self.mn));
        }
        let live = f32::from(u8::from(self.mx - self.mn >= RANGE_MIN));
        for ((&x, gi), d) in xs.iter().zip(g).zip(dx) {
            let v = self.unclamped(x).1;
            let inside = f32::from(u8::from(v >= 0.0 && v <= self.m));
            let (is_max, is_min) = (
                f32::from(u8::from(x == self.mx)),
                f32::from(u8::from(x == self.mn)),
            );
            let k = ((is_max / n_max - is_min / n_min) * live) / self.m;
            *d = gi * inside + s * k;
        }
    }
}

/// The forward op: `w` (f32, contiguous, groups of `group` consecutive elements) → its
/// fake-quantized values in f32 or, with `to_bf16`, rounded to bf16 in the same pass.
#[derive(Debug, Clone, Copy)]
struct AsymGroupFakeQuant {
    max_int: u8,
    group: usize,
    grad: WeightGrad,
    to_bf16: bool,
}

/// The min/max gradient op: `(w, g)` → `dw` (f32), `g` f32 or bf16.
#[derive(Debug, Clone, Copy)]
struct AsymGroupMinMaxGrad {
    max_int: u8,
    group: usize,
}

impl CustomOp1 for AsymGroupFakeQuant {
    fn name(&self) -> &'static str {
        "asym-group-fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = f32::from(self.max_int);
        crate::group_kernel::cpu_forward(
            (s, l),
            "asym_group",
            self.group,
            self.to_bf16,
            |xs, out| {
                let q = GroupQuant::of(xs, m);
                out.extend(xs.iter().map(|&v| q.value(v)));
            },
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::forward(self, s, l)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        match self.grad {
            WeightGrad::Ste => crate::fused::ste_grad(arg, grad, self.to_bf16).map(Some),
            WeightGrad::MinMax => {
                let g = match grad.dtype() {
                    DType::BF16 | DType::F32 => grad.contiguous()?,
                    _ => grad.to_dtype(DType::F32)?.contiguous()?,
                };
                let op = AsymGroupMinMaxGrad {
                    max_int: self.max_int,
                    group: self.group,
                };
                Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&g, &op)?))
            }
        }
    }
}

impl CustomOp2 for AsymGroupMinMaxGrad {
    fn name(&self) -> &'static str {
        "asym-group-minmax-grad"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::group_kernel::cpu_f32(ws, wl, "asym_group", "weight")?;
        let (g0, g1) = qat_model::custom_op::contiguous_range(gl, "asym_group", "gradient")?;
        if g1 - g0 != x.len() {
            candle_core::bail!(
                "asym_group: a weight of {} elements, a gradient of {}",
                x.len(),
                g1 - g0
            );
        }
        let m = f32::from(self.max_int);
        let mut dx = vec![0f32; x.len()];
        for (i, (xs, d)) in x
            .chunks(self.group)
            .zip(dx.chunks_mut(self.group))
            .enumerate()
        {
            let q = GroupQuant::of(xs, m);
            let range = g0 + i * self.group..g0 + i * self.group + xs.len();
            match gs {
                CpuStorage::F32(g) => q.minmax_grad(xs, g[range].iter().copied(), d),
                CpuStorage::BF16(g) => q.minmax_grad(xs, g[range].iter().map(|v| v.to_f32()), d),
                other => candle_core::bail!("asym_group: gradient dtype {:?}", other.dtype()),
            }
        }
        Ok((CpuStorage::F32(dx), wl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::minmax_grad(self, (ws, wl), (gs, gl))?;
        Ok((out, wl.shape().clone()))
    }
}

/// Fake-quantizes `w: [out, in]` (f32) with `bits`-bit asymmetric groups of `group` inputs, as
/// [`crate::asym`] does, in one pass; `to_bf16`: the result rounded to bf16 in the same pass
/// (the bits of the f32 result's cast). Gradient: `grad` (the min/max gradient as one more op).
/// `max_int` = `2^bits - 1` ([`crate::asym_max_int`]); `group` divides `in`.
pub fn fake_asym_group(
    w: &Tensor,
    max_int: u8,
    group: usize,
    grad: WeightGrad,
    to_bf16: bool,
) -> Result<Tensor> {
    crate::group_kernel::check_weight(w, group, "asym_group")?;
    let op = AsymGroupFakeQuant {
        max_int,
        group,
        grad,
        to_bf16,
    };
    crate::fused::apply(w, op)
}

/// Whether [`crate::fake::fake_weight`] runs `asym_group` weights through [`fake_asym_group`]:
/// f32 weights on CUDA in `cuda` builds, unless `QAT_CUDA_FUSED_ASYM=0` (the CPU keeps the
/// composed ops).
pub fn supported(w: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::group_kernel::kernel_on(&ON, "QAT_CUDA_FUSED_ASYM", w)
}

/// The CUDA side: kernels/asym_group.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{AsymGroupFakeQuant, AsymGroupMinMaxGrad};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result};
    use qat_model::custom_op::contiguous_range;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/asym_group.ptx"));

    pub(super) fn forward(
        op: &AsymGroupFakeQuant,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaStorage> {
        let m = f32::from(op.max_int);
        let module = ("qat_asym_group", PTX);
        crate::group_kernel::cuda::forward(
            "asym_group",
            module,
            "asym_group_fq",
            (s, l),
            op.group,
            op.to_bf16,
            m,
        )
    }

    pub(super) fn minmax_grad(
        op: &AsymGroupMinMaxGrad,
        (ws, wl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let ((a, b), (g0, g1)) = (
            contiguous_range(wl, "asym_group", "weight")?,
            contiguous_range(gl, "asym_group", "gradient")?,
        );
        if g1 - g0 != b - a {
            candle_core::bail!(
                "asym_group: a weight of {} elements, a gradient of {}",
                b - a,
                g1 - g0
            );
        }
        let dev = ws.device().clone();
        let x = ws.as_cuda_slice::<f32>()?.slice(a..b);
        let n = b - a;
        let name = match gs.dtype() {
            DType::F32 => "asym_group_minmax_grad_f32",
            DType::BF16 => "asym_group_minmax_grad_bf16",
            other => candle_core::bail!("asym_group on cuda: gradient dtype {other:?}"),
        };
        let func = dev.get_or_load_custom_func(name, "qat_asym_group", PTX)?;
        let g = qat_model::custom_op::FloatView::of(gs, (g0, g1), "asym_group")?;
        // SAFETY: the kernel writes every element.
        let dx = unsafe { dev.alloc::<f32>(n)? };
        let (groups, group, m) = (
            (n / op.group) as u64,
            op.group as u32,
            f32::from(op.max_int),
        );
        let mut builder = func.builder();
        builder.arg(&x);
        g.push(&mut builder);
        builder.arg(&dx).arg(&groups).arg(&group).arg(&m);
        // SAFETY: x, g and dx hold n = groups · group elements; the kernel touches no others.
        unsafe { builder.launch(crate::group_kernel::cuda::config(groups as usize)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asym::{asym_max_int, fake_asym};
    use candle_core::{Device, Var};

    /// `[rows, cols]` weights: LCG values of several magnitudes, a constant group, a group with
    /// ties at its max and min, and zeros of both signs.
    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut state = 11u64;
        let mut v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0;
                r * [0.02, 1.0, 3e-4, 40.0][(i / cols) % 4]
            })
            .collect();
        v[..32].fill(0.37); // a constant group
        for i in (32..64).step_by(5) {
            v[i] = if i % 2 == 0 { 0.9 } else { -0.9 }; // ties at max and min
        }
        v[64] = -0.0;
        v[65] = 0.0;
        // A group whose 2-bit scale is exactly 1 (range 3) and whose min / scale and values are
        // ties: rint's ties to even, not away from zero.
        for (i, x) in v[96..128].iter_mut().enumerate() {
            *x = [-2.5, 0.5, 0.5, -1.5, -0.5, 0.0, -1.0][i % 7];
        }
        v
    }

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        qat_model::custom_op::f32_bits(&t.to_dtype(DType::F32)?)
    }

    /// The op's values are the composed path's bits, in f32 and rounded to bf16, for 2, 3, 4
    /// and 8 bits and groups of 32, 128 and whole rows.
    #[test]
    fn values_equal_the_composed_path() -> Result<()> {
        let (rows, cols) = (8, 256);
        let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu)?;
        for b in [2u8, 3, 4, 8] {
            let m = asym_max_int(b).expect("bits");
            for group in [32, 128, cols] {
                let composed = fake_asym(&w, b, group, WeightGrad::MinMax)?;
                let fused = fake_asym_group(&w, m, group, WeightGrad::MinMax, false)?;
                assert_eq!(bits(&fused)?, bits(&composed)?, "{b} bits, group {group}");
                let fused16 = fake_asym_group(&w, m, group, WeightGrad::MinMax, true)?;
                assert_eq!(fused16.dtype(), DType::BF16);
                let composed16 = composed.to_dtype(DType::BF16)?;
                assert_eq!(
                    bits(&fused16)?,
                    bits(&composed16)?,
                    "bf16, {b} bits, group {group}"
                );
            }
        }
        Ok(())
    }

    /// The gradients of `Σ out · r`: the min/max one equals the composed path's to f32
    /// rounding (f32 and bf16 outputs), and the STE's is `r` itself.
    #[test]
    fn gradients_match_the_composed_path() -> Result<()> {
        let (rows, cols) = (8, 256);
        let w = Var::from_tensor(&Tensor::from_vec(
            weights(rows, cols),
            (rows, cols),
            &Device::Cpu,
        )?)?;
        let r = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?
            .affine(0.37, 0.0)?
            .sin()?;
        let grad_of = |out: Tensor| -> Result<Tensor> {
            let r = r.to_dtype(out.dtype())?;
            let g = (out * r)?.sum_all()?.backward()?;
            g.get(w.as_tensor()).expect("grad").to_dtype(DType::F32)
        };
        for b in [2u8, 3, 4] {
            let m = asym_max_int(b).expect("bits");
            for group in [32, 128] {
                for to_bf16 in [false, true] {
                    let cast = |t: Tensor| {
                        if to_bf16 {
                            t.to_dtype(DType::BF16)
                        } else {
                            Ok(t)
                        }
                    };
                    let want = grad_of(cast(fake_asym(&w, b, group, WeightGrad::MinMax)?)?)?;
                    let got = grad_of(fake_asym_group(&w, m, group, WeightGrad::MinMax, to_bf16)?)?;
                    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                    let diff = qat_model::custom_op::max_abs_diff(&got, &want)?;
                    assert!(
                        scale > 0.1 && diff <= 1e-5 * f64::from(scale),
                        "{b} bits, group {group}, bf16 {to_bf16}: {diff}"
                    );
                }
            }
            let ste = grad_of(fake_asym_group(&w, m, 32, WeightGrad::Ste, false)?)?;
            assert_eq!(bits(&ste)?, bits(&r)?);
        }
        Ok(())
    }

    /// The CUDA kernels against the CPU op: values bit for bit (f32 and bf16 outputs), min/max
    /// gradients to f32 rounding (f32 and bf16 incoming gradients). Runs only in a `--features
    /// cuda` build on a machine with a GPU.
    #[test]
    fn cuda_kernels_match_the_cpu_op() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, cols) = (40, 512);
        let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu)?;
        let r = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?
            .cos()?;
        for (b, group) in [(2u8, 32usize), (3, 128), (4, cols)] {
            let m = asym_max_int(b).expect("bits");
            for to_bf16 in [false, true] {
                let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
                    let v = Var::from_tensor(&w.to_device(dev)?)?;
                    let out = fake_asym_group(&v, m, group, WeightGrad::MinMax, to_bf16)?;
                    let g = (&out * r.to_dtype(out.dtype())?.to_device(dev)?)?
                        .sum_all()?
                        .backward()?;
                    let dw = g
                        .get(v.as_tensor())
                        .expect("grad")
                        .to_device(&Device::Cpu)?;
                    Ok((out.to_device(&Device::Cpu)?, dw))
                };
                let ((out_cpu, dw_cpu), (out_gpu, dw_gpu)) = (run(&Device::Cpu)?, run(&gpu)?);
                assert_eq!(
                    bits(&out_gpu)?,
                    bits(&out_cpu)?,
                    "{b} bits, group {group}, bf16 {to_bf16}"
                );
                let scale = dw_cpu.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = qat_model::custom_op::max_abs_diff(&dw_gpu, &dw_cpu)?;
                assert!(
                    diff <= 1e-5 * f64::from(scale),
                    "{b} bits, group {group}: {diff}"
                );
            }
        }
        Ok(())
    }
}
