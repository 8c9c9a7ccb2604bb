//! The CUDA AdamW kernels (kernels/adamw.cu) run on the CPU through the CUDA emulation in
//! crates/model/kernels/emulation, bit for bit against qat's composed AdamW (the reference path,
//! `set_fused_kernels(false)`): weights and both moments after several steps, with and without
//! weight decay, on values with every rounding case (zeros of both signs, tiny and huge
//! magnitudes). Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/adamw_main.cpp",
        dir,
    )
}

/// Zeros of both signs, tiny and huge magnitudes, and plain random values.
fn edge_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            match i % 8 {
                0 => 0.0,
                1 => -0.0,
                2 => r * 1e-30,
                3 => r * 3e7,
                4 => r * 1e-7,
                _ => r,
            }
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn emulated_cuda_kernels_give_the_composed_adamw_bits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let (n, steps) = (1000usize, 6u64);
    // mode 0: the moment and weight kernels one after another; 1: adamw_step_f32, in one pass;
    // 2: adamw_step_f32_gbf16, with bf16 gradients (the reference gets them as bf16 tensors).
    for (mode, weight_decay) in [
        (0u32, 0.0),
        (0, 0.1),
        (1, 0.0),
        (1, 0.1),
        (2, 0.0),
        (2, 0.1),
    ] {
        let cfg = AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        };
        let w0 = edge_values(n, 1);
        let var = Var::from_tensor(&Tensor::from_vec(w0.clone(), n, &Device::Cpu)?)?;
        let mut reference = AdamW::new(vec![("w".into(), var.clone())], cfg)?;
        reference.set_fused_kernels(false);

        let mut input = Vec::new();
        input.extend((n as u64).to_le_bytes());
        input.extend(steps.to_le_bytes());
        input.extend(mode.to_le_bytes());
        w0.iter().for_each(|x| input.extend(x.to_le_bytes()));
        for step in 1..=steps {
            let mut g = edge_values(n, 10 + step);
            let mut grad = Tensor::from_vec(g.clone(), n, &Device::Cpu)?;
            if mode == 2 {
                grad = grad.to_dtype(DType::BF16)?;
                g = grad.to_dtype(DType::F32)?.to_vec1()?;
            }
            let lr = 1e-3 * step as f64;
            let grads = HashMap::from([("w".to_string(), grad)]);
            // With weight decay, every other step also scales the gradients (clipping).
            let grad_scale = (weight_decay > 0.0 && step % 2 == 0).then_some(0.37 / step as f64);
            reference.apply_scaled(&grads, lr, grad_scale)?;
            // The constants as AdamW::apply derives them for this step.
            let (b1, b2) = (cfg.beta1, cfg.beta2);
            let (bc1, bc2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            let constants = [
                b1,
                1.0 - b1,
                b2,
                1.0 - b2,
                1.0 / bc1,
                1.0 / bc2,
                cfg.eps,
                lr,
                1.0 - lr * weight_decay,
                grad_scale.unwrap_or(1.0),
            ];
            constants.iter().for_each(|x| input.extend(x.to_le_bytes()));
            input.extend(i32::from(weight_decay > 0.0).to_le_bytes());
            input.extend(i32::from(grad_scale.is_some()).to_le_bytes());
            g.iter().for_each(|x| input.extend(x.to_le_bytes()));
        }
        let got =
            emulation_harness::f32s(&emulation_harness::run_harness(&exe, dir.path(), &input));
        assert_eq!(got.len(), 3 * n, "output length");
        let state = reference.state_tensors();
        let want_w = var.as_tensor().to_vec1::<f32>()?;
        let (want_m, want_v) = (
            state["m.w"].to_vec1::<f32>()?,
            state["v.w"].to_vec1::<f32>()?,
        );
        assert_eq!(
            bits(&got[..n]),
            bits(&want_w),
            "w, mode {mode}, weight decay {weight_decay}"
        );
        assert_eq!(
            bits(&got[n..2 * n]),
            bits(&want_m),
            "m, mode {mode}, weight decay {weight_decay}"
        );
        assert_eq!(
            bits(&got[2 * n..]),
            bits(&want_v),
            "v, mode {mode}, weight decay {weight_decay}"
        );
    }
    Ok(())
}
