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
    Device::new_cuda(ordinal).map_err(|e| format!("device {spec:?}: {e}"))
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
}
