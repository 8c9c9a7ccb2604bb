//! With the `cuda` feature: compiles kernels/adamw.cu, kernels/bucket_lse.cu, kernels/grad_sum.cu and
//! kernels/sum_squares.cu to PTX (scripts/nvcc_ptx.rs).

#[path = "../../scripts/nvcc_ptx.rs"]
mod nvcc_ptx;

fn main() {
    println!("cargo:rerun-if-changed=../model/kernels/logsumexp.cuh");
    println!("cargo:rerun-if-changed=../model/kernels/float_io.cuh");
    println!("cargo:rerun-if-changed=../model/kernels/block_reduce.cuh");
    nvcc_ptx::compile_ptx("kernels/adamw.cu", "adamw.ptx");
    nvcc_ptx::compile_ptx("kernels/bucket_lse.cu", "bucket_lse.ptx");
    nvcc_ptx::compile_ptx("kernels/grad_sum.cu", "grad_sum.ptx");
    nvcc_ptx::compile_ptx("kernels/sum_squares.cu", "sum_squares.ptx");
}
