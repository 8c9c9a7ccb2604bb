//! Fused causal attention for the CPU: `softmax(q·kᵀ·scale + mask)·v` one query row at a time,
//! with its own backward pass, so no `[t, s]` score tensor is ever materialized.
//!
//! On a CPU the composed candle ops (matmul, mask add, softmax, matmul and their gradients) spend
//! most of a training step streaming `[batch, heads, t, s]` score tensors through memory; for
//! small head dims (stories260K: 8) the arithmetic is tiny in comparison. This op computes each
//! query row's softmax in a scratch vector instead and recomputes it in the backward pass (the
//! flash-attention recipe). On CUDA (`cuda` feature, bf16/f16, head dims [`HEAD_DIMS`], opt-in
//! with `QAT_CUDA_FLASH_ATTENTION=1` until it has been measured on a GPU) the forward is a flash
//! attention kernel on tensor cores and the backward its flash-attention counterpart (`cuda.rs`).
//! Elsewhere the model composes candle ops.
//!
//! Masking matches [`crate::KvCache::next_mask`]: the `t` query columns are the last `t` of the
//! `s` key columns; query column `c` of batch row `b` sees key columns `pad[b]..=c`, or `0..=c`
//! when `c` is itself a padding column (its output is discarded; this keeps the softmax finite).

mod blocks;
#[cfg(feature = "cuda")]
mod cuda;
mod kernel;

use blocks::{block_layout, KvBlocks};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use kernel::{backward, forward, Dims};

/// The op: per-row left paddings and the score scale (usually `1/√head_dim`). Its output is
/// `[b, heads, t, head_dim]` on the CPU and token-major `[b, t, heads, head_dim]` on CUDA;
/// [`causal_attention`] hides the difference.
#[derive(Debug)]
struct CausalAttention {
    pads: Vec<usize>,
    scale: f64,
    /// On CUDA, when the op's backward pass will run (an input tracks gradients): the forward
    /// kernel's per-query-row log-sum-exp (`[b, heads, t]` f32), which the backward takes
    /// instead of running the forward kernel again.
    #[cfg(feature = "cuda")]
    saved_lse:
        Option<std::sync::Mutex<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>>,
    /// `pads` already on the GPU (u32 `[b]`), for the CUDA kernels to read instead of an upload
    /// in every forward and backward call.
    #[cfg(feature = "cuda")]
    device_pads: Option<Tensor>,
}

fn contiguous_slice<'a, T: candle_core::WithDType>(
    data: &'a [T],
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("causal_attention: {what} must be contiguous"),
    }
}

fn host<T: candle_core::WithDType>(x: &Tensor) -> Result<Vec<T>> {
    x.contiguous()?.flatten_all()?.to_vec1::<T>()
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.dims(), l2.dims(), l3.dims(), self.pads.len())?;
        let shape = l1.shape().clone();
        match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (q, k, v) = (
                    contiguous_slice(q, l1, "q")?,
                    KvBlocks::of(k, l2, "k")?,
                    KvBlocks::of(v, l3, "v")?,
                );
                Ok((
                    CpuStorage::F32(forward(q, k, v, d, &self.pads, self.scale as f32)),
                    shape,
                ))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (q, k, v) = (
                    contiguous_slice(q, l1, "q")?,
                    KvBlocks::of(k, l2, "k")?,
                    KvBlocks::of(v, l3, "v")?,
                );
                Ok((
                    CpuStorage::F64(forward(q, k, v, d, &self.pads, self.scale)),
                    shape,
                ))
            }
            _ => candle_core::bail!(
                "causal_attention: q, k, v must all be F32 or all F64, got {:?}",
                s1.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(q.dims(), k.dims(), v.dims(), self.pads.len())?;
        let dev = q.device();
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            let (dq, dk, dv) = cuda::backward(self, q, k, v, res, dout)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let _ = res; // the CPU backward recomputes what it needs from q, k and v
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => {
                let (dq, dk, dv) = backward(
                    &host::<f32>(q)?,
                    &host(k)?,
                    &host(v)?,
                    &host(dout)?,
                    d,
                    &self.pads,
                    self.scale as f32,
                );
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dv, v.shape(), dev)?,
                )
            }
            DType::F64 => {
                let (dq, dk, dv) = backward(
                    &host::<f64>(q)?,
                    &host(k)?,
                    &host(v)?,
                    &host(dout)?,
                    d,
                    &self.pads,
                    self.scale,
                );
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dv, v.shape(), dev)?,
                )
            }
            other => candle_core::bail!(
                "causal_attention backward: dtype {other:?}, expected F32 or F64"
            ),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Head dims the CUDA kernel is built for.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];

