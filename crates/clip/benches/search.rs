//! Benchmark: the clipping search of one layer with the Gram-matrix error against the direct
//! (partial outputs per token) error, both measured in this run, at TinyLlama-1.1B widths
//! (in 2048) with BitDistiller's 512 calibration tokens: per-channel (a group of 2048 inputs,
//! where `search_layer` goes direct) and groups of 128 (where it keeps the Gram matrices). With the
//! binaries' allocator options (`qat_cli::tune_allocator`).

use candle_core::{Device, Tensor};
use qat_clip::search::{search_layer_with, ErrorModel};
use std::time::Instant;

/// Deterministic values roughly N(0, 1), from an LCG.
fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (0..12).map(|_| uniform()).sum::<f32>() - 6.0)
        .collect()
}

/// Symmetric 4-bit MinMax per group (per channel when `group` is the row).
fn sym4(w: &[f32], group: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for g in w.chunks(group) {
        let s = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-8) / 7.0;
        out.extend(
            g.iter()
                .map(|&v| (v / s).round_ties_even().clamp(-8.0, 7.0) * s),
        );
    }
    out
}

fn main() -> qat_clip::Result<()> {
    // As the qat-* binaries do: large tensor buffers stay on the heap instead of mmap/munmap.
    qat_cli::tune_allocator();
    let (inp, n) = (2048, 512);
    println!("clip search of one [out, {inp}] layer, {n} calibration tokens, 10 x 10 shrink pairs");
    println!("| groups | out rows | Gram s | direct s | Gram / direct | same choices |");
    println!("|---|---|---|---|---|---|");
    for (group, out) in [(inp, 64), (128, 256), (64, 256), (32, 256)] {
        let w = normals(out * inp, 1);
        let x = normals(n * inp, 2);
        let q = |w: &Tensor| -> qat_clip::Result<Tensor> {
            let q = sym4(&w.flatten_all()?.to_vec1::<f32>()?, group);
            Ok(Tensor::from_vec(q, w.shape(), w.device())?)
        };
        let w = Tensor::from_vec(w, (out, inp), &Device::Cpu)?;
        let run = |model: ErrorModel| -> qat_clip::Result<(f64, Vec<(u8, u8)>)> {
            let t = Instant::now();
            let clip = search_layer_with(&w, n, group, &model, &q)?;
            Ok((t.elapsed().as_secs_f64(), clip.choice))
        };
        let t = Instant::now();
        let gram = ErrorModel::gram_of(&x, inp, group, &Device::Cpu)?;
        let gram_setup = t.elapsed().as_secs_f64();
        let (gram_s, gram_choice) = run(gram)?;
        let t = Instant::now();
        let direct = ErrorModel::direct_of(&x, inp, group, &Device::Cpu)?;
        let direct_setup = t.elapsed().as_secs_f64();
        let (direct_s, direct_choice) = run(direct)?;
        let (g, d) = (gram_s + gram_setup, direct_s + direct_setup);
        println!(
            "| {} | {out} | {g:.2} | {d:.2} | {:.1}x | {} |",
            if group == inp {
                "per channel".to_string()
            } else {
                group.to_string()
            },
            g / d,
            gram_choice == direct_choice
        );
    }
    Ok(())
}
