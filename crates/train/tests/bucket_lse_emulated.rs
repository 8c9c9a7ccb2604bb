//! The CUDA kernels of the top-K loss's log-sum-exps (kernels/bucket_lse.cu) run on the CPU
//! through the CUDA emulation in crates/model/kernels/emulation, against the CPU op
//! (`qat_train::loss::bucket_lse`, f64) in value and gradient: with and without the tail bucket,
//! vocabularies smaller than a block, around it and of Llama-2's size, K from 1 to the whole
//! vocabulary, repeated and out-of-range ids, and `-inf` logits. Needs a C++20 compiler (`CXX`,
//! default `c++`).

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_train::loss::bucket_lse::bucket_logsumexp;
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
}

/// `(forward [rows, c], dz [rows, vocab])` from the emulated kernels.
fn run_emulated(
    exe: &Path,
    dir: &Path,
    c: &Case,
    ids: &[u32],
    z: &[f32],
    g: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut bytes = Vec::new();
    for x in [c.rows, c.vocab, c.k, usize::from(c.tail)] {
        bytes.extend((x as u32).to_le_bytes());
    }
    ids.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    z.iter()
        .chain(g)
        .for_each(|x| bytes.extend(x.to_le_bytes()));
    let output = emulation_harness::run_harness(exe, dir, &bytes);
    let all: Vec<f32> = emulation_harness::f32s(&output);
    let n = c.rows * (1 + usize::from(c.tail));
    (all[..n].to_vec(), all[n..].to_vec())
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let cases = [
        Case {
            rows: 3,
            vocab: 7,
            k: 2,
            tail: true,
            seed: 1,
        },
        Case {
            rows: 4,
            vocab: 300,
            k: 17,
            tail: true,
            seed: 2,
        },
        Case {
            rows: 3,
            vocab: 300,
            k: 300,
            tail: false,
            seed: 3,
        },
        Case {
            rows: 3,
            vocab: 32000,
            k: 64,
            tail: true,
            seed: 4,
        },
        Case {
            rows: 2,
            vocab: 32000,
            k: 1,
            tail: true,
            seed: 5,
        },
        Case {
            rows: 2,
            vocab: 513,
            k: 40,
            tail: false,
            seed: 6,
        },
    ];
    for c in &cases {
        let cols = 1 + usize::from(c.tail);
        let mut z = emulation_harness::lcg_values(c.rows * c.vocab, c.seed, 16.0);
        z[c.vocab / 2] = f32::NEG_INFINITY; // a masked logit
        let mut ids: Vec<u32> = (0..c.rows * c.k)
            .map(|i| ((i * 7919 + i / c.k * 31) % c.vocab) as u32)
            .collect();
        if c.k > 2 {
            ids[1] = ids[0]; // a repeated id
            ids[2] = c.vocab as u32 + 5; // out of range: ignored
        }
        let g = emulation_harness::lcg_values(c.rows * cols, c.seed + 100, 4.0);
        let (got, got_dz) = run_emulated(&exe, dir.path(), c, &ids, &z, &g);

        let zt = Var::from_tensor(
            &Tensor::from_vec(z.clone(), (c.rows, c.vocab), &Device::Cpu)?.to_dtype(DType::F64)?,
        )?;
        let idt = Tensor::from_vec(ids.clone(), (c.rows, c.k), &Device::Cpu)?;
        let want = bucket_logsumexp(&zt, &idt, c.tail)?;
        let gt = Tensor::from_vec(g.clone(), (c.rows, cols), &Device::Cpu)?.to_dtype(DType::F64)?;
        let grads = (&want * &gt)?.sum_all()?.backward()?;
        let want_dz: Vec<f64> = grads.get(&zt).expect("grad").flatten_all()?.to_vec1()?;
        let want: Vec<f64> = want.flatten_all()?.to_vec1()?;
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(a) - b).abs() <= 2e-6 * b.abs().max(1.0),
                "vocab {} k {} row {}: kernel {a}, cpu {b}",
                c.vocab,
                c.k,
                i / cols
            );
        }
        let scale = want_dz.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (j, (&a, &b)) in got_dz.iter().zip(&want_dz).enumerate() {
            assert!(
                (f64::from(a) - b).abs() <= 1e-5 * scale,
                "vocab {} k {} dz[{j}]: kernel {a}, cpu {b}",
                c.vocab,
                c.k
            );
        }
    }
    Ok(())
}
