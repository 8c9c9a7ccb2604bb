//! The CUDA kernel of qat-sample's per-position math (kernels/sample_rows.cu) runs on the CPU
//! through the CUDA emulation in crates/model/kernels/emulation, against the host functions it
//! replaces on a GPU (`qat_sample::sampler`: log_softmax_exps, top_k_indices, argmax, draw, which
//! the op runs on the CPU): the same top-K ids, the same log-probability bits, the same chosen
//! token. f32, bf16 and f16 logits; vocabularies of one id, smaller than a block, around it and
//! of Llama-2's size; K from 1 to the whole vocabulary and the kernel's largest (1024); rows full
//! of ties (integer logits) and constant rows; `-inf` logits; greedy rows, temperatures 1 and
//! 0.7, uniforms from 0 to just below 1. Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{Device, Tensor};
use qat_sample::device_rows::pick_rows;
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/sample_rows_main.cpp",
        dir,
    )
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Logits {
    /// Uniform in [-8, 8).
    Random,
    /// Integers in [-25, 25): rows full of ties.
    Ties,
    /// All 0: the top-K are the smallest ids, the draw is uniform.
    Constant,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Float {
    F32,
    Bf16,
    F16,
}

struct Case {
    vocab: usize,
    k: usize,
    dtype: Float,
    temperature: f64,
    logits: Logits,
    seed: u64,
    /// One row per draw (negative: greedy).
    draws: Vec<f64>,
}

/// The logits as the kernel sees them: rounded to its input type.
fn rounded(x: f32, dtype: Float) -> f32 {
    match dtype {
        Float::F32 => x,
        Float::Bf16 => half::bf16::from_f32(x).to_f32(),
        Float::F16 => half::f16::from_f32(x).to_f32(),
    }
}

fn run_emulated(exe: &Path, dir: &Path, c: &Case, z: &[f32]) -> Vec<u32> {
    let mut bytes = Vec::new();
    let dtype = match c.dtype {
        Float::F32 => 0u32,
        Float::Bf16 => 1,
        Float::F16 => 2,
    };
    for x in [c.draws.len() as u32, c.vocab as u32, c.k as u32, dtype] {
        bytes.extend(x.to_le_bytes());
    }
    bytes.extend(c.temperature.to_le_bytes());
    c.draws.iter().for_each(|d| bytes.extend(d.to_le_bytes()));
    z.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    emulation_harness::run_harness(exe, dir, &bytes)
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// What the host computes (the CPU side of the op: the host functions), as the kernel's rows:
/// `[K ids, K log-prob bits, chosen, its log-prob bits]`.
fn host_rows(c: &Case, z: &[f32]) -> Vec<u32> {
    let logits = Tensor::from_vec(z.to_vec(), (c.draws.len(), c.vocab), &Device::Cpu).unwrap();
    let picked = pick_rows(&logits, &c.draws, c.temperature, c.k).unwrap();
    picked
        .iter()
        .flat_map(|p| {
            let bits = p.topk_logprobs.iter().map(|x| x.to_bits());
            p.topk_ids
                .iter()
                .copied()
                .chain(bits)
                .chain([p.token, p.logprob.to_bits()])
        })
        .collect()
}

fn case(vocab: usize, k: usize, dtype: Float, temperature: f64, logits: Logits, seed: u64) -> Case {
    Case {
        vocab,
        k,
        dtype,
        temperature,
        logits,
        seed,
        draws: vec![-1.0, 0.0, 0.3, 0.999_999_9],
    }
}

#[test]
fn emulated_cuda_kernel_matches_the_host_sampler() {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = build_harness(dir.path());
    use Logits::{Constant, Random, Ties};
    let cases = [
        case(1, 1, Float::F32, 1.0, Random, 10),
        case(7, 3, Float::F32, 1.0, Random, 1),
        case(300, 17, Float::F32, 1.0, Random, 2),
        case(300, 300, Float::F32, 0.7, Random, 3),
        case(513, 40, Float::F16, 0.7, Random, 4),
        case(513, 64, Float::Bf16, 1.0, Constant, 11),
        case(1000, 64, Float::F32, 1.0, Ties, 5),
        case(32000, 64, Float::F32, 1.0, Random, 6),
        case(32000, 64, Float::Bf16, 1.0, Random, 7),
        case(32000, 1, Float::Bf16, 0.7, Ties, 8),
        case(32000, 1024, Float::Bf16, 1.0, Ties, 9),
    ];
    for c in &cases {
        let mut state = c.seed;
        let n = c.draws.len() * c.vocab;
        let mut z: Vec<f32> = match c.logits {
            Random => emulation_harness::lcg_values(n, c.seed, 16.0),
            Ties => (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) % 50) as f32 - 25.0
                })
                .collect(),
            Constant => vec![0.0; n],
        };
        if c.vocab > 2 {
            for r in 0..c.draws.len() {
                z[r * c.vocab + (r * 7 + 3) % c.vocab] = f32::NEG_INFINITY; // a masked logit
            }
            // Row 1 draws u = 0 and starts with a zero weight, which the draw must pass over.
            z[c.vocab] = f32::NEG_INFINITY;
        }
        z.iter_mut().for_each(|x| *x = rounded(*x, c.dtype));
        let got = run_emulated(&exe, dir.path(), c, &z);
        let all_want = host_rows(c, &z);
        let width = 2 * c.k + 2;
        assert_eq!(got.len(), c.draws.len() * width);
        for (r, &u) in c.draws.iter().enumerate() {
            let want = &all_want[r * width..(r + 1) * width];
            let row = &got[r * width..(r + 1) * width];
            let what = format!(
                "vocab {} k {} {:?} T {} {:?} row {r} u {u}",
                c.vocab, c.k, c.dtype, c.temperature, c.logits
            );
            assert_eq!(&row[..c.k], &want[..c.k], "top-K ids, {what}");
            assert_eq!(&row[c.k..2 * c.k], &want[c.k..2 * c.k], "log-probs, {what}");
            assert_eq!(&row[2 * c.k..], &want[2 * c.k..], "chosen token, {what}");
        }
    }
}