/// Whether [`causal_attention`] runs on tensors of this device, dtype and head dim: the CPU in
/// f32 or f64; CUDA (a `cuda` build) in bf16 or f16 with a head dim in [`HEAD_DIMS`], when the
/// environment has `QAT_CUDA_FLASH_ATTENTION=1` (read once; off by default until the kernel has
/// been measured on a GPU).
pub fn fused_attention_supported(dev: &Device, dtype: DType, head_dim: usize) -> bool {
    match dev {
        Device::Cpu => matches!(dtype, DType::F32 | DType::F64),
        Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && matches!(dtype, DType::BF16 | DType::F16)
                && HEAD_DIMS.contains(&head_dim)
                && cuda_flash_attention_enabled()
        }
        _ => false,
    }
}

/// `QAT_CUDA_FLASH_ATTENTION=1` turns the CUDA kernel on, read once.
fn cuda_flash_attention_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if tests::FLASH_ON.get() {
        return true;
    }
    *ON.get_or_init(|| std::env::var("QAT_CUDA_FLASH_ATTENTION").is_ok_and(|v| v == "1"))
}

/// Causal grouped-query attention with left padding: `q: [b, heads, t, head_dim]`,
/// `k, v: [b, kv_heads, s, head_dim]` (s ≥ t; the queries are the last t columns),
/// `pads[b]` padding columns at the left of row b → `[b, heads, t, head_dim]`.
/// Query head `h` attends kv head `h / (heads / kv_heads)`. Differentiable in q, k and v.
/// Runs where [`fused_attention_supported`] says. On the CPU, k and v may be views whose
/// `[s, head_dim]` blocks are contiguous or transposed (as [`crate::KvCache`] hands out); on
/// CUDA, views with row-major, 16-byte aligned blocks; anything else is copied first. On CUDA
/// the result is a transposed view of a token-major `[b, t, heads, head_dim]` tensor.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
    scale: f64,
) -> Result<Tensor> {
    causal_attention_with_device_pads(q, k, v, pads, None, scale)
}

/// [`causal_attention`] with `pads` also on q's device as `device_pads` (u32 `[b]`, as
/// [`crate::causal_softmax::pads_tensor`] makes them once per forward pass): the CUDA kernels
/// read them there instead of uploading them in every call (two uploads per layer and training
/// step, one per layer and decoding step).
pub fn causal_attention_with_device_pads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
    device_pads: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(not(feature = "cuda"))]
    let _ = device_pads; // only the CUDA kernels read them
    let op = CausalAttention {
        pads: pads.to_vec(),
        #[cfg(feature = "cuda")]
        device_pads: device_pads.cloned(),
        scale,
        #[cfg(feature = "cuda")]
        saved_lse: (q.track_op() || k.track_op() || v.track_op())
            .then(|| std::sync::Mutex::new(None)),
    };
    if q.device().is_cuda() {
        let q = if q.is_contiguous() && q.layout().start_offset().is_multiple_of(8) {
            q.clone()
        } else {
            q.force_contiguous()?
        };
        // The CUDA op writes its output token-major, [b, t, heads, head_dim]: as a transposed
        // view it is the [b, heads, t, head_dim] result, whose transpose back (what the model
        // does before the output projection) costs no copy.
        return q
            .apply_op3(&cuda_ready(k)?, &cuda_ready(v)?, op)?
            .transpose(1, 2);
    }
    q.contiguous()?
        .apply_op3(&blocks_contiguous(k)?, &blocks_contiguous(v)?, op)
}

/// `x` itself if the CUDA kernel reads its `[s, head_dim]` blocks as they are (row-major, 16-byte
/// aligned), else a fresh contiguous copy.
fn cuda_ready(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::kernel_strides(x.layout()).is_some() {
        return Ok(x.clone());
    }
    x.force_contiguous()
}

