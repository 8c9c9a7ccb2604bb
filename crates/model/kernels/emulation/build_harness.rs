//! Compiles a CUDA emulation harness (a `*_main.cpp` that includes a `.cu` kernel file and
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
