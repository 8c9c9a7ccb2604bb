//! The environment switches of qat's CUDA kernels (`QAT_CUDA_FUSED_*=0` turns one off) and the
//! tensors the training kernels take.

use candle_core::{DType, Tensor};
use std::sync::OnceLock;

/// Whether the switch `var` is on: unset, or set to anything but `0`. Read once per process
/// into `cell` (each switch has its own static).
pub fn switch_on(cell: &'static OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).map_or(true, |v| v != "0"))
}

/// Whether `x` can go to a CUDA training kernel behind the switch `var` (with its `cell`): a
/// `cuda` build, the switch on, and `x` a CUDA tensor of one of `dtypes`.
pub fn cuda_kernel_on(
    cell: &'static OnceLock<bool>,
    var: &str,
    x: &Tensor,
    dtypes: &[DType],
) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && dtypes.contains(&x.dtype())
        && switch_on(cell, var)
}

/// f32 and the 16-bit float types: what the element-wise and row-wise kernels take.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
