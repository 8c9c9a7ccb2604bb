//! The CUDA kernels of the masked softmax with its backward (kernels/causal_softmax.cu) run on
//! the CPU through the CUDA emulation in kernels/emulation, against the CPU op
//! (`qat_model::causal_softmax`, f64 arithmetic) in value and gradient: f32 and bf16, left
//! padding (real and padding queries), a decode chunk (t = 1) and chunks after cached columns,
//! rows shorter and longer than a block, `-inf` scores, scales 1, 1/8 and others. Needs a C++20
//! compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_model::causal_softmax::{causal_softmax, pads_tensor};
use qat_model::custom_op::max_abs_diff;
use std::path::{Path, PathBuf};

#[path = "../kernels/emulation/build_harness.rs"]
mod emulation_harness;

fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/causal_softmax_main.cpp",
        dir,
    )
}

/// (pads, heads, t, s, bf16, scale)
type Case = (&'static [u32], usize, usize, usize, bool, f32);

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let cases: [Case; 6] = [
        (&[0, 3, 5], 2, 6, 6, false, 1.0),
        (&[0, 0], 3, 1, 9, false, 0.125),
        (&[2, 0, 4], 2, 3, 300, false, 0.3),
        (&[0, 7], 1, 40, 600, false, 0.125),
        (&[0, 3, 5], 2, 6, 6, true, 0.7),
        (&[1, 0], 2, 24, 520, true, 0.125),
    ];
    for (seed, &(pads, heads, t, s, bf16, scale)) in cases.iter().enumerate() {
        let b = pads.len();
        let rows_per_batch = heads * t;
        let n = b * rows_per_batch * s;
        let mut x = emulation_harness::lcg_values(n, seed as u64 + 1, 16.0);
        x[s - 1] = f32::NEG_INFINITY; // a -inf score, visible to the last query of row 0
        let mut g = emulation_harness::lcg_values(n, seed as u64 + 50, 4.0);
        if bf16 {
            for v in x.iter_mut().chain(g.iter_mut()) {
                *v = half::bf16::from_f32(*v).to_f32();
            }
        }
        let mut bytes = Vec::new();
        for v in [b, rows_per_batch, t, s, usize::from(bf16)] {
            bytes.extend((v as u32).to_le_bytes());
        }
        bytes.extend(scale.to_le_bytes());
        pads.iter().for_each(|p| bytes.extend(p.to_le_bytes()));
        x.iter()
            .chain(&g)
            .for_each(|v| bytes.extend(v.to_le_bytes()));
        let out =
            emulation_harness::f32s(&emulation_harness::run_harness(&exe, dir.path(), &bytes));
        let (y, dx) = out.split_at(n);

        let dims = (b, heads, t, s);
        let xv = Var::from_tensor(&Tensor::from_vec(x, dims, &Device::Cpu)?.to_dtype(DType::F64)?)?;
        let gt = Tensor::from_vec(g, dims, &Device::Cpu)?.to_dtype(DType::F64)?;
        let pads: Vec<usize> = pads.iter().map(|&p| p as usize).collect();
        let want = causal_softmax(&xv, &pads_tensor(&pads, &Device::Cpu)?, t, scale.into())?;
        let grads = (&want * &gt)?.sum_all()?.backward()?;
        let dwant = grads.get(&xv).expect("gradient");
        let y = Tensor::from_vec(y.to_vec(), dims, &Device::Cpu)?;
        let dx = Tensor::from_vec(dx.to_vec(), dims, &Device::Cpu)?;
        // f32: a few ulps of probabilities <= 1; bf16: the output's rounding (2^-8 relative).
        let tol = if bf16 { 4e-3 } else { 2e-6 };
        let what = format!("pads {pads:?} t {t} s {s} bf16 {bf16}");
        assert!(max_abs_diff(&y, &want)? < tol, "value, {what}");
        // The gradient's scale is |g| <= 2; bf16 rounds y, g and the product.
        assert!(max_abs_diff(&dx, dwant)? < 8.0 * tol, "gradient, {what}");
        // Hidden keys are exactly 0 in value and gradient.
        let hidden = want.eq(0.0)?.to_dtype(DType::F64)?;
        assert_eq!(
            (y.to_dtype(DType::F64)? * &hidden)?
                .abs()?
                .sum_all()?
                .to_scalar::<f64>()?,
            0.0
        );
        assert_eq!(
            (dx.to_dtype(DType::F64)? * &hidden)?
                .abs()?
                .sum_all()?
                .to_scalar::<f64>()?,
            0.0
        );
    }
    Ok(())
}
