//! Benchmark: AdamW's in-place kernels against the composed candle ops (the reference path), one
//! optimizer step over 16M f32 parameters in 8 tensors, on the CPU. Prints both times and their
//! ratio, measured in the same run (`cargo bench -p qat-train --bench adamw`). The step is
//! memory-bound, as on a GPU, where the same kernels run (kernels/adamw.cu).

use candle_core::{Device, Result, Tensor, Var};
use qat_train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::time::Instant;

fn optimizer(fused: bool, tensors: usize, len: usize) -> Result<(AdamW, HashMap<String, Tensor>)> {
    let mut vars = Vec::new();
    let mut grads = HashMap::new();
    for i in 0..tensors {
        let name = format!("w{i}");
        let w = Tensor::randn(0f32, 0.02, len, &Device::Cpu)?;
        grads.insert(name.clone(), Tensor::randn(0f32, 1e-3, len, &Device::Cpu)?);
        vars.push((name, Var::from_tensor(&w)?));
    }
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(vars, cfg)?;
    opt.set_fused_kernels(fused);
    Ok((opt, grads))
}

fn seconds_per_step(fused: bool) -> Result<f64> {
    let (mut opt, grads) = optimizer(fused, 8, 2 << 20)?;
    opt.apply(&grads, 1e-4)?; // warm-up
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        opt.apply(&grads, 1e-4)?;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

fn main() -> Result<()> {
    let composed = seconds_per_step(false)?;
    let fused = seconds_per_step(true)?;
    println!("AdamW step, 16.8M f32 parameters in 8 tensors, CPU:");
    println!("  composed candle ops: {:.1} ms", composed * 1e3);
    println!("  in-place kernels:    {:.1} ms", fused * 1e3);
    println!("  speed-up: {:.2}x", composed / fused);
    Ok(())
}
