//! CPU kernel for symmetric per-row fake quantization: one pass over each row instead of the
//! ~20 composed candle ops of [`crate::fake::sym_quantize`], with the STE (identity) backward.
//! With the `cuda` feature, the same op on CUDA tensors (f32 and bf16) runs kernels/fake_quant.cu
//! (one block per row; compiled to PTX by build.rs) — written without a GPU at hand: checked bit
//! for bit against this CPU kernel through a CUDA emulation (tests/fake_quant_emulated.rs), and
//! first run on a GPU by `make pipeline-gpu` (RTN perplexities on cuda equal the CPU ones);
//! `QAT_CUDA_FUSED_QUANT=0` falls back to the composed ops.
//!
//! Bit-identical to the composed path (tested): the same f32/f64 arithmetic in the same order —
//! `scale = max|row| / qmax` (true division), optionally rounded to f16 (nearest, ties to even,
//! saturating at [`F16_MAX`]), `q = clamp(round_half_even(x / scale), -qmax, qmax)`, `out = q ·
//! scale`, and an all-zero row (scale 0) gives zeros. Zeros are +0 (`-0 + 0`), as packed codes
//! dequantize; the composed path may give -0, which compares equal.

use crate::fake::{ScaleRounding, F16_MAX};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows handed to one rayon task (rows are short: one token's features or one weight row).
const ROWS_PER_TASK: usize = 64;

#[derive(Debug, Clone, Copy)]
struct SymRowFakeQuant {
    qmax: u8,
    rounding: ScaleRounding,
    /// BF16 for f32 input: the result rounded to bf16 in the same pass (the cast's bits).
    to_bf16: bool,
}

trait RowFloat: Copy + Send + Sync + PartialOrd + std::ops::Add<Output = Self> + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn abs(self) -> Self;
    fn div(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn round_ties_even(self) -> Self;
    /// Rounds a scale to the nearest f16 (saturating) and back, as `to_dtype(F16)` does.
    fn through_f16(self) -> Self;
    const ZERO: Self;
}

impl RowFloat for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn div(self, other: Self) -> Self {
        self / other
    }
    fn mul(self, other: Self) -> Self {
        self * other
    }
    fn round_ties_even(self) -> Self {
        // (x + 1.5·2^23) − 1.5·2^23 rounds to nearest, ties to even, exactly for |x| < 2^22,
        // and vectorizes (the libm call `rintf` does not, without SSE4.1).
        const MAGIC: f32 = 12_582_912.0;
        if self.abs() < 4_194_304.0 {
            (self + MAGIC) - MAGIC
        } else {
            self // already an integer
        }
    }
    fn through_f16(self) -> Self {
        half::f16::from_f32(self.min(F16_MAX as f32)).to_f32()
    }
    const ZERO: Self = 0.0;
}

impl RowFloat for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn div(self, other: Self) -> Self {
        self / other
    }
    fn mul(self, other: Self) -> Self {
        self * other
    }
    fn round_ties_even(self) -> Self {
        const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5·2^52, exact for |x| < 2^51
        if self.abs() < 2_251_799_813_685_248.0 {
            (self + MAGIC) - MAGIC
        } else {
            self
        }
    }
    fn through_f16(self) -> Self {
        half::f16::from_f64(self.min(F16_MAX)).to_f64()
    }
    const ZERO: Self = 0.0;
}

fn quantize_rows<T: RowFloat>(x: &[T], row_len: usize, op: SymRowFakeQuant) -> Vec<T> {
    let qmax = T::from_f64(f64::from(op.qmax));
    let neg_qmax = T::from_f64(-f64::from(op.qmax));
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(row_len * ROWS_PER_TASK)
        .zip(x.par_chunks(row_len * ROWS_PER_TASK))
        .for_each(|(out, x)| {
            for (out, row) in out.chunks_mut(row_len).zip(x.chunks(row_len)) {
                let mut amax = T::ZERO;
                for &v in row {
                    let a = v.abs();
                    if a > amax {
                        amax = a;
                    }
                }
                let mut scale = amax.div(qmax);
                if op.rounding == ScaleRounding::F16 {
                    scale = scale.through_f16();
                }
                if scale.to_f64() == 0.0 {
                    continue; // all-zero row (or a scale below f16's range): zeros
                }
                for (o, &v) in out.iter_mut().zip(row) {
                    let mut q = v.div(scale).round_ties_even();
                    if q > qmax {
                        q = qmax;
                    } else if q < neg_qmax {
                        q = neg_qmax;
                    }
                    *o = q.mul(scale) + T::ZERO; // -0 → +0, as the packed codes have it
                }
            }
        });
    out
}

