//! Parsing of `--device` values (`cpu` or `cuda:N`; CUDA needs the `cuda` feature) and `--dtype` values.

use candle_core::{DType, Device, DeviceLocation};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("invalid device {spec:?}: expected cpu, cuda or cuda:N"))?,
        None => {
            return Err(format!(
                "invalid device {spec:?}: expected cpu, cuda or cuda:N"
            ))
        }
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!("device {spec:?}: this build has no CUDA support (rebuild with `--features cuda`, see README)"));
    }
    let dev = Device::new_cuda(ordinal).map_err(|e| format!("device {spec:?}: {e}"))?;
    tune_cuda_allocations(&dev);
    Ok(dev)
}

/// Allocation settings for a CUDA device used as qat uses it: candle queues each thread's work on
/// that thread's per-thread stream, qat creates no other stream, and where it runs a device's
/// work on several threads (`qat-distill --data-parallel` on CUDA) it synchronizes each before
/// another reads its results. Neither setting changes a value; each has a switch that restores
/// the default.
///
/// * **No per-allocation events** (`QAT_CUDA_SKIP_ALLOC_EVENTS=0` keeps them). cudarc creates
///   two CUDA events for every buffer it allocates, hence for every tensor candle makes, and
///   destroys them when the buffer is freed: four driver calls per tensor, hundreds per decoding
///   step. It records and waits on them only once a context has a second stream, which never
///   happens here, so they are pure host time.
/// * **Freed memory kept in the pool** (`QAT_CUDA_KEEP_FREED_MEMORY=0`: CUDA's default).
///   Buffers come from CUDA's stream-ordered pool, whose default release threshold (0) hands
///   all unused memory back to the driver at every synchronization (each training step's loss,
///   each evaluation batch's NLL, each decoding step's tokens) and maps it again for the next
///   step's buffers. The pool now keeps up to half the device's memory across synchronizations
///   (PyTorch's caching allocator keeps all of it); beyond that it still trims at each one, so a
///   run that needs nearly all the memory behaves as before.
///
/// Best effort: a setting that fails stays at its default, with one line on stderr.
pub fn tune_cuda_allocations(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        use crate::kernel_switch::switch_on;
        use std::sync::OnceLock;
        static EVENTS: OnceLock<bool> = OnceLock::new();
        static KEEP: OnceLock<bool> = OnceLock::new();
        if switch_on(&EVENTS, "QAT_CUDA_SKIP_ALLOC_EVENTS") {
            // SAFETY: cudarc records and waits on these events only once the context has a
            // stream of its own making (`is_managing_stream_synchronization`), which qat never
            // creates, so they were never used; buffers made before keep theirs, still unused.
            unsafe { cuda.disable_event_tracking() };
        }
        if switch_on(&KEEP, "QAT_CUDA_KEEP_FREED_MEMORY") {
            if let Err(e) = cuda::keep_freed_memory(dev) {
                eprintln!("qat: CUDA memory pool left at its default release threshold: {e}");
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = dev;
}

/// The bytes the CUDA memory pool of `dev` keeps across synchronizations (its release
/// threshold), as [`tune_cuda_allocations`] sets it: half the device's memory.
#[cfg(feature = "cuda")]
pub fn pool_release_threshold(dev: &Device) -> Result<u64, String> {
    cuda::release_threshold(dev)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::{Device, DeviceLocation};

    const RELEASE_THRESHOLD: sys::CUmemPool_attribute_enum =
        sys::CUmemPool_attribute_enum::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;

    /// The current memory pool of `dev` (the one cuMemAllocAsync draws from) and the device's
    /// total memory in bytes.
    fn pool(dev: &Device) -> Result<(sys::CUmemoryPool, u64), String> {
        let DeviceLocation::Cuda { gpu_id } = dev.location() else {
            return Err(format!("{:?} is not a CUDA device", dev.location()));
        };
        let cu_dev = result::device::get(gpu_id as i32).map_err(|e| e.to_string())?;
        // SAFETY: cu_dev comes from cuDeviceGet.
        unsafe {
            let total = result::device::total_mem(cu_dev).map_err(|e| e.to_string())?;
            let pool = result::device::get_mem_pool(cu_dev).map_err(|e| e.to_string())?;
            Ok((pool, total as u64))
        }
    }

    pub(super) fn keep_freed_memory(dev: &Device) -> Result<(), String> {
        let (pool, total) = pool(dev)?;
        let mut keep: u64 = total / 2;
        // SAFETY: the release threshold's value is a cuuint64_t.
        unsafe {
            result::mem_pool::set_attribute(pool, RELEASE_THRESHOLD, (&mut keep as *mut u64).cast())
        }
        .map_err(|e| e.to_string())
    }

    pub(super) fn release_threshold(dev: &Device) -> Result<u64, String> {
        let (pool, _) = pool(dev)?;
        let mut value: u64 = 0;
        // SAFETY: as in keep_freed_memory.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                RELEASE_THRESHOLD,
                (&mut value as *mut u64).cast(),
            )
        }
        .map_err(|e| e.to_string())?;
        Ok(value)
    }
}

