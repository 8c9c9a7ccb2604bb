//! The CUDA kernels of the top-K loss's student side (kernels/bucket_lse.cu) run on the CPU
//! through the CUDA emulation in crates/model/kernels/emulation, against the CPU op
//! (`qat_train::loss::bucket_lse`, f64) in value and gradient: f32 and bf16 logits, with and
//! without the tail bucket, vocabularies smaller than a block, around it and of Llama-2's size, K
//! from 1 to the whole vocabulary, repeated ids (the one-thread path) and out-of-range ids, and
//! `-inf` logits. Needs a C++20 compiler (`CXX`, default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_train::loss::bucket_lse::top_k_buckets;
use std::path::{Path, PathBuf};

#[path = "../../model/kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/bucket_lse_main.cpp",
        dir,
    )
}

struct Case {
    rows: usize,
    vocab: usize,
    k: usize,
    tail: bool,
    seed: u64,
    bf16: bool,
}

/// `(forward [rows, c + k], dz [rows, vocab])` from the emulated kernels.
fn run_emulated(
    exe: &Path,
    dir: &Path,
    c: &Case,
    ids: &[u32],
    z: &[f32],
    g: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut bytes = Vec::new();
    for x in [
        c.rows,
        c.vocab,
        c.k,
        usize::from(c.tail),
        usize::from(c.bf16),
    ] {
        bytes.extend((x as u32).to_le_bytes());
    }
    ids.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    z.iter()
        .chain(g)
        .for_each(|x| bytes.extend(x.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    let all: Vec<f32> = emulation_harness::f32s(&output);
    let n = c.rows * (1 + usize::from(c.tail) + c.k);
    (all[..n].to_vec(), all[n..].to_vec())
}

fn case(rows: usize, vocab: usize, k: usize, tail: bool, seed: u64, bf16: bool) -> Case {
    Case {
        rows,
        vocab,
        k,
        tail,
        seed,
        bf16,
    }
}

/// Whether kernel value `a` matches the CPU op's `b` within `tol` (equal infinities match).
fn close(a: f32, b: f64, tol: f64) -> bool {
    f64::from(a) == b || (f64::from(a) - b).abs() <= tol
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let cases = [
        case(3, 7, 2, true, 1, false),
        case(4, 300, 17, true, 2, false),
        case(3, 300, 300, false, 3, false),
        case(3, 32000, 64, true, 4, false),
        case(2, 32000, 1, true, 5, false),
        case(2, 513, 40, false, 6, false),
        case(3, 300, 17, true, 7, true),
        case(3, 32000, 64, true, 8, true),
        case(2, 300, 300, false, 9, true),
    ];
    for c in &cases {
        let cols = 1 + usize::from(c.tail) + c.k;
        let mut z = emulation_harness::lcg_values(c.rows * c.vocab, c.seed, 16.0);
        z[c.vocab / 2] = f32::NEG_INFINITY; // a masked logit
        if c.bf16 {
            // The kernels read bf16: the reference gets the same rounded values.
            z.iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
        // Distinct ids in every row (as top-K ids are: the kernels' many-thread path) ...
        let mut ids: Vec<u32> = (0..c.rows * c.k)
            .map(|i| ((i * 7919 + i / c.k * 31) % c.vocab) as u32)
            .collect();
        if c.k > 2 {
            // ... but in row 0: a repeated id and one out of range (the one-thread path).
            ids[1] = ids[0];
            ids[2] = c.vocab as u32 + 5;
        }
        let g = emulation_harness::lcg_values(c.rows * cols, c.seed + 100, 4.0);
        let (got, got_dz) = run_emulated(&exe, dir.path(), c, &ids, &z, &g);

        let zt = Var::from_tensor(
            &Tensor::from_vec(z.clone(), (c.rows, c.vocab), &Device::Cpu)?.to_dtype(DType::F64)?,
        )?;
        let idt = Tensor::from_vec(ids.clone(), (c.rows, c.k), &Device::Cpu)?;
        let want = top_k_buckets(&zt, &idt, c.tail)?;
        let gt = Tensor::from_vec(g.clone(), (c.rows, cols), &Device::Cpu)?.to_dtype(DType::F64)?;
        let grads = (&want * &gt)?.sum_all()?.backward()?;
        let want_dz: Vec<f64> = grads.get(&zt).expect("grad").flatten_all()?.to_vec1()?;
        let want: Vec<f64> = want.flatten_all()?.to_vec1()?;
        let what = |bf16: bool| if bf16 { "bf16" } else { "f32" };
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(
                close(a, b, 2e-6 * b.abs().max(1.0)),
                "{} vocab {} k {} row {} column {}: kernel {a}, cpu {b}",
                what(c.bf16),
                c.vocab,
                c.k,
                i / cols,
                i % cols
            );
        }
        // The gradient is computed in f32 and rounded once to the logits' type.
        let scale = want_dz.iter().fold(0f64, |m, x| m.max(x.abs()));
        let rounding = if c.bf16 { 2f64.powi(-8) } else { 0.0 };
        for (j, (&a, &b)) in got_dz.iter().zip(&want_dz).enumerate() {
            assert!(
                close(a, b, 1e-5 * scale + rounding * b.abs()),
                "{} vocab {} k {} dz[{j}]: kernel {a}, cpu {b}",
                what(c.bf16),
                c.vocab,
                c.k
            );
        }
    }
    Ok(())
}