impl CustomOp1 for SymRowFakeQuant {
    fn name(&self) -> &'static str {
        "sym-row-fake-quant"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sym_fake_quant_rows: input must be contiguous");
        };
        let row_len = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = match storage {
            CpuStorage::F32(x) if self.to_bf16 => CpuStorage::BF16(
                quantize_rows(&x[start..end], row_len, *self)
                    .into_par_iter()
                    .map(half::bf16::from_f32) // nearest, ties to even: candle's cast
                    .collect(),
            ),
            CpuStorage::F32(x) => CpuStorage::F32(quantize_rows(&x[start..end], row_len, *self)),
            CpuStorage::F64(x) if !self.to_bf16 => {
                CpuStorage::F64(quantize_rows(&x[start..end], row_len, *self))
            }
            other => candle_core::bail!(
                "sym_fake_quant_rows: dtype {:?}, expected F32 or F64",
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
        cuda::forward(*self, storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        ste_grad(arg, grad_res, self.to_bf16).map(Some)
    }
}

/// The straight-through gradient of a fake-quantization op's input `arg` (this module's, and
/// [`crate::fused_asym`]'s and [`crate::fused_nf`]'s): `grad` in `arg`'s dtype. With a bf16
/// output (`to_bf16`: an f32 master weight quantized for bf16 compute) a bf16 gradient stays
/// bf16: its f32 cast would be exact, so the optimizer reads it as it is (qat_train's AdamW and
/// gradient norm upcast or read it as f32, and accumulation casts it before any sum), which
/// saves a cast pass and half the gradient's memory traffic.
pub(crate) fn ste_grad(arg: &Tensor, grad: &Tensor, to_bf16: bool) -> Result<Tensor> {
    if to_bf16 && grad.dtype() == DType::BF16 {
        return Ok(grad.clone());
    }
    grad.to_dtype(arg.dtype())
}

/// The CUDA side: kernels/fake_quant.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use super::SymRowFakeQuant;
    use crate::fake::ScaleRounding;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fake_quant.ptx"));

    pub(super) fn forward(
        op: SymRowFakeQuant,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("sym_fake_quant_rows: input must be contiguous");
        };
        let dev = &storage.device;
        let el = layout.shape().elem_count();
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let rows = el / cols;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (qmax, f16_scale) = (
            f32::from(op.qmax),
            i32::from(op.rounding == ScaleRounding::F16),
        );
        let cols = cols as u32;
        let slice = match &storage.slice {
            CudaStorageSlice::F32(x) if op.to_bf16 => {
                let x = x.slice(o1..o2);
                let func = dev.get_or_load_custom_func(
                    "sym_row_fake_quant_f32_bf16",
                    "qat_fake_quant",
                    PTX,
                )?;
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<half::bf16>(el)? };
                let mut b = func.builder();
                b.arg(&x).arg(&out).arg(&cols).arg(&qmax).arg(&f16_scale);
                // SAFETY: the kernel reads `rows * cols` f32 and writes as many bf16.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::BF16(out)
            }
            CudaStorageSlice::F32(x) => {
                let x = x.slice(o1..o2);
                let func =
                    dev.get_or_load_custom_func("sym_row_fake_quant_f32", "qat_fake_quant", PTX)?;
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<f32>(el)? };
                let mut b = func.builder();
                b.arg(&x).arg(&out).arg(&cols).arg(&qmax).arg(&f16_scale);
                // SAFETY: the kernel reads `rows * cols` inputs and writes as many outputs.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::F32(out)
            }
            CudaStorageSlice::BF16(x) if !op.to_bf16 => {
                let x = x.slice(o1..o2);
                let func =
                    dev.get_or_load_custom_func("sym_row_fake_quant_bf16", "qat_fake_quant", PTX)?;
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<half::bf16>(el)? };
                let mut b = func.builder();
                b.arg(&x).arg(&out).arg(&cols).arg(&qmax).arg(&f16_scale);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::BF16(out)
            }
            _ => candle_core::bail!(
                "sym_fake_quant_rows: CUDA dtype {:?}, expected F32 or BF16",
                storage.dtype()
            ),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            layout.shape().clone(),
        ))
    }
}

