//! Shared by the build scripts of crates with CUDA kernels (`#[path] mod`): compiles one `.cu`
//! file to PTX in OUT_DIR with nvcc (found through CUDA_HOME or PATH), for the compute
//! capability in CUDA_COMPUTE_CAP (default 90, the H100), as candle-kernels does. Only with the
//! crate's `cuda` feature; without it, nothing.

/// Compiles `source` (relative to the crate) to `OUT_DIR/<ptx_name>` when the `cuda` feature is on.
pub fn compile_ptx(source: &str, ptx_name: &str) {
    use std::path::PathBuf;
    use std::process::Command;
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=../../scripts/nvcc_ptx.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join(ptx_name);
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) if PathBuf::from(&home).join("bin/nvcc").is_file() => {
            PathBuf::from(home).join("bin/nvcc")
        }
        _ => PathBuf::from("nvcc"),
    };
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&out)
        .arg(source)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (set CUDA_HOME or PATH; see README, CUDA): {e}",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {source} ({status})");
}
