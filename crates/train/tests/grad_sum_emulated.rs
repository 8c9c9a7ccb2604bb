//! The CUDA gradient-sum kernels (kernels/grad_sum.cu) run on the CPU through the CUDA emulation
//! in crates/model/kernels/emulation, bit for bit against the composed candle ops
//! (`GradSum::composed`): f32, bf16 and f16 gradients of an f32 weight, a scaled first gradient
//! and one taken as it is, then sums scaled and not, on values with every rounding case (zeros
//! of both signs, tiny and huge magnitudes), over a grid smaller than the data. Needs a C++20
//! compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_train::grad_sum::GradSum;
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/grad_sum_main.cpp",
        dir,
    )
}

/// Zeros of both signs, tiny, huge and plain values, exact in `dtype`.
fn edge(n: usize, seed: u64, dtype: DType) -> Result<Tensor> {
    let t = qat_model::custom_op::lcg_tensor(&[n], seed, -1.0, 1.0)?;
    let scales: Vec<f64> = (0..n)
        .map(|i| [0.0, -0.0, 1e-30, 3e7, 1e-7, 1.0, 1.0, 1.0][i % 8])
        .collect();
    (t * Tensor::from_vec(scales, n, &Device::Cpu)?)?.to_dtype(dtype)
}

#[test]
fn emulated_cuda_kernels_give_the_composed_sums_bits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let n = 10_001usize;
    let var = Var::from_tensor(&Tensor::zeros(n, DType::F32, &Device::Cpu)?)?;
    let vars = vec![("w".to_string(), var.clone())];
    for (code, dtype) in [(0u32, DType::F32), (1, DType::BF16), (2, DType::F16)] {
        for scales in [[0.5, 1.0, 0.37, 3.0], [1.0, 0.25, 1.0, 0.37]] {
            let mut reference = GradSum::composed();
            let mut input = Vec::new();
            input.extend((n as u64).to_le_bytes());
            input.extend(7u32.to_le_bytes()); // blocks: 7 x 256 threads for 10,001 elements
            input.extend(code.to_le_bytes());
            input.extend((scales.len() as u32).to_le_bytes());
            for (k, &s) in scales.iter().enumerate() {
                let g = edge(n, 40 + k as u64, dtype)?;
                let mut grads = var.as_tensor().sum_all()?.backward()?;
                grads.insert(var.as_tensor(), g.clone());
                reference.add(&vars, &grads, s)?;
                // What GradSum does: the first gradient copied (cast, scaled) into a sum of its
                // own, every later one added to it.
                let kernel = u32::from(k > 0);
                input.extend(kernel.to_le_bytes());
                input.extend((s as f32).to_le_bytes());
                input.extend(i32::from(s != 1.0).to_le_bytes());
                g.to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .iter()
                    .for_each(|x| input.extend(x.to_le_bytes()));
            }
            let got =
                emulation_harness::f32s(&emulation_harness::run_harness(&exe, dir.path(), &input));
            let want = reference.sums()["w"].to_vec1::<f32>()?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}, scales {scales:?}");
        }
    }
    Ok(())
}
