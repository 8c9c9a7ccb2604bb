//! Parsing of `--device` values: `cpu` or `cuda:N` (CUDA needs the `cuda` feature).

use candle_core::Device;

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
        None => return Err(format!("invalid device {spec:?}: expected cpu, cuda or cuda:N")),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!("device {spec:?}: this build has no CUDA support (rebuild with `--features cuda`, see README)"));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("device {spec:?}: {e}"))
}
