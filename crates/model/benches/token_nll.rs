//! Benchmark: `token_nll` (one pass over the logits) against the composed path it replaced in
//! qat-eval (f32 copy, log_softmax, gather, argmax), for one 1023-token sequence over a 32000-token
//! vocabulary (TinyLlama's, `make bench-gpu`'s eval shape), f32 and bf16 logits, on the CPU.
//! Prints both times and their ratio, measured in the same run
//! (`cargo bench -p qat-model --bench token_nll`).

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use qat_model::token_nll;
use std::time::Instant;

fn composed(logits: &Tensor, targets: &[u32]) -> Result<(Vec<f32>, Vec<u32>)> {
    let logits = logits.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let ids = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    let picked = logp.gather(&ids, 1)?.squeeze(1)?.to_vec1()?;
    Ok((picked, logits.argmax(D::Minus1)?.to_vec1()?))
}

fn seconds<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

fn main() -> Result<()> {
    let (rows, vocab, reps) = (1023, 32000, 5);
    let logits = Tensor::randn(0f32, 3.0, (rows, vocab), &Device::Cpu)?;
    let targets: Vec<u32> = (0..rows as u32)
        .map(|r| (r * 7919) % vocab as u32)
        .collect();
    println!("NLL and greedy flag of {rows} targets over a {vocab}-token vocabulary, CPU:");
    for dtype in [DType::F32, DType::BF16] {
        let z = logits.to_dtype(dtype)?;
        let base = seconds(reps, || composed(&z, &targets))?;
        let fused = seconds(reps, || {
            token_nll(&z, &targets)?.i((.., 0))?.to_vec1::<f32>()
        })?;
        println!(
            "  {dtype:?} logits: composed {:.1} ms, token_nll {:.1} ms, speed-up {:.2}x",
            base * 1e3,
            fused * 1e3,
            base / fused
        );
    }
    Ok(())
}
