//! What the one-warp-per-group fake-quantization ops share ([`crate::fused_asym`],
//! [`crate::fused_nf`]): their weight check and, on CUDA, their forward launch (8 groups, one
//! per warp, per block of 256 threads; an f32 or bf16 output written in full).

use candle_core::{DType, Result, Tensor};

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
