//! The CUDA RMSNorm kernels with their backward (kernels/rms_norm.cu) run on the CPU through the
//! CUDA emulation in kernels/emulation, against the CPU op (`qat_model::norm`, f64 arithmetic)
//! in value and both gradients: f32, bf16 and f16, rows fewer than and more than a dw chunk,
//! widths below, at and above a block; and the inference kernel add_rms_norm against its CPU op
//! (`qat_model::residual_add`). Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_model::norm::rms_norm_with_grad;
use qat_model::residual_add::add_rms_norm;
use std::path::{Path, PathBuf};

#[path = "../kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/rms_norm_main.cpp",
        dir,
    )
}

/// `(y, dx, dw, sum, normed sum)` of the emulated kernels: the norm and its backward on x, and
/// add_rms_norm of x and delta.
fn run_emulated(
    exe: &Path,
    dir: &Path,
    (rows, n, code, eps): (usize, usize, u32, f32),
    [x, w, dy, delta]: [&[f32]; 4],
) -> [Vec<f32>; 5] {
    let mut bytes = Vec::new();
    for v in [rows as u32, n as u32, code] {
        bytes.extend(v.to_le_bytes());
    }
    bytes.extend(eps.to_le_bytes());
    x.iter()
        .chain(w)
        .chain(dy)
        .chain(delta)
        .for_each(|v| bytes.extend(v.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    let all: Vec<f32> = emulation_harness::f32s(&output);
    let el = rows * n;
    assert_eq!(all.len(), 4 * el + n, "output length");
    let at = |start: usize, len: usize| all[start..start + len].to_vec();
    [
        at(0, el),
        at(el, el),
        at(2 * el, n),
        at(2 * el + n, el),
        at(3 * el + n, el),
    ]
}

/// Largest |a - b| over the largest |b|.
fn rel(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (&a, &b)| m.max((f64::from(a) - b).abs()))
        / scale
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let eps = 1e-5f32;
    for (rows, n, seed) in [(3usize, 8usize, 1u64), (70, 256, 2), (130, 300, 3)] {
        for (code, dtype, tol) in [
            (0u32, DType::F32, 2e-6),
            (1, DType::BF16, 1e-2),
            (2, DType::F16, 2e-3),
        ] {
            // Inputs exact in the dtype.
            let exact = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
                Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
            };
            let x = exact(
                emulation_harness::lcg_values(rows * n, seed, 6.0),
                &[rows, n],
            )?;
            let w = exact(emulation_harness::lcg_values(n, seed + 1, 2.0), &[n])?;
            let dy = exact(
                emulation_harness::lcg_values(rows * n, seed + 2, 2.0),
                &[rows, n],
            )?;
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
            };
            let delta = exact(
                emulation_harness::lcg_values(rows * n, seed + 3, 4.0),
                &[rows, n],
            )?;
            let [y, dx, dw, sum, normed] = run_emulated(
                &exe,
                dir.path(),
                (rows, n, code, eps),
                [&flat(&x)?, &flat(&w)?, &flat(&dy)?, &flat(&delta)?],
            );
            // The CPU op in f64 on the same values (with the dtype's rounding of x / d for y).
            let xv = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
            let wv = Var::from_tensor(&w.to_dtype(DType::F64)?)?;
            let want_y = rms_norm_with_grad(&x, &w, f64::from(eps))?;
            let g = (rms_norm_with_grad(&xv, &wv, f64::from(eps))? * dy.to_dtype(DType::F64)?)?
                .sum_all()?
                .backward()?;
            let f64s = |t: &Tensor| -> Result<Vec<f64>> {
                t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
            };
            let (wy, wdx, wdw) = (
                f64s(&want_y)?,
                f64s(g.get(&xv).expect("dx"))?,
                f64s(g.get(&wv).expect("dw"))?,
            );
            let case = format!("{rows}x{n} {dtype:?}");
            assert!(rel(&y, &wy) <= tol, "{case} y: {}", rel(&y, &wy));
            // 16-bit y is rounded to the dtype twice, as the composed ops do (x / d, then · w):
            // it differs from the CPU op's only where f32 and f64 arithmetic round apart.
            if dtype != DType::F32 {
                let differ = y
                    .iter()
                    .zip(&wy)
                    .filter(|(&a, &b)| f64::from(a) != b)
                    .count();
                assert!(
                    differ * 100 <= y.len(),
                    "{case}: y differs in {differ} of {}",
                    y.len()
                );
            }
            assert!(rel(&dx, &wdx) <= tol, "{case} dx: {}", rel(&dx, &wdx));
            assert!(rel(&dw, &wdw) <= tol, "{case} dw: {}", rel(&dw, &wdw));

            // add_rms_norm: the sum exactly (one rounding of an exact f32 sum; the CPU op rounds
            // the f64 sum once, and the two agree for inputs of these magnitudes), the norm to
            // the dtype's rounding.
            let (want_sum, want_normed) = add_rms_norm(&x, &delta, &w, f64::from(eps))?;
            let (want_sum, want_normed) = (f64s(&want_sum)?, f64s(&want_normed)?);
            let sum_diff = rel(&sum, &want_sum);
            assert_eq!(sum_diff, 0.0, "{case} sum");
            let normed_diff = rel(&normed, &want_normed);
            assert!(normed_diff <= tol, "{case} add_rms_norm: {normed_diff}");
        }
    }
    Ok(())
}
