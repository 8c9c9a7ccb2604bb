//! The CUDA token-NLL kernel (kernels/token_nll.cu) run on the CPU through the CUDA emulation in
//! kernels/emulation, against an f64 computation written here and against the CPU op
//! (`qat_model::token_nll`): f32, bf16 and f16 logits; vocabularies smaller than, around and far
//! larger than a block; ties for the rank, `-inf` logits, constant rows and a NaN row. Needs a
//! C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor};
use std::path::{Path, PathBuf};

#[path = "../kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/token_nll_main.cpp",
        dir,
    )
}

/// Rows of every kind the kernel has a branch for, with their targets.
fn rows(vocab: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut state = seed;
    let mut random = |scale: f32| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
    };
    let (mut z, mut targets) = (Vec::new(), Vec::new());
    for (r, scale) in [4.0f32, 30.0, 0.1, 12.0].into_iter().enumerate() {
        z.extend((0..vocab).map(|_| random(scale)));
        targets.push(((r * 7919 + 3) % vocab) as u32);
    }
    // Ties: a few values only, target on a repeated one.
    z.extend((0..vocab).map(|j| (j % 3) as f32));
    targets.push((vocab - 1) as u32);
    // A constant row: nll = ln(vocab), rank = target.
    z.extend(std::iter::repeat_n(1.5, vocab));
    targets.push((vocab / 2) as u32);
    // Masked logits: -inf everywhere but three columns.
    z.extend((0..vocab).map(|j| {
        if j % (vocab / 3).max(1) == 0 {
            j as f32 * 0.01
        } else {
            f32::NEG_INFINITY
        }
    }));
    targets.push(0);
    // The largest logit at the target.
    let mut row: Vec<f32> = (0..vocab).map(|_| random(8.0)).collect();
    let t = vocab / 3;
    row[t] = 20.0;
    z.extend(row);
    targets.push(t as u32);
    (z, targets)
}

/// `[nll, rank]` per row in f64, written out from the definitions.
fn reference(z: &[f64], targets: &[u32], vocab: usize) -> Vec<[f64; 2]> {
    z.chunks(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            let t = t as usize;
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
            let rank = (0..vocab)
                .filter(|&j| row[j] > row[t] || (row[j] == row[t] && j < t))
                .count();
            [lse - row[t], rank as f64]
        })
        .collect()
}

fn run_emulated(
    exe: &Path,
    dir: &Path,
    z: &[f32],
    targets: &[u32],
    vocab: usize,
    dtype: u32,
) -> Vec<f32> {
    let mut bytes = Vec::new();
    for x in [targets.len() as u32, vocab as u32, dtype] {
        bytes.extend(x.to_le_bytes());
    }
    targets.iter().for_each(|t| bytes.extend(t.to_le_bytes()));
    z.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    emulation_harness::f32s(&output)
}

#[test]
fn emulated_cuda_kernel_matches_f64_and_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let mut checked = 0;
    for (vocab, seed) in [(5usize, 1u64), (300, 2), (32000, 3)] {
        let (z, targets) = rows(vocab, seed);
        let n = z.len() / vocab;
        for (code, dtype) in [(0u32, DType::F32), (1, DType::BF16), (2, DType::F16)] {
            // The values the kernel sees, exactly.
            let zt = Tensor::from_vec(z.clone(), (n, vocab), &Device::Cpu)?.to_dtype(dtype)?;
            let exact: Vec<f32> = zt.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let want = reference(
                &exact.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
                &targets,
                vocab,
            );
            let got = run_emulated(&exe, dir.path(), &exact, &targets, vocab, code);
            let cpu = qat_model::token_nll(&zt, &targets)?.to_vec2::<f32>()?;
            for r in 0..n {
                let (nll, rank) = (got[2 * r], got[2 * r + 1]);
                let tol = 2e-6 * want[r][0].abs().max(1.0);
                assert!(
                    (f64::from(nll) - want[r][0]).abs() <= tol,
                    "vocab {vocab} {dtype:?} row {r}: kernel {nll}, f64 {}",
                    want[r][0]
                );
                assert!(
                    (f64::from(cpu[r][0]) - want[r][0]).abs() <= tol,
                    "cpu op, row {r}"
                );
                assert_eq!(
                    f64::from(rank),
                    want[r][1],
                    "vocab {vocab} {dtype:?} row {r}"
                );
                assert_eq!(cpu[r][1], rank, "cpu op rank, row {r}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 3 * 8);

    // A NaN anywhere in a row makes its NLL NaN; the other rows are unaffected.
    let vocab = 700;
    let mut z: Vec<f32> = (0..2 * vocab).map(|j| (j as f32 * 0.1).sin()).collect();
    z[vocab + 613] = f32::NAN;
    let got = run_emulated(&exe, dir.path(), &z, &[3, 3], vocab, 0);
    assert!(got[0].is_finite() && got[2].is_nan(), "{got:?}");
    Ok(())
}