/// Whether [`sym_fake_quant_rows`] runs on `x`: a CPU tensor of dtype f32 or f64, or (with the
/// `cuda` feature, unless `QAT_CUDA_FUSED_QUANT=0`) a CUDA tensor of dtype f32 or bf16.
pub fn supported(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => matches!(x.dtype(), DType::F32 | DType::F64),
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && matches!(x.dtype(), DType::F32 | DType::BF16)
                && cuda_kernel_enabled()
        }
        _ => false,
    }
}

/// `QAT_CUDA_FUSED_QUANT=0` turns the CUDA kernel off (composed candle ops instead), read once.
fn cuda_kernel_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QAT_CUDA_FUSED_QUANT").map_or(true, |v| v != "0"))
}

/// Symmetric fake quantization of `x: [.., n]` with one scale per row of the last dim; value =
/// `q · scale`, gradient = identity (STE). `qmax = 2^(bits-1) - 1` (from `fake::sym_qmax`).
/// Dtypes as [`supported`] says.
pub fn sym_fake_quant_rows(x: &Tensor, qmax: u8, rounding: ScaleRounding) -> Result<Tensor> {
    apply(
        x,
        SymRowFakeQuant {
            qmax,
            rounding,
            to_bf16: false,
        },
    )
}

/// [`sym_fake_quant_rows`] followed by `to_dtype(dtype)`, in one pass where [`supported_to`]
/// holds (f32 in, bf16 out: the bits of the two ops, gradient cast back to f32); otherwise
/// the two ops.
pub fn sym_fake_quant_rows_to(
    x: &Tensor,
    qmax: u8,
    rounding: ScaleRounding,
    dtype: DType,
) -> Result<Tensor> {
    if x.dtype() == DType::F32 && dtype == DType::BF16 {
        return apply(
            x,
            SymRowFakeQuant {
                qmax,
                rounding,
                to_bf16: true,
            },
        );
    }
    sym_fake_quant_rows(x, qmax, rounding)?.to_dtype(dtype)
}

/// `op` on `x` made contiguous, with its backward only where `x` is tracked (the fused
/// fake-quantization ops of this module, [`crate::fused_asym`] and [`crate::fused_nf`]).
pub(crate) fn apply<C: CustomOp1 + Clone + Send + Sync + 'static>(
    x: &Tensor,
    op: C,
) -> Result<Tensor> {
    if x.track_op() {
        x.contiguous()?.apply_op1(op)
    } else {
        x.contiguous()?.apply_op1_no_bwd(&op)
    }
}

