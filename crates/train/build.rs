//! With the `cuda` feature: compiles kernels/adamw.cu to PTX (scripts/nvcc_ptx.rs).
//! Without the feature: nothing.

#[path = "../../scripts/nvcc_ptx.rs"]
mod nvcc_ptx;

fn main() {
    nvcc_ptx::compile_ptx("kernels/adamw.cu", "adamw.ptx");
}
