//! The CUDA flash-attention kernels (kernels/flash_attention.cu, kernels/flash_attention_backward.cu)
//! run on the CPU through the CUDA emulation in kernels/emulation (host threads for CUDA threads,
//! mma.sync by the PTX ISA fragment layouts), against qat's CPU attention op in f64 on the same inputs,
//! in value and gradient: their indexing, masking, softmax and synchronization, without a GPU.
//! Needs a C++20 compiler (`CXX`, default `c++`); the kernels' speed and their hardware numerics
//! are for the CUDA test on a GPU.

use candle_core::{DType, Device, Result, Tensor, Var};
use qat_model::causal_attention;
use std::path::{Path, PathBuf};

#[path = "../kernels/emulation/build_harness.rs"]
mod emulation_harness;

/// Compiles the emulation harness into `dir` and returns its path.
fn build_harness(dir: &Path) -> PathBuf {
    emulation_harness::build_harness(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "kernels/emulation/flash_attention_main.cpp",
        dir,
    )
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

/// Largest difference of `a` and `b`, divided by the largest magnitude of `b` (at least 1).
fn relative_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let max = |x: &Tensor| x.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>();
    Ok(max(&(a - b)?)? / max(b)?.max(1.0))
}

/// Runs one case through the harness (forward and backward) and the CPU op; returns the
/// largest relative differences of the output and of dq, dk, dv.
fn run(exe: &Path, dir: &Path, c: &Case, seed: u64) -> Result<[f64; 4]> {
    let (b, nh, nkv, t, s, hd) = (c.b, c.heads, c.kv_heads, c.t, c.s, c.head_dim);
    let cap = s + 8; // k and v are views into cache buffers with spare columns
    let q = exact(random(b * nh * t * hd, seed), c.dtype)?;
    let kbuf = exact(random(b * nkv * cap * hd, seed + 1), c.dtype)?;
    let vbuf = exact(random(b * nkv * cap * hd, seed + 2), c.dtype)?;
    let dout = exact(random(b * nh * t * hd, seed + 3), c.dtype)?;
    let scale = 1.0 / (hd as f64).sqrt();

    let mut input = Vec::new();
    let (sb, sh) = ((nkv * cap * hd) as i64, (cap * hd) as i64);
    let dtype_code = i64::from(c.dtype == DType::F16);
    for x in [
        1, dtype_code, b as i64, nh as i64, nkv as i64, t as i64, s as i64, hd as i64,
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
    for x in q.iter().chain(&kbuf).chain(&vbuf).chain(&dout) {
        input.extend((*x as f32).to_le_bytes());
    }
    let output = emulation_harness::run_harness(exe, dir, &input);
    let got: Vec<f64> = emulation_harness::f32s(&output)
        .into_iter()
        .map(f64::from)
        .collect();
    let (nq, nk) = (b * nh * t * hd, b * nkv * s * hd);
    assert_eq!(got.len(), 2 * nq + 2 * nk, "output length");

    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::from_vec(q, (b, nh, t, hd), &dev)?)?;
    let view = |buf: Vec<f64>| -> Result<Var> {
        let x = Tensor::from_vec(buf, (b, nkv, cap, hd), &dev)?.narrow(2, 0, s)?;
        Var::from_tensor(&x.contiguous()?)
    };
    let (k, v) = (view(kbuf)?, view(vbuf)?);
    let out = causal_attention(&q, &k, &v, &c.pads, scale)?;
    let dout = Tensor::from_vec(dout, (b, nh, t, hd), &dev)?;
    let grads = (&out * &dout)?.sum_all()?.backward()?;
    let part = |range: std::ops::Range<usize>, shape: (usize, usize, usize, usize)| {
        Tensor::from_vec(got[range].to_vec(), shape, &dev)
    };
    Ok([
        relative_diff(&part(0..nq, (b, nh, t, hd))?, &out)?,
        relative_diff(
            &part(nq..2 * nq, (b, nh, t, hd))?,
            grads.get(&q).expect("dq"),
        )?,
        relative_diff(
            &part(2 * nq..2 * nq + nk, (b, nkv, s, hd))?,
            grads.get(&k).expect("dk"),
        )?,
        relative_diff(
            &part(2 * nq + nk..2 * nq + 2 * nk, (b, nkv, s, hd))?,
            grads.get(&v).expect("dv"),
        )?,
    ])
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_op_in_value_and_gradient() -> Result<()> {
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
        // Decoding with grouped heads: one block holds the four query heads of a kv head.
        case(bf16, 2, 8, 2, 1, 45, 64, &[0, 44]),
        // A short chunk after cached columns: packed rows of four heads in one block.
        case(f16, 2, 8, 2, 3, 70, 64, &[5, 0]),
        // Blocks whose first query is past the padding start their keys at pad / 32 * 32.
        case(bf16, 1, 2, 1, 130, 130, 96, &[70]),
        case(f16, 1, 4, 4, 67, 67, 128, &[33]),
    ];
    for (i, c) in cases.iter().enumerate() {
        let diffs = run(&exe, dir.path(), c, 1000 + 10 * i as u64)?;
        // Relative to the largest magnitude (outputs: |v| ≤ 2, convex combinations of rows of
        // v). The kernels round P, dS and the output to the dtype (8 significant bits for bf16,
        // 11 for f16); gradients sum many rounded terms.
        let (tol, grad_tol) = if c.dtype == DType::BF16 {
            (0.006, 0.01)
        } else {
            (0.001, 0.002)
        };
        for (name, diff, tol) in [
            ("out", diffs[0], tol),
            ("dq", diffs[1], grad_tol),
            ("dk", diffs[2], grad_tol),
            ("dv", diffs[3], grad_tol),
        ] {
            assert!(
                diff < tol,
                "case {i} ({:?} {}x{}/{}x{}/{}x{} pads {:?}): {name} differs by {diff} (tolerance {tol})",
                c.dtype,
                c.b,
                c.heads,
                c.kv_heads,
                c.t,
                c.s,
                c.head_dim,
                c.pads
            );
        }
        eprintln!(
            "case {i}: relative differences out {:.1e}, dq {:.1e}, dk {:.1e}, dv {:.1e}",
            diffs[0], diffs[1], diffs[2], diffs[3]
        );
    }
    Ok(())
}
