//! With the `cuda` feature: compiles kernels/fake_quant.cu, kernels/asym_group.cu and
//! kernels/nf_group.cu to PTX (scripts/nvcc_ptx.rs).
//! Without the feature: nothing.

#[path = "../../scripts/nvcc_ptx.rs"]
mod nvcc_ptx;

fn main() {
    println!("cargo:rerun-if-changed=../model/kernels/float_io.cuh");
    println!("cargo:rerun-if-changed=../model/kernels/block_reduce.cuh");
    nvcc_ptx::compile_ptx("kernels/fake_quant.cu", "fake_quant.ptx");
    nvcc_ptx::compile_ptx("kernels/asym_group.cu", "asym_group.ptx");
    nvcc_ptx::compile_ptx("kernels/nf_group.cu", "nf_group.ptx");
}
