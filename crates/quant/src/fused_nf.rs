//! NormalFloat fake quantization per group (NF3, BitDistiller's "n2f3", and NF4; [`crate::nf`])
//! as one op on CUDA, with the straight-through gradient.
//!
//! The composed path (`nf::fake_nf`) makes 30 to 50 passes over the weight per forward pass (the
//! scales, a comparison and an add per threshold, an index select, casts), each a fresh
//! `[out, in]` tensor. kernels/nf_group.cu reads the weight once and writes its values in f32,
//! or in bf16 for bf16 compute: one warp per group, the composed path's f32 operations, so the
//! same bits. The gradient is the identity, as the composed path's [`crate::ste`].
//!
//! Used by [`crate::fake::fake_weight`] for f32 weights on CUDA (`cuda` builds; unless
//! `QAT_CUDA_FUSED_NF=0`); the CPU keeps the composed ops, so CPU runs are byte-identical to
//! before. The CPU implementation here is the reference the kernel is tested against (through
//! the CUDA emulation, tests/nf_group_emulated.rs, and on a GPU); it is itself tested against the
//! composed ops.

use crate::nf::NfGrid;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
struct NfGroupFakeQuant {
    grid: NfGrid,
    group: usize,
    to_bf16: bool,
}

/// A scale as the packed model stores it: f16, saturating at 65504 (candle's `minimum`).
fn f16_scale(a: f32) -> f32 {
    let max = crate::fake::F16_MAX as f32;
    half::f16::from_f32(if a > max { max } else { a }).to_f32()
}

/// One group's values, as the composed path computes them in f32.
fn group_values(grid: NfGrid, xs: &[f32], out: &mut Vec<f32>) {
    let mx = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mn = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let (s_pos, s_neg) = match grid {
        NfGrid::Nf3 => (f16_scale(mx.abs()), f16_scale(mn.abs())),
        NfGrid::Nf4 => {
            let s = f16_scale(mx.abs().max(mn.abs()));
            (s, s)
        }
    };
    let levels = grid.levels();
    out.extend(xs.iter().map(|&x| {
        let s = if x >= 0.0 { s_pos } else { s_neg };
        let u = if s == 0.0 { 0.0 } else { x / s };
        levels[usize::from(grid.index(u))] * s
    }));
}

impl CustomOp1 for NfGroupFakeQuant {
    fn name(&self) -> &'static str {
        "nf-group-fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::group_kernel::cpu_forward((s, l), "nf_group", self.group, self.to_bf16, |xs, out| {
            group_values(self.grid, xs, out)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::forward(self, s, l)?, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::fused::ste_grad(arg, grad, self.to_bf16).map(Some)
    }
}

/// Fake-quantizes `w: [out, in]` (f32) on `grid` with groups of `group` inputs, as
/// [`crate::nf`] does, in one pass; `to_bf16`: the values rounded to bf16 in the same pass (the
/// bits of the f32 values' cast). Gradient: the identity. `group` divides `in`.
pub fn fake_nf_group(w: &Tensor, grid: NfGrid, group: usize, to_bf16: bool) -> Result<Tensor> {
    crate::group_kernel::check_weight(w, group, "nf_group")?;
    let op = NfGroupFakeQuant {
        grid,
        group,
        to_bf16,
    };
    crate::fused::apply(w, op)
}

/// Whether [`crate::fake::fake_weight`] runs NF3/NF4 weights through [`fake_nf_group`]: f32
/// weights on CUDA in `cuda` builds, unless `QAT_CUDA_FUSED_NF=0` (the CPU keeps the composed
/// ops).
pub fn supported(w: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::group_kernel::kernel_on(&ON, "QAT_CUDA_FUSED_NF", w)
}

/// The CUDA side: kernels/nf_group.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use super::NfGroupFakeQuant;
    use crate::nf::NfGrid;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf_group.ptx"));

    pub(super) fn forward(
        op: &NfGroupFakeQuant,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaStorage> {
        let nf3 = i32::from(op.grid == NfGrid::Nf3);
        let module = ("qat_nf_group", PTX);
        crate::group_kernel::cuda::forward(
            "nf_group",
            module,
            "nf_group_fq",
            (s, l),
            op.group,
            op.to_bf16,
            nf3,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf::fake_nf;
    use candle_core::{DType, Device, Var};

    /// `[rows, cols]` weights of several magnitudes per row, with values exactly at thresholds
    /// (times a scale of 1), zeros of both signs, an all-positive and an all-zero group.
    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut state = 5u64;
        let mut v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0;
                r * [0.02, 1.0, 3e-4, 40.0][(i / cols) % 4]
            })
            .collect();
        // Group 0: scale 1 both ways (max 1, min -1), the thresholds themselves.
        let at: Vec<f32> = [1.0, -1.0, 0.0, -0.0]
            .into_iter()
            .chain(crate::nf::NF3_THRESHOLDS)
            .chain(crate::nf::NF4_THRESHOLDS)
            .collect();
        v[..at.len()].copy_from_slice(&at);
        v[32..64]
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = 0.1 + i as f32 * 0.01);
        v[64..96].fill(0.0);
        v
    }

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        qat_model::custom_op::f32_bits(&t.to_dtype(DType::F32)?)
    }

    /// The op's values are the composed path's bits (f32, and rounded to bf16), NF3 and NF4,
    /// groups of 32, 64 and whole rows; its gradient is the identity.
    #[test]
    fn values_equal_the_composed_path() -> Result<()> {
        let (rows, cols) = (8, 256);
        let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu)?;
        for grid in [NfGrid::Nf3, NfGrid::Nf4] {
            for group in [32, 64, cols] {
                let composed = fake_nf(&w, grid, group)?;
                let fused = fake_nf_group(&w, grid, group, false)?;
                assert_eq!(bits(&fused)?, bits(&composed)?, "{grid:?}, group {group}");
                let fused16 = fake_nf_group(&w, grid, group, true)?;
                assert_eq!(fused16.dtype(), DType::BF16);
                let composed16 = composed.to_dtype(DType::BF16)?;
                assert_eq!(
                    bits(&fused16)?,
                    bits(&composed16)?,
                    "bf16 {grid:?}, group {group}"
                );
            }
        }
        let v = Var::from_tensor(&w)?;
        let r = w.sin()?;
        let g = (fake_nf_group(&v, NfGrid::Nf3, 32, false)? * &r)?
            .sum_all()?
            .backward()?;
        assert_eq!(bits(g.get(v.as_tensor()).expect("grad"))?, bits(&r)?);
        Ok(())
    }

    /// The CUDA kernel against the CPU op, bit for bit (f32 and bf16 outputs). Runs only in a
    /// `--features cuda` build on a machine with a GPU.
    #[test]
    fn cuda_kernel_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, cols) = (40, 512);
        let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu)?;
        for grid in [NfGrid::Nf3, NfGrid::Nf4] {
            for group in [64, cols] {
                for to_bf16 in [false, true] {
                    let cpu = fake_nf_group(&w, grid, group, to_bf16)?;
                    let gpu_out = fake_nf_group(&w.to_device(&gpu)?, grid, group, to_bf16)?;
                    assert_eq!(
                        bits(&gpu_out)?,
                        bits(&cpu)?,
                        "{grid:?}, group {group}, bf16 {to_bf16}"
                    );
                }
            }
        }
        Ok(())
    }
}
