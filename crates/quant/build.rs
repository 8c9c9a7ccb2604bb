//! With the `cuda` feature: compiles kernels/fake_quant.cu to PTX with nvcc (found through
//! CUDA_HOME or PATH), for the compute capability in CUDA_COMPUTE_CAP (default 90, the H100),
//! as candle-kernels does. Without the feature: nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/fake_quant.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fake_quant.ptx");
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
        .arg("kernels/fake_quant.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (set CUDA_HOME or PATH; see README, CUDA): {e}",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on kernels/fake_quant.cu ({status})"
    );
}
