//! The environment switches of qat's CUDA kernels (`QAT_CUDA_FUSED_*=0` turns one off) and the
//! tensors the training kernels take.

use candle_core::{DType, Tensor};
use std::sync::OnceLock;

/// Whether the switch `var` is on: unset, or set to anything but `0`. Read once per process
/// into `cell` (each switch has its own static).
pub fn switch_on(cell: &'static OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).map_or(true, |v| v != "0"))
}

/// Whether `x` can go to a CUDA kernel behind the switch `var` (with its `cell`): a `cuda` build,
/// the switch on, and `x` a CUDA tensor of one of [`FLOAT_DTYPES`] (what every kernel takes).
pub fn cuda_kernel_on(cell: &'static OnceLock<bool>, var: &str, x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && FLOAT_DTYPES.contains(&x.dtype())
        && switch_on(cell, var)
}

/// f32 and the 16-bit float types: what the element-wise and row-wise kernels take.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// The suffix of a kernel's name for elements of `dtype`, one of [`FLOAT_DTYPES`] (`f32`,
/// `bf16`, `f16`: each kernel file instantiates its kernels so); `op` names the caller in the
/// error for any other dtype.
pub fn float_kernel_suffix(dtype: DType, op: &str) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("{op} on cuda: dtype {other:?}, expected f32, bf16 or f16"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_suffixes_name_the_float_dtypes() {
        let names: Vec<&str> = FLOAT_DTYPES
            .iter()
            .map(|&d| float_kernel_suffix(d, "op").unwrap())
            .collect();
        assert_eq!(names, ["f32", "bf16", "f16"]);
        let err = float_kernel_suffix(DType::U8, "rms_norm")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rms_norm on cuda: dtype U8, expected f32, bf16 or f16"),
            "{err}"
        );
    }
}
