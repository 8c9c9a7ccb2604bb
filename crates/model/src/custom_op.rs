//! What qat's custom candle ops share: the element ranges of their contiguous operands; float
//! CPU storages as f64 vectors and back, the arithmetic of the CPU paths of the training ops ([`crate::norm`], [`crate::swiglu`], [`crate::rope`], and qat-train's bucket log-sum-exp)
//! that their CUDA kernels are tested against; the float views their CUDA launchers pass; and
//! the difference measure of those tests.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// The element range of `l`, which the op `op` needs contiguous; else the error
/// "`op`: `what` must be contiguous".
pub fn contiguous_range(l: &Layout, op: &str, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")).bt())
}

/// How far a layout reaches into its storage from its start offset: one past its last element
/// (0 when it has none), whatever its strides. What a kernel reading the layout in place must
/// find in the storage.
pub fn span(l: &Layout) -> usize {
    if l.shape().elem_count() == 0 {
        return 0;
    }
    1 + l
        .dims()
        .iter()
        .zip(l.stride())
        .map(|(&n, &st)| (n - 1) * st)
        .sum::<usize>()
}

/// The storage index of every element of `l`, in row-major order of its dims, whatever its
/// strides: how the CPU sides of in-place ops read and write strided views.
pub fn element_offsets(l: &Layout) -> Vec<usize> {
    let mut out = vec![l.start_offset()];
    for (&n, &st) in l.dims().iter().zip(l.stride()) {
        out = out
            .iter()
            .flat_map(|&base| (0..n).map(move |i| base + i * st))
            .collect();
    }
    out
}

/// The elements of a contiguous float storage, as f64; `op` names the op in errors.
pub fn storage_to_f64(s: &CpuStorage, l: &Layout, op: &str) -> Result<Vec<f64>> {
    let (a, b) = contiguous_range(l, op, "operands")?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].iter().map(|&x| f64::from(x)).collect(),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        other => candle_core::bail!("{op}: dtype {:?}, expected a float type", other.dtype()),
    })
}

/// `v` rounded to `dtype` (nearest, ties to even) and back: what a cast to a narrower float
/// dtype does to a value the CPU reference ops compute in f64 (the identity for f64 and any
/// non-float dtype).
pub fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::F32 => f64::from(v as f32),
        _ => v,
    }
}

/// `v` as a storage of `dtype` (rounded to nearest; f32 for any non-float dtype).
pub fn storage_from_f64(dtype: DType, v: Vec<f64>) -> CpuStorage {
    match dtype {
        DType::F64 => CpuStorage::F64(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f64).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f64).collect()),
        _ => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
    }
}

/// The elements `start..end` of a CUDA storage of f32, bf16 or f16, as one kernel argument of
/// its own element type (for kernels built for each of the three).
#[cfg(feature = "cuda")]
pub enum FloatView<'a> {
    F32(candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>),
    BF16(candle_core::cuda_backend::cudarc::driver::CudaView<'a, half::bf16>),
    F16(candle_core::cuda_backend::cudarc::driver::CudaView<'a, half::f16>),
}

#[cfg(feature = "cuda")]
impl<'a> FloatView<'a> {
    /// `storage[start..end]`; `op` names the caller in the error for another dtype.
    pub fn of(
        storage: &'a candle_core::CudaStorage,
        (start, end): (usize, usize),
        op: &str,
    ) -> Result<Self> {
        Ok(match storage.dtype() {
            DType::F32 => Self::F32(storage.as_cuda_slice::<f32>()?.slice(start..end)),
            DType::BF16 => Self::BF16(storage.as_cuda_slice::<half::bf16>()?.slice(start..end)),
            DType::F16 => Self::F16(storage.as_cuda_slice::<half::f16>()?.slice(start..end)),
            other => candle_core::bail!("{op} on cuda: dtype {other:?}, expected f32, bf16 or f16"),
        })
    }

    /// Pushes the view as the next argument of a kernel launch.
    pub fn push<'b>(
        &'b self,
        args: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'b>,
    ) {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        match self {
            Self::F32(v) => args.arg(v),
            Self::BF16(v) => args.arg(v),
            Self::F16(v) => args.arg(v),
        };
    }
}

/// The bit patterns of an f32 tensor's elements (any device, any shape, row-major): how tests
/// compare two computations bit for bit.
pub fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

/// A CPU f64 tensor of `dims` with values uniform in `[lo, hi)` from a 64-bit LCG started at
/// `seed` (53-bit draws): the ops' tests' reproducible inputs.
pub fn lcg_tensor(dims: &[usize], seed: u64, lo: f64, hi: f64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut state = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (state >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
        })
        .collect();
    Tensor::from_vec(v, dims, &candle_core::Device::Cpu)
}

/// The largest `|a − b|` over all elements, in f64: how the ops' tests compare an op with its
/// reference (composed ops, or the CPU path against a CUDA kernel).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Hand-worked spans: a contiguous tensor, a narrowed cache view with spare columns, a
    /// transposed view, and an empty one.
    #[test]
    fn span_reaches_one_past_the_last_element() -> Result<()> {
        let buf = Tensor::zeros((2, 3, 10, 4), DType::F32, &Device::Cpu)?;
        assert_eq!(span(buf.layout()), 240);
        // Columns 0..6 of 10: the last element is (1, 2, 5, 3) = 120 + 80 + 20 + 3.
        assert_eq!(span(buf.narrow(2, 0, 6)?.layout()), 224);
        // A transpose reaches as far as the tensor it views.
        assert_eq!(span(buf.transpose(1, 2)?.layout()), 240);
        assert_eq!(span(buf.narrow(2, 0, 0)?.layout()), 0);
        Ok(())
    }

    /// Hand-worked offsets of a transposed, narrowed view.
    #[test]
    fn element_offsets_follow_the_strides() -> Result<()> {
        let buf = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        assert_eq!(element_offsets(buf.layout()), [0, 1, 2, 3, 4, 5]);
        assert_eq!(element_offsets(buf.t()?.layout()), [0, 3, 1, 4, 2, 5]);
        assert_eq!(element_offsets(buf.narrow(1, 1, 2)?.layout()), [1, 2, 4, 5]);
        Ok(())
    }
}
