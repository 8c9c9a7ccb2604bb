//! Compiles and runs a CUDA emulation harness (a `*_main.cpp` that includes a `.cu` kernel file and
//! cuda_emulation.h) with the host C++ compiler, for the `*_emulated` tests of qat-model,
//! qat-quant and qat-train, which include this file with `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `main_cpp` (relative to the calling crate's root) into `dir` and returns the
/// executable's path. The flags keep the host arithmetic IEEE (no contraction into FMA), as the
/// kernels' `__*_rn` intrinsics and the CPU references assume. The compiler is `CXX` (default
/// `c++`, C++20); a failure panics with the compiler's output.
pub fn build_harness(crate_root: &Path, main_cpp: &str, dir: &Path) -> PathBuf {
    let main_cpp = crate_root.join(main_cpp);
    let stem = main_cpp
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("harness")
        .to_string();
    let exe = dir.join(stem);
    // This directory (cuda_emulation.h, harness_io.h), from any crate in crates/.
    let include = crate_root.join("../model/kernels/emulation");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-fno-strict-aliasing",
            "-ffp-contract=off",
            "-pthread",
            "-Wno-unknown-pragmas",
        ])
        .arg("-I")
        .arg(&include)
        .arg(&main_cpp)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(
        out.status.success(),
        "{cxx} failed on the emulation harness {}:\n{}",
        main_cpp.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs `exe IN OUT` with `input` as IN (in `dir`) and returns OUT's bytes; panics with the exit
/// status if the harness fails.
#[allow(dead_code)] // each test crate includes this file and uses what it needs
pub fn run_harness(exe: &Path, dir: &Path, input: &[u8]) -> Vec<u8> {
    let (in_path, out_path) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&in_path, input).expect("write the harness input");
    let status = Command::new(exe)
        .arg(&in_path)
        .arg(&out_path)
        .status()
        .expect("run the harness");
    assert!(status.success(), "the emulation harness failed ({status})");
    std::fs::read(&out_path).expect("read the harness output")
}

/// Little-endian f32 values of `bytes`.
#[allow(dead_code)]
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `n` pseudo-random values in [−scale/2, scale/2) from a 64-bit LCG started at `seed`.
#[allow(dead_code)]
pub fn lcg_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}
