//! The CUDA `asym_group` kernels (kernels/asym_group.cu) run on the CPU through the CUDA emulation
//! in crates/model/kernels/emulation, against the CPU op (`qat_quant::fused_asym`, itself tested
//! against the composed path): forward values bit for bit (f32 and bf16 outputs), the min/max
//! gradient to f32 rounding (f32 and bf16 incoming gradients); 2, 3, 4 and 8 bits; groups of 32,
//! of 128 and a whole row of 600 (lanes striding over a length that is no multiple of 32); a last
//! block with fewer groups than warps; a constant group and ties. Needs a C++20 compiler (`CXX`,
//! default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_quant::asym_max_int;
use qat_quant::fused_asym::fake_asym_group;
use qat_quant::WeightGrad;
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/asym_group_main.cpp",
        dir,
    )
}

/// Weights of several magnitudes per row, a constant run and ties at 2-bit scale 1.
fn weights(rows: usize, cols: usize) -> Vec<f32> {
    let mut v = emulation_harness::lcg_values(rows * cols, 5, 2.0);
    for (i, x) in v.iter_mut().enumerate() {
        *x *= [0.01, 1.0, 30.0][(i / cols) % 3];
    }
    v[..32].fill(-0.25);
    for (i, x) in v[32..64].iter_mut().enumerate() {
        *x = [-2.5, 0.5, 0.5, -1.5, -0.5, 0.0, -1.0][i % 7];
    }
    v
}

fn run_emulated(
    exe: &Path,
    dir: &Path,
    (group, m, mode): (u32, u32, u32),
    x: &[f32],
    g: &[f32],
) -> Vec<f32> {
    let mut bytes = Vec::new();
    bytes.extend((x.len() as u64).to_le_bytes());
    for v in [group, m, mode] {
        bytes.extend(v.to_le_bytes());
    }
    x.iter()
        .chain(g)
        .for_each(|v| bytes.extend(v.to_le_bytes()));
    emulation_harness::f32s(&emulation_harness::run_harness(exe, dir, &bytes))
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    for (rows, cols, group) in [(5usize, 256usize, 32usize), (5, 256, 128), (3, 600, 600)] {
        let x = weights(rows, cols);
        let w = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu)?;
        let r = Tensor::from_vec(
            emulation_harness::lcg_values(rows * cols, 9, 1.0),
            (rows, cols),
            &Device::Cpu,
        )?;
        for bits in [2u8, 3, 4, 8] {
            let m = asym_max_int(bits).expect("bits");
            let what = format!("{bits} bits, group {group}");
            for (mode, to_bf16) in [(0u32, false), (1, true)] {
                let want = fake_asym_group(&w, m, group, WeightGrad::MinMax, to_bf16)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let got = run_emulated(
                    &exe,
                    dir.path(),
                    (group as u32, u32::from(m), mode),
                    &x,
                    &[],
                );
                let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits_of(&got),
                    bits_of(&want),
                    "values, {what}, bf16 {to_bf16}"
                );
            }
            for (mode, g_dtype) in [(2u32, DType::F32), (3, DType::BF16)] {
                let var = Var::from_tensor(&w)?;
                let out =
                    fake_asym_group(&var, m, group, WeightGrad::MinMax, g_dtype == DType::BF16)?;
                let r = r.to_dtype(g_dtype)?;
                let want = (&out * &r)?.sum_all()?.backward()?;
                let want = want
                    .get(var.as_tensor())
                    .expect("grad")
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let g = r.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let got =
                    run_emulated(&exe, dir.path(), (group as u32, u32::from(m), mode), &x, &g);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(
                    scale > 0.0 && diff <= 1e-5 * scale,
                    "gradient, {what}, {g_dtype:?}: {diff} of {scale}"
                );
            }
        }
    }
    Ok(())
}
