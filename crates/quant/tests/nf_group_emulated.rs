//! The CUDA NF3/NF4 kernel (kernels/nf_group.cu) run on the CPU through the CUDA emulation in
//! crates/model/kernels/emulation, bit for bit against the CPU op (`qat_quant::fused_nf`, itself
//! tested against the composed path): f32 and bf16 outputs, groups of 32, 64 and a whole row of
//! 600 (no multiple of 32), a last block with fewer groups than warps, every threshold and level
//! hit exactly (scale 1), zeros of both signs and an all-zero group. Needs a C++20 compiler
//! (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor};
use qat_quant::fused_nf::fake_nf_group;
use qat_quant::{NfGrid, NF3_LEVELS, NF3_THRESHOLDS, NF4_LEVELS, NF4_THRESHOLDS};
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/nf_group_main.cpp",
        dir,
    )
}

/// Random weights of several magnitudes per row; the first 64 values (two groups of 32 with
/// max 1 and min -1, so scale 1) hold every threshold and level; then an all-zero group.
fn weights(rows: usize, cols: usize) -> Vec<f32> {
    let mut v = emulation_harness::lcg_values(rows * cols, 3, 2.0);
    for (i, x) in v.iter_mut().enumerate() {
        *x *= [0.01, 1.0, 30.0][(i / cols) % 3];
    }
    let special: Vec<f32> = [1.0, -1.0, 0.0, -0.0]
        .into_iter()
        .chain(NF3_THRESHOLDS)
        .chain(NF4_THRESHOLDS)
        .chain([1.0, -1.0])
        .chain(NF3_LEVELS)
        .chain(NF4_LEVELS)
        .collect();
    v[..special.len()].copy_from_slice(&special);
    v[64..96].fill(0.0);
    v
}

#[test]
fn emulated_cuda_kernel_matches_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    for (rows, cols, group) in [(5usize, 256usize, 32usize), (5, 256, 64), (3, 600, 600)] {
        let x = weights(rows, cols);
        let w = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu)?;
        for grid in [NfGrid::Nf3, NfGrid::Nf4] {
            for to_bf16 in [false, true] {
                let want = fake_nf_group(&w, grid, group, to_bf16)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mut bytes = Vec::new();
                bytes.extend((x.len() as u64).to_le_bytes());
                for v in [
                    group as u32,
                    u32::from(grid == NfGrid::Nf3),
                    u32::from(to_bf16),
                ] {
                    bytes.extend(v.to_le_bytes());
                }
                x.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
                let got = emulation_harness::f32s(&emulation_harness::run_harness(
                    &exe,
                    dir.path(),
                    &bytes,
                ));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{grid:?}, group {group}, bf16 {to_bf16}"
                );
            }
        }
    }
    Ok(())
}
