//! The CUDA sum-of-squares kernels of the gradient norm (kernels/sum_squares.cu) run on the CPU
//! through the CUDA emulation in crates/model/kernels/emulation, against the CPU op
//! (`qat_train::sum_squares`, f64) and a hand-worked case: grids smaller than the data (the grid
//! stride), more partial sums than a block's threads, tensors shorter than a block, and only
//! the named slot of the output written. Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor};
use qat_train::sum_squares::sum_squares_into;
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/sum_squares_main.cpp",
        dir,
    )
}

/// The emulated kernels' output buffer; `bf16`: the gradient handed to the kernel in bf16 (the
/// values of `g` must be exact in it).
fn run_emulated(
    exe: &Path,
    dir: &Path,
    g: &[f32],
    (blocks, slot, slots): (u32, u32, u32),
    bf16: bool,
) -> Vec<f64> {
    let mut bytes = Vec::new();
    bytes.extend((g.len() as u64).to_le_bytes());
    for v in [blocks, slot, slots, u32::from(bf16)] {
        bytes.extend(v.to_le_bytes());
    }
    g.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    output
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    // Hand-worked: 3² + 4² + (−12)² = 169, in slot 1 of 3.
    for bf16 in [false, true] {
        let got = run_emulated(&exe, dir.path(), &[3.0, 4.0, -12.0], (1, 1, 3), bf16);
        assert_eq!(got, [-1.0, 169.0, -1.0]);
    }
    for (n, blocks) in [(5usize, 1u32), (10_000, 3), (70_001, 300)] {
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let g = Tensor::from_vec(g, n, &Device::Cpu)?;
        // f32, and bf16 (the CPU op given the bf16 tensor, the kernel its exact values).
        for g in [g.clone(), g.to_dtype(DType::BF16)?] {
            let bf16 = g.dtype() == DType::BF16;
            let out = Tensor::zeros(1, DType::F64, &Device::Cpu)?;
            sum_squares_into(&out, 0, &g)?;
            let want = out.to_vec1::<f64>()?[0];
            let values = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let got = run_emulated(&exe, dir.path(), &values, (blocks, 0, 1), bf16)[0];
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "n {n}, {blocks} blocks, bf16 {bf16}: {got} vs {want}"
            );
        }
    }
    Ok(())
}
