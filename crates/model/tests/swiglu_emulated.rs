//! The CUDA SwiGLU kernels with their backward (kernels/swiglu.cu) run on the CPU through the
//! CUDA emulation in kernels/emulation, against the CPU op (`qat_model::swiglu`, f64
//! arithmetic) in value and both gradients: f32, bf16 and f16, grids smaller than the data (the
//! kernels' grid stride) and larger, gates from −30 to 30; and the inference kernel over a joined
//! gate/up output (`swiglu_joined`), which must give the separate inputs' bits. Needs a C++20
//! compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_model::swiglu::swiglu;
use std::path::{Path, PathBuf};

#[path = "../kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/swiglu_main.cpp",
        dir,
    )
}

fn run_emulated(
    exe: &Path,
    dir: &Path,
    (code, blocks, inter): (u32, u32, u32),
    inputs: [&[f32]; 3],
) -> Vec<f32> {
    let mut bytes = Vec::new();
    for v in [inputs[0].len() as u32, code, blocks, inter] {
        bytes.extend(v.to_le_bytes());
    }
    inputs
        .iter()
        .flat_map(|x| x.iter())
        .for_each(|v| bytes.extend(v.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    emulation_harness::f32s(&output)
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    for (n, blocks, inter) in [(1000usize, 2u32, 100usize), (700, 5, 70)] {
        for (code, dtype, tol) in [
            (0u32, DType::F32, 1e-6),
            (1, DType::BF16, 8e-3),
            (2, DType::F16, 1e-3),
        ] {
            let exact = |v: Vec<f32>| -> Result<Tensor> {
                Tensor::from_vec(v, n, &Device::Cpu)?.to_dtype(dtype)
            };
            let (g, u, dy) = (
                exact(emulation_harness::lcg_values(n, 1, 60.0))?,
                exact(emulation_harness::lcg_values(n, 2, 4.0))?,
                exact(emulation_harness::lcg_values(n, 3, 2.0))?,
            );
            let flat = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.to_vec1() };
            let got = run_emulated(
                &exe,
                dir.path(),
                (code, blocks, inter as u32),
                [&flat(&g)?, &flat(&u)?, &flat(&dy)?],
            );
            let gv = Var::from_tensor(&g.to_dtype(DType::F64)?)?;
            let uv = Var::from_tensor(&u.to_dtype(DType::F64)?)?;
            let y = swiglu(&gv, &uv)?;
            let grads = (&y * dy.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let want: Vec<f64> = [&y, grads.get(&gv).expect("dg"), grads.get(&uv).expect("du")]
                .iter()
                .map(|t| t.to_vec1::<f64>())
                .collect::<Result<Vec<_>>>()?
                .concat();
            assert_eq!(got.len(), want.len() + n);
            // The joined kernel: the separate kernel's bits.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got[3 * n..]),
                bits(&got[..n]),
                "joined, n {n} {dtype:?}"
            );
            for (part, name) in ["y", "d gate", "d up"].iter().enumerate() {
                let (a, b) = (
                    &got[part * n..(part + 1) * n],
                    &want[part * n..(part + 1) * n],
                );
                for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (f64::from(a) - b).abs() <= tol * b.abs().max(1e-3),
                        "n {n} {dtype:?} {name}[{i}]: kernel {a}, cpu {b}"
                    );
                }
            }
        }
    }
    Ok(())
}
