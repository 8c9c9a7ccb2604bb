//! What the one-warp-per-group fake-quantization ops share ([`crate::fused_asym`],
//! [`crate::fused_nf`]): their weight check, their switch, their CPU forward's input and output
//! and, on CUDA, their forward launch (8 groups, one per warp, per block of 256 threads; an f32
//! or bf16 output written in full).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;

/// `w` must be an f32 `[out, in]` weight whose rows split into groups of `group` inputs; else an
/// error naming `op`, the weight and the group.
pub(crate) fn check_weight(w: &Tensor, group: usize, op: &str) -> Result<()> {
    let (_, inp) = w.dims2()?;
    if group == 0 || inp % group != 0 || w.dtype() != DType::F32 {
        candle_core::bail!(
            "{op}: weight {:?} {:?} with groups of {group}: expected f32 and a group dividing {inp}",
            w.dims(),
            w.dtype()
        );
    }
    Ok(())
}

/// Whether a group op's kernel runs for `w`: an f32 `[out, in]` weight on CUDA in a `cuda`
/// build, with the switch `var` (read once into `cell`) not `0`; the CPU keeps the composed ops.
pub(crate) fn kernel_on(cell: &'static OnceLock<bool>, var: &str, w: &Tensor) -> bool {
    w.dtype() == DType::F32
        && w.rank() == 2
        && qat_model::kernel_switch::cuda_kernel_on(cell, var, w)
}

/// The f32 elements of the contiguous CPU operand `what` of `op`; else an error naming both.
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let (a, b) = qat_model::custom_op::contiguous_range(l, op, what)?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        other => candle_core::bail!("{op}: {what} of dtype {:?}, expected F32", other.dtype()),
    }
}

/// A group op's CPU forward over the weight `(s, l)` (f32, contiguous): `values(group, out)`
/// appends each group's fake-quantized values to `out`; the result in f32, or rounded to bf16
/// with `to_bf16` (the bits of the f32 values' cast).
pub(crate) fn cpu_forward(
    (s, l): (&CpuStorage, &Layout),
    op: &str,
    group: usize,
    to_bf16: bool,
    mut values: impl FnMut(&[f32], &mut Vec<f32>),
) -> Result<(CpuStorage, Shape)> {
    let x = cpu_f32(s, l, op, "weight")?;
    let mut out = Vec::with_capacity(x.len());
    for xs in x.chunks(group) {
        values(xs, &mut out);
    }
    let out = if to_bf16 {
        CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
    } else {
        CpuStorage::F32(out)
    };
    Ok((out, l.shape().clone()))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result};
    use qat_model::custom_op::contiguous_range;

    /// The grid of `groups` groups: 8 per block of 256 threads (ASYM_BLOCK, NF_BLOCK).
    pub(crate) fn config(groups: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (groups.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Launches `{kernel}_f32`, or `{kernel}_f32_bf16` with `to_bf16`, of
    /// `(x, out, groups, group, param)` over the f32 weight `x` (contiguous; groups of `group`
    /// elements) from `(module, ptx)`, and returns its fresh output of x's length; `op` names
    /// the caller in errors.
    pub(crate) fn forward<P: DeviceRepr>(
        op: &str,
        (module, ptx): (&str, &'static str),
        kernel: &str,
        (s, l): (&CudaStorage, &Layout),
        group: usize,
        to_bf16: bool,
        param: P,
    ) -> Result<CudaStorage> {
        let (a, b) = contiguous_range(l, op, "weight")?;
        let dev = s.device().clone();
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        let n = b - a;
        let (groups, group32) = ((n / group) as u64, group as u32);
        let name = if to_bf16 {
            format!("{kernel}_f32_bf16")
        } else {
            format!("{kernel}_f32")
        };
        let func = dev.get_or_load_custom_func(&name, module, ptx)?;
        // SAFETY (both allocations): the kernel writes every element.
        let (out_bf16, out_f32) = if to_bf16 {
            (Some(unsafe { dev.alloc::<half::bf16>(n)? }), None)
        } else {
            (None, Some(unsafe { dev.alloc::<f32>(n)? }))
        };
        let mut builder = func.builder();
        builder.arg(&x);
        if let Some(out) = &out_bf16 {
            builder.arg(out);
        }
        if let Some(out) = &out_f32 {
            builder.arg(out);
        }
        builder.arg(&groups).arg(&group32).arg(&param);
        // SAFETY: x and the output hold n = groups · group elements; the kernel touches no others.
        unsafe { builder.launch(config(groups as usize)) }.w()?;
        Ok(match (out_bf16, out_f32) {
            (Some(out), _) => CudaStorage::wrap_cuda_slice(out, dev),
            (_, Some(out)) => CudaStorage::wrap_cuda_slice(out, dev),
            _ => unreachable!("one output"),
        })
    }
}