/// The canonical name of a device, `cpu` or `cuda:N`: what outputs record and checkpoints are
/// keyed by, so that `--device cuda` and `--device cuda:0` are the same device.
pub fn device_name(dev: &Device) -> String {
    match dev.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses `--dtype` values: the dtype the forward pass computes in. `f32` (default everywhere),
/// `bf16` or `f16`. CPU runs support all three but are only fast in f32.
pub fn parse_dtype(spec: &str) -> Result<DType, String> {
    match spec.trim() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        other => Err(format!(
            "invalid dtype {other:?}: expected f32, bf16 or f16"
        )),
    }
}

/// The name [`parse_dtype`] accepts for `dtype` (recorded in shards and provenance).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_round_trip_through_their_names() {
        for d in [DType::F32, DType::BF16, DType::F16] {
            assert_eq!(parse_dtype(dtype_name(d)), Ok(d));
        }
        assert!(parse_dtype("int8")
            .unwrap_err()
            .contains("expected f32, bf16 or f16"));
    }

    #[test]
    fn cpu_parses_and_cuda_needs_the_feature() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(device_name(&parse_device(" cpu ").unwrap()), "cpu");
        assert!(parse_device("gpu").is_err());
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("cuda:0")
                .unwrap_err()
                .contains("--features cuda"));
        } else if Device::new_cuda(0).is_ok() {
            // A `--features cuda` build on a machine with a GPU.
            for spec in ["cuda", "cuda:0"] {
                assert_eq!(device_name(&parse_device(spec).unwrap()), "cuda:0");
            }
        }
    }

    /// On a GPU (a `cuda` build; skipped elsewhere): the device the tools open allocates without
    /// cudarc's events, its pool keeps freed memory (a release threshold of half the device's
    /// memory, at least 1 GiB on any GPU qat targets, where CUDA's default is 0), and it computes
    /// as before: rounds of allocating, freeing and synchronizing give the CPU's values.
    #[test]
    fn cuda_device_keeps_freed_memory_and_allocates_without_events() {
        #[cfg(feature = "cuda")]
        {
            let Some(gpu) = crate::testing::cuda_or_skip() else {
                return;
            };
            let Device::Cuda(cuda) = &gpu else {
                unreachable!("parse_device(\"cuda:0\") gives a CUDA device")
            };
            assert!(!cuda.is_event_tracking(), "cudarc still tracks allocations");
            let keep = pool_release_threshold(&gpu).expect("read the pool's release threshold");
            assert!(
                keep >= 1 << 30,
                "release threshold {keep} B, expected half the memory"
            );
            let cpu = &Device::Cpu;
            for round in 0..4u32 {
                let n = 64 << round; // a new size each round: the pool grows, then reuses
                let a = crate::custom_op::lcg_tensor(&[n, n], u64::from(round), -1.0, 1.0)
                    .and_then(|a| a.to_dtype(DType::F32))
                    .unwrap();
                let want = a.matmul(&a.t().unwrap()).unwrap().sum_all().unwrap();
                let got = a.to_device(&gpu).unwrap();
                let got = got.matmul(&got.t().unwrap()).unwrap().sum_all().unwrap();
                let (want, got) = (
                    want.to_scalar::<f32>().unwrap(),
                    got.to_device(cpu).unwrap().to_scalar::<f32>().unwrap(),
                );
                assert!(
                    (want - got).abs() <= 1e-3 * want.abs().max(1.0),
                    "{n}: {got} vs {want}"
                );
            }
        }
    }
}
