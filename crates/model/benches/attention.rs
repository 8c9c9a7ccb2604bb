//! Benchmark: the fused CPU attention op against candle's composed ops (forward, and forward +
//! backward), at stories260K's training and eval shapes and at head_dim 64, and one decoding
//! step. Prints both times and their ratio, measured in the same run.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use qat_model::causal_attention;
use std::time::Instant;

fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let rep = nh / nkv;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > s - t + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), q.device())?;
    let q = q.reshape((b, nkv, rep * t, hd))?;
    let scores = (q.matmul(&k.t()?)? * scale)?
        .reshape((b, nkv, rep, t, s))?
        .broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax(&scores.reshape((b, nkv, rep * t, s))?, D::Minus1)?;
    probs.matmul(v)?.reshape((b, nh, t, hd))
}

fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

/// CPU seconds of the whole process (all threads): steadier than wall time on a shared machine.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One decoding step: a single query column over `s` cached columns, as qat-sample runs it
/// (batch 64), fused against composed; returns (composed, fused) CPU seconds per call.
fn decode_step(s: usize) -> Result<(f64, f64)> {
    let dev = Device::Cpu;
    let (b, nh, nkv, hd) = (64, 8, 4, 8);
    let q = Tensor::randn(0f32, 1.0, (b, nh, 1, hd), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, nkv, s, hd), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, nkv, s, hd), &dev)?;
    let (scale, pads, reps) = (1.0 / (hd as f64).sqrt(), vec![0; b], 200);
    let cpu = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        f()?;
        let start = process_cpu_seconds();
        for _ in 0..reps {
            f()?;
        }
        Ok((process_cpu_seconds() - start) / reps as f64)
    };
    let fused = cpu(&|| causal_attention(&q, &k, &v, &pads, scale))?;
    let base = cpu(&|| composed(&q, &k, &v, scale))?;
    Ok((base, fused))
}

/// Forward only (inference: qat-eval, qat-sample's prefill) and forward + backward (training)
/// at `[b, nh/nkv, t, hd]`; returns ((composed, fused) forward, (composed, fused) fwd+bwd) wall
/// seconds per call.
type Pair = (f64, f64);
fn shape(
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    hd: usize,
    reps: usize,
) -> Result<(Pair, Pair)> {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nkv, t, hd), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev)?;
    assert_eq!(q.dtype(), DType::F32);
    let (scale, pads) = (1.0 / (hd as f64).sqrt(), vec![0; b]);
    let (qd, kd, vd) = (
        q.as_tensor().detach(),
        k.as_tensor().detach(),
        v.as_tensor().detach(),
    );
    let fwd_fused = time(reps, || {
        causal_attention(&qd, &kd, &vd, &pads, scale).map(|_| ())
    })?;
    let fwd_base = time(reps, || composed(&qd, &kd, &vd, scale).map(|_| ()))?;
    let fused = time(reps, || {
        let out = causal_attention(&q, &k, &v, &pads, scale)?;
        (out * &w)?.sum_all()?.backward().map(|_| ())
    })?;
    let base = time(reps, || {
        let out = composed(&q, &k, &v, scale)?;
        (out * &w)?.sum_all()?.backward().map(|_| ())
    })?;
    Ok(((fwd_base, fwd_fused), (base, fused)))
}

fn main() -> Result<()> {
    for (b, nh, nkv, t, hd, reps, what) in [
        (16, 8, 4, 256, 8, 10, "stories260K, qat-distill's batch"),
        (16, 8, 4, 512, 8, 5, "stories260K, qat-eval's batch"),
        (4, 8, 4, 256, 64, 5, "head_dim 64"),
    ] {
        let ((fb, ff), (b2, f2)) = shape(b, nh, nkv, t, hd, reps)?;
        println!(
            "attention [b={b}, heads={nh}/{nkv}, t={t}, head_dim={hd}] ({what}): forward composed {:.1} ms, fused {:.1} ms, speedup {:.2}x; fwd+bwd composed {:.1} ms, fused {:.1} ms, speedup {:.2}x",
            fb * 1e3,
            ff * 1e3,
            fb / ff,
            b2 * 1e3,
            f2 * 1e3,
            b2 / f2
        );
    }
    let (nh, nkv, hd) = (8, 4, 8);
    for s in [64, 256] {
        let (base, fused) = decode_step(s)?;
        println!(
            "attention decode step [b=64, heads={nh}/{nkv}, t=1, s={s}, head_dim={hd}]: composed {:.3} ms CPU, fused {:.3} ms CPU, speedup {:.2}x",
            base * 1e3,
            fused * 1e3,
            base / fused
        );
    }
    Ok(())
}