/// `x` itself if the kernel reads its `[s, hd]` blocks as they are, else a contiguous copy.
fn blocks_contiguous(x: &Tensor) -> Result<Tensor> {
    match (x.dims(), x.stride()) {
        (&[_, _, s, hd], &[_, _, ss, sc]) if block_layout(s, hd, ss, sc).is_some() => Ok(x.clone()),
        _ => x.contiguous(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::kernel::*;
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Unit tests of the model's wiring can turn the CUDA kernels on without the variable.
        pub(crate) static FLASH_ON: Cell<bool> = const { Cell::new(false) };
    }

    /// Independent reference: the composed candle ops with an explicit additive mask.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize], scale: f64) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        let rep = nh / nkv;
        let mut mask = Vec::new();
        for &pad in pads {
            for qc in s - t..s {
                for kc in 0..s {
                    let hidden = kc > qc || (kc < pad && qc >= pad);
                    mask.push(if hidden { f64::NEG_INFINITY } else { 0.0 });
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, s), q.device())?;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * scale)?
            .reshape((b, nkv, rep, t, s))?
            .broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax(
            &scores.reshape((b, nkv, rep * t, s))?,
            candle_core::D::Minus1,
        )?;
        probs.matmul(v)?.reshape((b, nh, t, hd))
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
        crate::custom_op::lcg_tensor(&[shape.0, shape.1, shape.2, shape.3], seed, -2.0, 2.0)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn matches_composed_ops_in_value_and_gradient() -> Result<()> {
        // GQA (4 query heads on 2 kv heads), left padding, prefill (t = s) and chunks with t < s.
        // t < DECODE_ROWS takes the row-major decode path, larger t the transposed one.
        for (t, s, pads) in [
            (5, 5, vec![0, 2]),
            (2, 6, vec![3, 0]),
            (1, 4, vec![0, 1]),
            (9, 9, vec![0, 3]),
            (8, 11, vec![4, 0]),
        ] {
            let q = candle_core::Var::from_tensor(&random((2, 4, t, 3), 1)?)?;
            let k = candle_core::Var::from_tensor(&random((2, 2, s, 3), 2)?)?;
            let v = candle_core::Var::from_tensor(&random((2, 2, s, 3), 3)?)?;
            let weights = random((2, 4, t, 3), 4)?;
            let fused = causal_attention(&q, &k, &v, &pads, 0.7)?;
            let reference = composed(&q, &k, &v, &pads, 0.7)?;
            assert!(
                max_abs_diff(&fused, &reference) < 1e-12,
                "forward t={t} s={s}"
            );
            let g_fused = (&fused * &weights)?.sum_all()?.backward()?;
            let g_ref = (&reference * &weights)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (
                    g_fused.get(var).expect("grad"),
                    g_ref.get(var).expect("grad"),
                );
                assert!(
                    max_abs_diff(a, b) < 1e-12,
                    "d{name} t={t} s={s}: {}",
                    max_abs_diff(a, b)
                );
            }
        }
        Ok(())
    }

    /// The CUDA kernels (bf16, f16) against the CPU op in f64 on the same (rounded) inputs, in
    /// value and gradient, with GQA, left padding, chunks with t < s,
    /// every head dim built, and k, v as views into a larger cache buffer. Runs only in a
    /// `--features cuda` build on a machine with a GPU (skipped otherwise).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let cases = [
            (2, 4, 2, 70, 70, 64, vec![0, 5]),
            (2, 4, 1, 40, 100, 128, vec![3, 37]),
            (2, 2, 2, 1, 45, 32, vec![0, 44]),
            (2, 8, 2, 1, 45, 64, vec![0, 44]),
            (1, 2, 1, 130, 130, 96, vec![70]),
            (1, 32, 4, 300, 300, 64, vec![0]),
        ];
        for dtype in [DType::BF16, DType::F16] {
            for (seed, (b, nh, nkv, t, s, hd, pads)) in cases.iter().cloned().enumerate() {
                let seed = 100 + 10 * seed as u64;
                let exact = |x: Tensor| x.to_dtype(dtype)?.to_dtype(DType::F64);
                let cap = s + 8; // a cache buffer with spare columns: k and v are views
                let q = exact(random((b, nh, t, hd), seed)?)?;
                let kbuf = exact(random((b, nkv, cap, hd), seed + 1)?)?;
                let vbuf = exact(random((b, nkv, cap, hd), seed + 2)?)?;
                let (k, v) = (kbuf.narrow(2, 0, s)?, vbuf.narrow(2, 0, s)?);
                let weights = random((b, nh, t, hd), seed + 3)?;
                let scale = 1.0 / (hd as f64).sqrt();
                let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(&gpu);
                // Variables: q and the whole cache buffers; the op reads views of the buffers.
                let (gq, gkbuf, gvbuf) = (
                    candle_core::Var::from_tensor(&on_gpu(&q)?)?,
                    candle_core::Var::from_tensor(&on_gpu(&kbuf)?)?,
                    candle_core::Var::from_tensor(&on_gpu(&vbuf)?)?,
                );
                let (gk, gv) = (gkbuf.narrow(2, 0, s)?, gvbuf.narrow(2, 0, s)?);
                let out = causal_attention(&gq, &gk, &gv, &pads, scale)?;
                let got = out.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
                let (cq, ck, cv) = (
                    candle_core::Var::from_tensor(&q)?,
                    candle_core::Var::from_tensor(&k.contiguous()?)?,
                    candle_core::Var::from_tensor(&v.contiguous()?)?,
                );
                let reference = causal_attention(&cq, &ck, &cv, &pads, scale)?;
                // Outputs are convex combinations of rows of v (|v| ≤ 2): P and the output are
                // rounded to the dtype (8 or 11 significant bits). Gradients: relative to their
                // largest magnitude, as in tests/flash_attention_emulated.rs.
                let (tol, grad_tol) = if dtype == DType::BF16 {
                    (0.012, 0.01)
                } else {
                    (0.002, 0.002)
                };
                let diff = max_abs_diff(&got, &reference);
                assert!(
                    diff < tol,
                    "{dtype:?} forward {b}x{nh}/{nkv}x{t}/{s}x{hd}: {diff}"
                );
                let g_gpu = (out.to_dtype(DType::F32)?
                    * weights.to_dtype(DType::F32)?.to_device(&gpu)?)?
                .sum_all()?
                .backward()?;
                let g_cpu = (&reference * &weights)?.sum_all()?.backward()?;
                let grad = |var: &Tensor, columns: usize| -> Result<Tensor> {
                    let g = g_gpu.get(var).expect("grad").to_dtype(DType::F64)?;
                    g.to_device(&Device::Cpu)?.narrow(2, 0, columns)
                };
                let (dq, dk, dv) = (grad(&gq, t)?, grad(&gkbuf, s)?, grad(&gvbuf, s)?);
                for buf in [&gkbuf, &gvbuf] {
                    let spare = grad(buf, cap)?.narrow(2, s, cap - s)?;
                    assert_eq!(
                        max_abs_diff(&spare, &spare.zeros_like()?),
                        0.0,
                        "spare columns"
                    );
                }
                for (name, got, on_cpu) in [("q", &dq, &cq), ("k", &dk, &ck), ("v", &dv, &cv)] {
                    let want = g_cpu.get(on_cpu).expect("grad");
                    let size = want
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f64>()?
                        .max(1.0);
                    let diff = max_abs_diff(got, want) / size;
                    assert!(
                        diff < grad_tol,
                        "{dtype:?} d{name} {b}x{nh}/{nkv}x{t}/{s}x{hd}: {diff}"
                    );
                }
                // A second backward pass through the same graph finds the forward's saved
                // log-sum-exp taken and runs the forward kernel for it: the same bits.
                let g_again = (out.to_dtype(DType::F32)?
                    * weights.to_dtype(DType::F32)?.to_device(&gpu)?)?
                .sum_all()?
                .backward()?;
                for (name, var) in [("q", &gq), ("k", &gkbuf), ("v", &gvbuf)] {
                    let (first, again) = (
                        g_gpu.get(var).expect("grad").to_device(&Device::Cpu)?,
                        g_again.get(var).expect("grad").to_device(&Device::Cpu)?,
                    );
                    assert_eq!(
                        max_abs_diff(&first.to_dtype(DType::F64)?, &again.to_dtype(DType::F64)?),
                        0.0,
                        "{dtype:?} d{name} with the saved and the recomputed lse"
                    );
                }
            }
        }
        Ok(())
    }

    /// The AVX2 builds of the kernels give the same bits as the portable ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_the_portable_build_bit_for_bit() -> Result<()> {
        if !has_avx2_fma() {
            return Ok(());
        }
        let flat = |x: &Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        for (t, s) in [(19, 19), (3, 40)] {
            let (b, nh, nkv, hd) = (2, 4, 2, 8);
            let (q, k, v, g) = (
                random((b, nh, t, hd), 1)?,
                random((b, nkv, s, hd), 2)?,
                random((b, nkv, s, hd), 3)?,
                random((b, nh, t, hd), 4)?,
            );
            let (q, k, v, g) = (flat(&q)?, flat(&k)?, flat(&v)?, flat(&g)?);
            let pads = [0, 5];
            let d = Dims {
                b,
                nh,
                nkv,
                t,
                s,
                hd,
            };
            fn blocks(x: &[f32], dims: (usize, usize, usize, usize)) -> Result<KvBlocks<'_, f32>> {
                KvBlocks::of(x, &Layout::contiguous(dims), "kv")
            }
            let kv_dims = (b, nkv, s, hd);
            let row = t * hd;
            let (mut plain, mut wide) = (vec![0f32; b * nh * row], vec![0f32; b * nh * row]);
            for bh in 0..b * nh {
                forward_head(
                    &q,
                    blocks(&k, kv_dims)?,
                    blocks(&v, kv_dims)?,
                    d,
                    &pads,
                    0.35,
                    bh,
                    &mut plain[bh * row..(bh + 1) * row],
                );
                unsafe {
                    forward_head_avx2(
                        &q,
                        blocks(&k, kv_dims)?,
                        blocks(&v, kv_dims)?,
                        d,
                        &pads,
                        0.35,
                        bh,
                        &mut wide[bh * row..(bh + 1) * row],
                    )
                };
            }
            assert_eq!(
                plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                wide.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let x = Inputs {
                q: &q,
                k: &k,
                v: &v,
                dout: &g,
            };
            let (qg, kvh) = (nh / nkv * row, s * hd);
            for c in 0..b * nkv {
                let mut a = (vec![0f32; qg], vec![0f32; kvh], vec![0f32; kvh]);
                let mut w = a.clone();
                backward_group(x, d, &pads, 0.35, c, &mut a.0, &mut a.1, &mut a.2);
                unsafe { backward_group_avx2(x, d, &pads, 0.35, c, &mut w.0, &mut w.1, &mut w.2) };
                for (p, q) in [(&a.0, &w.0), (&a.1, &w.1), (&a.2, &w.2)] {
                    assert_eq!(
                        p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        q.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
        Ok(())
    }

    /// Keys and values handed over transposed (as a decoding cache stores them, with spare
    /// columns) give the same bits as contiguous ones, for prefill and decode shapes.
    #[test]
    fn transposed_cache_views_match_contiguous_inputs() -> Result<()> {
        for (t, s) in [(12, 12), (1, 30), (3, 30)] {
            let (b, nh, nkv, hd, cap) = (2, 4, 2, 8, 37);
            let q = random((b, nh, t, hd), 5)?.to_dtype(DType::F32)?;
            let k = random((b, nkv, s, hd), 6)?.to_dtype(DType::F32)?;
            let v = random((b, nkv, s, hd), 7)?.to_dtype(DType::F32)?;
            let as_view = |x: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, nkv, hd, cap), DType::F32, &Device::Cpu)?;
                buf.slice_set(&x.transpose(2, 3)?.contiguous()?, 3, 0)?;
                buf.narrow(3, 0, s)?.transpose(2, 3)
            };
            let (kv, vv) = (as_view(&k)?, as_view(&v)?);
            assert!(!kv.is_contiguous());
            let pads = [0, 4];
            let want = causal_attention(&q, &k, &v, &pads, 0.35)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let got = causal_attention(&q, &kv, &vv, &pads, 0.35)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if t >= DECODE_ROWS {
                assert_eq!(want, got, "t {t}");
            } else {
                // Decode shapes read row-major blocks differently; equal up to rounding.
                for (a, b) in want.iter().zip(&got) {
                    assert!((a - b).abs() <= 1e-5, "t {t}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn single_visible_key_copies_its_value() -> Result<()> {
        // Hand-worked: the first real query of a row sees only itself, so its output is v there.
        let q = random((1, 1, 3, 2), 7)?;
        let k = random((1, 1, 3, 2), 8)?;
        let v = Tensor::from_vec(
            vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0],
            (1, 1, 3, 2),
            &Device::Cpu,
        )?;
        let out = causal_attention(&q, &k, &v, &[1], 1.0)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert_eq!(&out[0..2], &[1.0, 2.0]); // padding query 0 sees key 0 only
        assert_eq!(&out[2..4], &[3.0, 4.0]); // query 1 = first real token sees key 1 only
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let q = random((1, 3, 2, 2), 1)?;
        let k = random((1, 2, 2, 2), 2)?;
        let err = causal_attention(&q, &k, &k, &[0], 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of kv_heads"), "{err}");
        Ok(())
    }
}
