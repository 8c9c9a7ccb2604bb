//! With the `cuda` feature: compiles the flash-attention kernels (kernels/flash_attention.cu,
//! kernels/flash_attention_backward.cu), the token NLL kernel (kernels/token_nll.cu) and the
//! training kernels with a backward (kernels/rms_norm.cu, kernels/swiglu.cu, kernels/rope.cu,
//! kernels/causal_softmax.cu) to PTX (scripts/nvcc_ptx.rs).
//! Without the feature: nothing.

#[path = "../../scripts/nvcc_ptx.rs"]
mod nvcc_ptx;

fn main() {
    println!("cargo:rerun-if-changed=kernels/flash_common.cuh");
    println!("cargo:rerun-if-changed=kernels/logsumexp.cuh");
    println!("cargo:rerun-if-changed=kernels/float_io.cuh");
    println!("cargo:rerun-if-changed=kernels/block_reduce.cuh");
    nvcc_ptx::compile_ptx("kernels/flash_attention.cu", "flash_attention.ptx");
    nvcc_ptx::compile_ptx(
        "kernels/flash_attention_backward.cu",
        "flash_attention_backward.ptx",
    );
    nvcc_ptx::compile_ptx("kernels/token_nll.cu", "token_nll.ptx");
    nvcc_ptx::compile_ptx("kernels/rms_norm.cu", "rms_norm.ptx");
    nvcc_ptx::compile_ptx("kernels/swiglu.cu", "swiglu.ptx");
    nvcc_ptx::compile_ptx("kernels/rope.cu", "rope.ptx");
    nvcc_ptx::compile_ptx("kernels/causal_softmax.cu", "causal_softmax.ptx");
}
