//! Benchmark: gradient accumulation in place ([`GradSum`]) against the composed candle ops (cast,
//! scale, sum: `GradSum::composed`), four micro-batches' bf16 gradients of 16.8M f32 parameters
//! in 8 tensors summed with a scale, on the CPU. Prints both times per micro-batch and their
//! ratio, measured in the same run (`cargo bench -p qat-train --bench grad_sum`). The sum is
//! memory-bound, as on a GPU, where the same arithmetic runs as kernels/grad_sum.cu.

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_train::grad_sum::GradSum;
use std::time::Instant;

const MICRO_BATCHES: usize = 4;

fn seconds_per_micro_batch(
    vars: &[(String, Var)],
    grads: &[candle_core::backprop::GradStore],
    in_place: bool,
) -> Result<f64> {
    let run = || -> Result<()> {
        let mut sum = if in_place {
            GradSum::new()
        } else {
            GradSum::composed()
        };
        for g in grads {
            sum.add(vars, g, 1.0 / MICRO_BATCHES as f64)?;
        }
        Ok(())
    };
    run()?; // warm-up
    let reps = 3;
    let start = Instant::now();
    for _ in 0..reps {
        run()?;
    }
    Ok(start.elapsed().as_secs_f64() / (reps * MICRO_BATCHES) as f64)
}

fn main() -> Result<()> {
    let (tensors, len) = (8, 2 << 20);
    let vars: Vec<(String, Var)> = (0..tensors)
        .map(|i| {
            Ok((
                format!("w{i}"),
                Var::from_tensor(&Tensor::zeros(len, DType::F32, &Device::Cpu)?)?,
            ))
        })
        .collect::<Result<_>>()?;
    let total = vars
        .iter()
        .map(|(_, v)| v.as_tensor().sum_all())
        .reduce(|a, b| a? + b?)
        .expect("vars")?;
    let grads = (0..MICRO_BATCHES)
        .map(|_| {
            let mut store = total.backward()?;
            for (_, v) in &vars {
                store.insert(
                    v.as_tensor(),
                    Tensor::randn(0f32, 1e-3, len, &Device::Cpu)?.to_dtype(DType::BF16)?,
                );
            }
            Ok(store)
        })
        .collect::<Result<Vec<_>>>()?;
    let composed = seconds_per_micro_batch(&vars, &grads, false)?;
    let in_place = seconds_per_micro_batch(&vars, &grads, true)?;
    println!("Gradient sum, bf16 gradients of 16.8M f32 parameters in 8 tensors, {MICRO_BATCHES} micro-batches, CPU:");
    println!(
        "  composed candle ops: {:.1} ms per micro-batch",
        composed * 1e3
    );
    println!(
        "  in place:            {:.1} ms per micro-batch",
        in_place * 1e3
    );
    println!("  speed-up: {:.2}x", composed / in_place);
    Ok(())
}