/// Whether [`sym_fake_quant_rows_to`] runs on `x` with output `dtype`: where
/// [`supported`] holds, for its own dtype or from f32 to bf16.
pub fn supported_to(x: &Tensor, dtype: DType) -> bool {
    supported(x) && (dtype == x.dtype() || (x.dtype() == DType::F32 && dtype == DType::BF16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{sym_qmax, sym_quant_dequant};
    use candle_core::{Device, Var};

    fn sample(rows: usize, cols: usize) -> Vec<f32> {
        let mut state = 7u64;
        let mut v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        v[..cols].fill(0.0); // an all-zero row
        v[cols..2 * cols]
            .copy_from_slice(&(0..cols).map(|i| i as f32 * 0.5 - 3.5).collect::<Vec<_>>()); // ties
        v
    }

    #[test]
    fn equals_the_composed_path_for_all_bits_and_roundings() -> Result<()> {
        let (rows, cols) = (37, 19);
        let x = Tensor::from_vec(sample(rows, cols), (rows, cols), &Device::Cpu)?;
        for bits in 2..=8u8 {
            for rounding in [ScaleRounding::Exact, ScaleRounding::F16] {
                let qmax = sym_qmax(bits).expect("bits");
                let fused = sym_fake_quant_rows(&x, qmax, rounding)?.to_vec2::<f32>()?;
                let composed = sym_quant_dequant(&x, bits, &[1], rounding)?.to_vec2::<f32>()?;
                assert_eq!(fused, composed, "bits {bits} {rounding:?}");
                let x64 = x.to_dtype(DType::F64)?;
                let fused = sym_fake_quant_rows(&x64, qmax, rounding)?.to_vec2::<f64>()?;
                let composed = sym_quant_dequant(&x64, bits, &[1], rounding)?.to_vec2::<f64>()?;
                assert_eq!(fused, composed, "f64 bits {bits} {rounding:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn magic_rounding_equals_round_ties_even() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.25).collect(); // ties included
        xs.extend([
            4_194_303.5,
            -4_194_303.5,
            4_194_304.0,
            1e9,
            -1e9,
            0.49999997,
            -0.5,
            2.5,
            -2.5,
        ]);
        for x in xs {
            let (fast, std) = (RowFloat::round_ties_even(x), f32::round_ties_even(x));
            assert!(fast == std, "{x}: {fast} vs {std}");
            let x = f64::from(x) + 0.125;
            assert!(
                RowFloat::round_ties_even(x) == f64::round_ties_even(x),
                "{x}"
            );
        }
    }

    /// The CUDA kernel against the CPU one, bit for bit (f32), and against the composed path in
    /// bf16. Runs only in a `--features cuda` build on a machine with a GPU (skipped otherwise).
    #[test]
    fn cuda_kernel_equals_the_cpu_kernel() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, cols) = (37, 1000);
        let x = Tensor::from_vec(sample(rows, cols), (rows, cols), &Device::Cpu)?;
        for bits in [4u8, 8] {
            for rounding in [ScaleRounding::Exact, ScaleRounding::F16] {
                let qmax = sym_qmax(bits).expect("bits");
                let cpu = sym_fake_quant_rows(&x, qmax, rounding)?.to_vec2::<f32>()?;
                let cuda =
                    sym_fake_quant_rows(&x.to_device(&gpu)?, qmax, rounding)?.to_vec2::<f32>()?;
                assert_eq!(cpu, cuda, "f32 bits {bits} {rounding:?}");
                let xb = x.to_dtype(DType::BF16)?;
                let composed = sym_quant_dequant(&xb, bits, &[1], rounding)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                let cuda = sym_fake_quant_rows(&xb.to_device(&gpu)?, qmax, rounding)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                assert_eq!(composed, cuda, "bf16 bits {bits} {rounding:?}");
                // f32 in, bf16 out: the CPU kernel's values cast to bf16, bit for bit.
                let want = sym_fake_quant_rows(&x, qmax, rounding)?
                    .to_dtype(DType::BF16)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                let cuda =
                    sym_fake_quant_rows_to(&x.to_device(&gpu)?, qmax, rounding, DType::BF16)?;
                assert_eq!(cuda.dtype(), DType::BF16);
                let cuda = cuda.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                assert_eq!(want, cuda, "f32 -> bf16 bits {bits} {rounding:?}");
            }
        }
        Ok(())
    }

    /// f32 in, bf16 out on the CPU: the bits of quantizing then casting, and the gradient of
    /// the two ops (identity, cast back to f32).
    #[test]
    fn bf16_output_equals_quantize_then_cast() -> Result<()> {
        let (rows, cols) = (6, 300);
        let x = Var::from_tensor(&Tensor::from_vec(
            sample(rows, cols),
            (rows, cols),
            &Device::Cpu,
        )?)?;
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?
            .sin()?
            .to_dtype(DType::BF16)?;
        for bits in 2..=8u8 {
            let qmax = sym_qmax(bits).expect("bits");
            let fused = sym_fake_quant_rows_to(&x, qmax, ScaleRounding::F16, DType::BF16)?;
            let two = sym_fake_quant_rows(&x, qmax, ScaleRounding::F16)?.to_dtype(DType::BF16)?;
            assert_eq!(fused.dtype(), DType::BF16);
            let bits_of = |t: &Tensor| -> Result<Vec<u16>> {
                Ok(t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits_of(&fused)?, bits_of(&two)?, "bits {bits}");
            let g1 = (fused * &w)?.sum_all()?.backward()?;
            let g2 = (two * &w)?.sum_all()?.backward()?;
            let (g1, g2) = (g1.get(&x).expect("grad"), g2.get(&x).expect("grad"));
            // The fused op keeps the bf16 gradient (its f32 cast is exact): the cast's values.
            assert_eq!(g1.dtype(), DType::BF16);
            let g1 = g1.to_dtype(DType::F32)?;
            assert_eq!(g1.to_vec2::<f32>()?, g2.to_vec2::<f32>()?, "bits {bits}");
        }
        Ok(())
    }

    #[test]
    fn gradient_is_the_identity() -> Result<()> {
        let x = Var::from_tensor(&Tensor::from_vec(sample(4, 5), (4, 5), &Device::Cpu)?)?;
        let w = Tensor::arange(0f32, 20.0, &Device::Cpu)?.reshape((4, 5))?;
        let y = sym_fake_quant_rows(&x, 7, ScaleRounding::Exact)?;
        let grads = (y * &w)?.sum_all()?.backward()?;
        assert_eq!(
            grads.get(&x).expect("grad").to_vec2::<f32>()?,
            w.to_vec2::<f32>()?
        );
        Ok(())
    }
}
