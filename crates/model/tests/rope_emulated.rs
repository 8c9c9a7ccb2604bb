//! The CUDA RoPE kernel (kernels/rope.cu) run on the CPU through the CUDA emulation in
//! kernels/emulation, forward (sign +1) and as its own backward (sign −1), against the CPU op
//! (`qat_model::rope::rope_with_grad`, f64 arithmetic) in value and gradient: f32, bf16 and f16,
//! per-row positions (left padding), grids smaller than the data (the grid stride) and larger;
//! and the copy kernel of decoding's values into the cache (`rope_into` without tables), bit
//! for bit.
//! Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_model::rope::rope_with_grad;
use qat_model::RotaryEmbedding;
use std::path::{Path, PathBuf};

#[path = "../kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/rope_main.cpp",
        dir,
    )
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn run_emulated(
    exe: &Path,
    dir: &Path,
    header: [u32; 7],
    sign: f32,
    data: [&[f32]; 3],
) -> Vec<f32> {
    let mut bytes = Vec::new();
    header.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
    bytes.extend(sign.to_le_bytes());
    data.iter()
        .flat_map(|x| x.iter())
        .for_each(|v| bytes.extend(v.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    emulation_harness::f32s(&output)
}

#[test]
fn emulated_cuda_kernel_matches_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let (b, h, t, d) = (2usize, 3usize, 7usize, 64usize);
    let positions = Tensor::new(
        &[[5u32, 6, 7, 8, 9, 10, 11], [0, 0, 0, 1, 2, 3, 4]],
        &Device::Cpu,
    )?;
    for (code, dtype, tol) in [
        (0u32, DType::F32, 1e-6),
        (1, DType::BF16, 8e-3),
        (2, DType::F16, 1e-3),
    ] {
        let rope = RotaryEmbedding::new(d, 64, 10_000.0, dtype, &Device::Cpu)?;
        let (cos, sin) = rope.tables(&positions)?;
        let x = (Tensor::arange(0f32, (b * h * t * d) as f32, &Device::Cpu)?
            .reshape((b, h, t, d))?
            .affine(0.37, 0.0)?
            .sin()?
            * 3.0)?
            .to_dtype(dtype)?;
        let dy = Tensor::arange(0f32, (b * h * t * d) as f32, &Device::Cpu)?
            .reshape((b, h, t, d))?
            .cos()?
            .to_dtype(dtype)?;
        let xv = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
        let (c64, s64) = (cos.to_dtype(DType::F64)?, sin.to_dtype(DType::F64)?);
        let y = rope_with_grad(&xv, &c64, &s64)?;
        let grads = (&y * dy.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let want_y: Vec<f64> = y.flatten_all()?.to_vec1()?;
        let want_dx: Vec<f64> = grads.get(&xv).expect("dx").flatten_all()?.to_vec1()?;
        // Layouts: head-major in and out; a token-major input (a transposed query view); a
        // token-major output (the backward's dx for such a view). The same values each time.
        for (blocks, layouts) in [(1u32, 0u32), (50, 0), (1, 1), (50, 2)] {
            let header = [
                b as u32, h as u32, t as u32, d as u32, code, blocks, layouts,
            ];
            let tables = [flat(&cos)?, flat(&sin)?];
            let got_y = run_emulated(
                &exe,
                dir.path(),
                header,
                1.0,
                [&flat(&x)?, &tables[0], &tables[1]],
            );
            let got_dx = run_emulated(
                &exe,
                dir.path(),
                header,
                -1.0,
                [&flat(&dy)?, &tables[0], &tables[1]],
            );
            // The copy kernel (decoding's values into the cache) copies x bit for bit.
            let n = want_y.len();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got_y[n..]),
                bits(&flat(&x)?),
                "{dtype:?} copy, layouts {layouts}"
            );
            for (name, got, want) in [("y", &got_y[..n], &want_y), ("dx", &got_dx[..n], &want_dx)] {
                for (i, (&a, &w)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (f64::from(a) - w).abs() <= tol * w.abs().max(1.0),
                        "{dtype:?} {blocks} blocks, layouts {layouts} {name}[{i}]: kernel {a}, cpu {w}"
                    );
                }
            }
        }
    }
    Ok(())
}
