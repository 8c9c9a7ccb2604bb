//! With the `cuda` feature: compiles kernels/sample_rows.cu to PTX (scripts/nvcc_ptx.rs).

#[path = "../../scripts/nvcc_ptx.rs"]
mod nvcc_ptx;

fn main() {
    println!("cargo:rerun-if-changed=../model/kernels/float_io.cuh");
    println!("cargo:rerun-if-changed=../model/kernels/block_reduce.cuh");
    nvcc_ptx::compile_ptx("kernels/sample_rows.cu", "sample_rows.ptx");
}
