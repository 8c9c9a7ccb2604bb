//! The CUDA flash-attention kernel (kernels/flash_attention.cu) run on the CPU through the CUDA
//! emulation in kernels/emulation (host threads for CUDA threads, WMMA by its documented
//! semantics), against qat's CPU attention op in f64 on the same inputs: its indexing, masking,
//! online softmax and synchronization, without a GPU. Needs a C++20 compiler (`CXX`, default
//! `c++`); the kernel's speed and its hardware numerics are for the CUDA test on a GPU.

use candle_core::{DType, Device, Result, Tensor};
use qat_model::causal_attention;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emulation");
    let exe = dir.join("flash_attention_emulated");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-fno-strict-aliasing",
            "-pthread",
            "-Wno-unknown-pragmas",
        ])
        .arg(kernels.join("flash_attention_main.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(
        out.status.success(),
        "{cxx} failed on the emulation harness:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect()
}

/// Values rounded to `dtype` (so the kernel sees them exactly), as f64.
fn exact(values: Vec<f64>, dtype: DType) -> Result<Vec<f64>> {
    let n = values.len();
    Tensor::from_vec(values, n, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F64)?
        .to_vec1()
}

struct Case {
    dtype: DType,
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    s: usize,
    head_dim: usize,
    pads: Vec<usize>,
}

/// Runs one case through the harness and the CPU op; returns the largest difference.
fn run(exe: &Path, dir: &Path, c: &Case, seed: u64) -> Result<f64> {
    let (b, nh, nkv, t, s, hd) = (c.b, c.heads, c.kv_heads, c.t, c.s, c.head_dim);
    let cap = s + 8; // k and v are views into cache buffers with spare columns
    let q = exact(random(b * nh * t * hd, seed), c.dtype)?;
    let kbuf = exact(random(b * nkv * cap * hd, seed + 1), c.dtype)?;
    let vbuf = exact(random(b * nkv * cap * hd, seed + 2), c.dtype)?;
    let scale = 1.0 / (hd as f64).sqrt();

    let mut input = Vec::new();
    let (sb, sh) = ((nkv * cap * hd) as i64, (cap * hd) as i64);
    let dtype_code = i64::from(c.dtype == DType::F16);
    for x in [
        dtype_code, b as i64, nh as i64, nkv as i64, t as i64, s as i64, hd as i64,
    ] {
        input.extend(x.to_le_bytes());
    }
    for x in [sb, sh, sb, sh, kbuf.len() as i64, vbuf.len() as i64] {
        input.extend(x.to_le_bytes());
    }
    input.extend((scale as f32).to_le_bytes());
    for &p in &c.pads {
        input.extend((p as u32).to_le_bytes());
    }
    for x in q.iter().chain(&kbuf).chain(&vbuf) {
        input.extend((*x as f32).to_le_bytes());
    }
    let (in_path, out_path) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&in_path, input)?;
    let status = Command::new(exe).arg(&in_path).arg(&out_path).status()?;
    assert!(status.success(), "the emulation harness failed ({status})");
    let got: Vec<f64> = std::fs::read(&out_path)?
        .chunks_exact(4)
        .map(|x| f32::from_le_bytes(x.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(got.len(), b * nh * t * hd, "output length");

    let dev = Device::Cpu;
    let q = Tensor::from_vec(q, (b, nh, t, hd), &dev)?;
    let k = Tensor::from_vec(kbuf, (b, nkv, cap, hd), &dev)?.narrow(2, 0, s)?;
    let v = Tensor::from_vec(vbuf, (b, nkv, cap, hd), &dev)?.narrow(2, 0, s)?;
    let want = causal_attention(&q, &k, &v, &c.pads, scale)?;
    let got = Tensor::from_vec(got, (b, nh, t, hd), &dev)?;
    (got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

#[test]
fn emulated_cuda_kernel_matches_the_cpu_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = build_harness(dir.path());
    let case = |dtype, b, heads, kv_heads, t, s, head_dim, pads: &[usize]| Case {
        dtype,
        b,
        heads,
        kv_heads,
        t,
        s,
        head_dim,
        pads: pads.to_vec(),
    };
    let (bf16, f16) = (DType::BF16, DType::F16);
    let cases = [
        // Evaluation: t = s, padding rows whose first queries are padding columns.
        case(bf16, 2, 4, 2, 70, 70, 64, &[0, 5]),
        // A chunk after cached columns (t < s), one kv head for four query heads.
        case(bf16, 2, 4, 1, 40, 100, 128, &[3, 37]),
        // Decoding one token; a row whose only real column is the newest.
        case(f16, 2, 2, 2, 1, 45, 32, &[0, 44]),
        // Blocks whose first query is past the padding start their keys at pad / 32 * 32.
        case(bf16, 1, 2, 1, 130, 130, 96, &[70]),
        case(f16, 1, 4, 4, 67, 67, 128, &[33]),
    ];
    for (i, c) in cases.iter().enumerate() {
        let diff = run(&exe, dir.path(), c, 1000 + 10 * i as u64)?;
        // |v| ≤ 2 and outputs are convex combinations of rows of v; the kernel rounds P and the
        // output to the dtype (8 significant bits for bf16, 11 for f16).
        let tol = if c.dtype == DType::BF16 { 0.012 } else { 0.002 };
        assert!(
            diff < tol,
            "case {i} ({:?} {}x{}/{}x{}/{}x{} pads {:?}): max difference {diff}",
            c.dtype,
            c.b,
            c.heads,
            c.kv_heads,
            c.t,
            c.s,
            c.head_dim,
            c.pads
        );
        eprintln!("case {i}: max difference {diff:.2e} (tolerance {tol})");
    }
    Ok(())
}
