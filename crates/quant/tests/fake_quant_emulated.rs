//! The CUDA fake-quant kernel (kernels/fake_quant.cu) run on the CPU through the CUDA emulation
//! in crates/model/kernels/emulation, bit for bit against the CPU kernel
//! (`fused::sym_fake_quant_rows`): f32 and bf16 rows, bits 2..8, exact and f16-rounded scales,
//! rows shorter and longer than a block, an all-zero row, ties, scales that saturate at the f16
//! maximum and scales that round to 0 in f16. Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor};
use qat_quant::fake::{sym_qmax, ScaleRounding};
use qat_quant::fused::{sym_fake_quant_rows, sym_fake_quant_rows_to};
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/fake_quant_main.cpp",
        dir,
    )
}

/// Rows of every kind the kernel has a branch or a rounding case for, for one `qmax`.
fn rows(cols: usize, qmax: u8) -> Vec<f32> {
    let mut state = 11u64;
    let mut random = |scale: f32| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
    };
    let mut v = Vec::new();
    v.extend((0..cols).map(|_| random(6.0)));
    v.extend(std::iter::repeat_n(0.0, cols)); // all zeros: scale 0
                                              // Ties: scale 0.25 (max = qmax · 0.25), every other x / scale a half-integer.
    let q = f32::from(qmax);
    v.push(q * 0.25);
    v.extend((1..cols).map(|j| ((j % (2 * qmax as usize)) as f32 - q + 0.5) * 0.25));
    v.extend((0..cols).map(|_| random(4e7))); // scale above the f16 maximum: saturates
    v.extend((0..cols).map(|_| random(1e-9))); // scale below f16's range: rounds to 0
    v.extend((0..cols).map(|_| random(3e-5))); // f16-subnormal scales
    v
}

fn emulate(
    exe: &Path,
    dir: &Path,
    x: &[f32],
    shape: (usize, usize),
    dtype: u32, // 0 f32, 1 bf16, 2 f32 in and bf16 out
    qmax: u8,
    f16: bool,
) -> Vec<f32> {
    let mut input = Vec::new();
    for v in [shape.0 as u32, shape.1 as u32, dtype] {
        input.extend(v.to_le_bytes());
    }
    input.extend(f32::from(qmax).to_le_bytes());
    input.extend(i32::from(f16).to_le_bytes());
    for v in x {
        input.extend(v.to_le_bytes());
    }
    emulation_harness::f32s(&emulation_harness::run_harness(exe, dir, &input))
}

fn bits_of(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn emulated_cuda_kernel_equals_the_cpu_kernel_bit_for_bit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    for cols in [5, 300, 1000] {
        for bits in 2..=8u8 {
            let qmax = sym_qmax(bits).expect("bits");
            let x = rows(cols, qmax);
            let shape = (x.len() / cols, cols);
            let xf = Tensor::from_vec(x.clone(), shape, &Device::Cpu)?;
            // bf16 inputs: the kernel widens them to f32, computes, rounds the output to bf16.
            let xb = xf.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            for rounding in [ScaleRounding::Exact, ScaleRounding::F16] {
                let f16 = rounding == ScaleRounding::F16;
                let cpu = sym_fake_quant_rows(&xf, qmax, rounding)?;
                let cpu = cpu.flatten_all()?.to_vec1::<f32>()?;
                let got = emulate(&exe, dir.path(), &x, shape, 0, qmax, f16);
                assert_eq!(
                    bits_of(&got),
                    bits_of(&cpu),
                    "f32, {cols} cols, bits {bits}, {rounding:?}"
                );
                // f32 in, bf16 out: the f32 kernel's values, then the cast (the fused path of
                // f32 master weights and bf16 compute), also through the CPU op's bf16 output.
                let cast =
                    Tensor::from_vec(cpu.clone(), shape, &Device::Cpu)?.to_dtype(DType::BF16)?;
                let fused = sym_fake_quant_rows_to(&xf, qmax, rounding, DType::BF16)?;
                assert_eq!(fused.dtype(), DType::BF16);
                let cast = cast.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let fused = fused
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                assert_eq!(
                    bits_of(&fused),
                    bits_of(&cast),
                    "cpu f32 -> bf16, {cols} cols"
                );
                let got = emulate(&exe, dir.path(), &x, shape, 2, qmax, f16);
                assert_eq!(
                    bits_of(&got),
                    bits_of(&cast),
                    "f32 -> bf16, {cols} cols, bits {bits}, {rounding:?}"
                );

                let cpu = sym_fake_quant_rows(&xb, qmax, rounding)?
                    .to_dtype(DType::BF16)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let xb = xb.flatten_all()?.to_vec1::<f32>()?;
                let got = emulate(&exe, dir.path(), &xb, shape, 1, qmax, f16);
                assert_eq!(
                    bits_of(&got),
                    bits_of(&cpu),
                    "bf16, {cols} cols, bits {bits}, {rounding:?}"
                );
            }
        }
    }
    Ok(())
}
