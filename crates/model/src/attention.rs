//! Fused causal attention for the CPU: `softmax(q·kᵀ·scale + mask)·v` one query row at a time,
//! with its own backward pass, so no `[t, s]` score tensor is ever materialized.
//!
//! On a CPU the composed candle ops (matmul, mask add, softmax, matmul and their gradients) spend
//! most of a training step streaming `[batch, heads, t, s]` score tensors through memory; for
//! small head dims (stories260K: 8) the arithmetic is tiny in comparison. This op computes each
//! query row's softmax in a scratch vector instead and recomputes it in the backward pass (the
//! flash-attention recipe). Other devices use the composed ops.
//!
//! Masking matches [`crate::KvCache::next_mask`]: the `t` query columns are the last `t` of the
//! `s` key columns; query column `c` of batch row `b` sees key columns `pad[b]..=c`, or `0..=c`
//! when `c` is itself a padding column (its output is discarded; this keeps the softmax finite).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Range, Sub};

/// The float types the kernel runs in (f32 for models, f64 for exactness tests).
trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + AddAssign
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    /// Replaces the non-empty, finite `p` by `softmax(p)`.
    fn softmax_in_place(p: &mut [Self]);
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn softmax_in_place(p: &mut [Self]) {
        crate::fastmath::softmax_in_place(p)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    fn softmax_in_place(p: &mut [Self]) {
        let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for x in p.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in p.iter_mut() {
            *x /= sum;
        }
    }
}

/// Sizes of one attention call: q `[b, nh, t, hd]`, k and v `[b, nkv, s, hd]`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize], v: &[usize], pads: usize) -> Result<Self> {
        let (&[b, nh, t, hd], &[kb, nkv, s, khd]) = (q, k) else {
            candle_core::bail!(
                "causal_attention: q {q:?} and k {k:?} must both be [batch, heads, seq, head_dim]"
            )
        };
        if v != k || kb != b || khd != hd || nkv == 0 || nh % nkv != 0 || t > s || pads != b {
            candle_core::bail!(
                "causal_attention: q {q:?}, k {k:?}, v {v:?} with {pads} pads: expected k = v = \
                 [batch, kv_heads, s >= t, head_dim] with heads a multiple of kv_heads and one pad per row"
            );
        }
        Ok(Self {
            b,
            nh,
            nkv,
            t,
            s,
            hd,
        })
    }
}

/// Key columns visible to query column `col` of a row with `pad` padding columns.
#[inline(always)]
fn visible(pad: usize, col: usize) -> Range<usize> {
    if col >= pad {
        pad..col + 1
    } else {
        0..col + 1
    }
}

/// `Σ a_i b_i` with eight independent partial sums, so that the loop vectorizes.
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    for a in acc {
        sum += a;
    }
    sum
}

/// `y += alpha · x`.
#[inline(always)]
fn axpy<T: Float>(y: &mut [T], alpha: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `[s, hd]` row-major → `[hd, s]` row-major, so that loops over keys run over contiguous memory.
#[inline(always)]
fn transpose<T: Float>(x: &[T], s: usize, hd: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; s * hd];
    for j in 0..s {
        for c in 0..hd {
            out[c * s + j] = x[j * hd + c];
        }
    }
    out
}

/// Fills `p[keys]` with the softmax of `scale · qi·k_j` over the visible keys; `kt` holds the
/// keys transposed, channel `c` of key `j` at `kt[c * stride + j]`.
#[inline(always)]
fn softmax_row<T: Float>(
    qi: &[T],
    kt: &[T],
    stride: usize,
    keys: Range<usize>,
    scale: T,
    p: &mut [T],
) {
    let p = &mut p[keys.clone()];
    p.fill(T::ZERO);
    for (c, &qc) in qi.iter().enumerate() {
        axpy(
            p,
            qc * scale,
            &kt[c * stride + keys.start..c * stride + keys.end],
        );
    }
    T::softmax_in_place(p);
}

fn forward<T: Float>(
    q: &[T],
    k: KvBlocks<T>,
    v: KvBlocks<T>,
    d: Dims,
    pads: &[usize],
    scale: T,
) -> Vec<T> {
    let row = d.t * d.hd;
    let mut out = vec![T::ZERO; d.b * d.nh * row];
    let avx2 = has_avx2_fma();
    out.par_chunks_mut(row).enumerate().for_each(|(bh, out)| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { forward_head_avx2(q, k, v, d, pads, scale, bh, out) };
        }
        let _ = avx2;
        forward_head(q, k, v, d, pads, scale, bh, out)
    });
    out
}

/// Whether the kernels may run their AVX2 + FMA builds. The results are the same bit for bit
/// (Rust never fuses a multiply and an add on its own, and the reductions have fixed lanes);
/// only the vector width changes.
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_head_avx2<T: Float>(
    q: &[T],
    k: KvBlocks<T>,
    v: KvBlocks<T>,
    d: Dims,
    pads: &[usize],
    scale: T,
    bh: usize,
    out: &mut [T],
) {
    forward_head(q, k, v, d, pads, scale, bh, out)
}

/// Output rows `out: [t, hd]` of (batch row, head) `bh`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_head<T: Float>(
    q: &[T],
    k: KvBlocks<T>,
    v: KvBlocks<T>,
    d: Dims,
    pads: &[usize],
    scale: T,
    bh: usize,
    out: &mut [T],
) {
    let (rep, row) = (d.nh / d.nkv, d.t * d.hd);
    let (bi, h) = (bh / d.nh, bh % d.nh);
    let qh = &q[bh * row..(bh + 1) * row];
    if let (Some((kt, ks)), Some((vt, vs))) = (k.transposed(bi, h / rep), v.transposed(bi, h / rep))
    {
        // A decoding cache's view: the keys are already transposed.
        return attend_rows(qh, kt, ks, vt, vs, d, pads[bi], scale, out);
    }
    let (kh, vh) = (k.row_major(bi, h / rep), v.row_major(bi, h / rep));
    if d.t < DECODE_ROWS {
        decode_rows(qh, kh, vh, d, pads[bi], scale, out);
        return;
    }
    let kt = transpose(kh, d.s, d.hd);
    let vt = transpose(vh, d.s, d.hd);
    attend_rows(qh, &kt, d.s, &vt, d.s, d, pads[bi], scale, out)
}

/// Output rows `out: [t, hd]` of one (batch row, head) from transposed keys and values
/// (channel `c` of column `j` at `kt[c * ks + j]`, `vt[c * vs + j]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_rows<T: Float>(
    qh: &[T],
    kt: &[T],
    ks: usize,
    vt: &[T],
    vs: usize,
    d: Dims,
    pad: usize,
    scale: T,
    out: &mut [T],
) {
    let mut p = vec![T::ZERO; d.s];
    for i in 0..d.t {
        let keys = visible(pad, d.s - d.t + i);
        softmax_row(
            &qh[i * d.hd..(i + 1) * d.hd],
            kt,
            ks,
            keys.clone(),
            scale,
            &mut p,
        );
        for (c, o) in out[i * d.hd..(i + 1) * d.hd].iter_mut().enumerate() {
            *o = dot(
                &p[keys.clone()],
                &vt[c * vs + keys.start..c * vs + keys.end],
            );
        }
    }
}

/// Below this many query rows (incremental decoding), attend over the keys in their stored
/// `[s, hd]` layout: transposing the whole cache for one query would cost more than it saves.
const DECODE_ROWS: usize = 8;

/// Forward of one (batch row, head) for a few query rows, on row-major `k, v: [s, hd]`.
#[inline(always)]
fn decode_rows<T: Float>(qh: &[T], k: &[T], v: &[T], d: Dims, pad: usize, scale: T, out: &mut [T]) {
    let mut p = vec![T::ZERO; d.s];
    for i in 0..d.t {
        let keys = visible(pad, d.s - d.t + i);
        let qi = &qh[i * d.hd..(i + 1) * d.hd];
        for j in keys.clone() {
            p[j] = dot(qi, &k[j * d.hd..(j + 1) * d.hd]) * scale;
        }
        T::softmax_in_place(&mut p[keys.clone()]);
        let oi = &mut out[i * d.hd..(i + 1) * d.hd];
        for j in keys {
            axpy(oi, p[j], &v[j * d.hd..(j + 1) * d.hd]);
        }
    }
}

/// Gradients `(dq, dk, dv)` for output gradient `dout` (`[b, nh, t, hd]`).
fn backward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    d: Dims,
    pads: &[usize],
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let rep = d.nh / d.nkv;
    let (q_group, kv_head) = (rep * d.t * d.hd, d.s * d.hd);
    let mut dq = vec![T::ZERO; d.b * d.nh * d.t * d.hd];
    let mut dk = vec![T::ZERO; d.b * d.nkv * kv_head];
    let mut dv = vec![T::ZERO; d.b * d.nkv * kv_head];
    let avx2 = has_avx2_fma();
    let x = Inputs { q, k, v, dout };
    // One task per (batch row, kv head): it owns that kv head's dk/dv and its query heads' dq.
    dq.par_chunks_mut(q_group)
        .zip(dk.par_chunks_mut(kv_head).zip(dv.par_chunks_mut(kv_head)))
        .enumerate()
        .for_each(|(c, (dq, (dk, dv)))| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { backward_group_avx2(x, d, pads, scale, c, dq, dk, dv) };
            }
            let _ = avx2;
            backward_group(x, d, pads, scale, c, dq, dk, dv)
        });
    (dq, dk, dv)
}

/// The forward inputs and the output gradient of a backward pass (contiguous).
#[derive(Clone, Copy)]
struct Inputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_group_avx2<T: Float>(
    x: Inputs<T>,
    d: Dims,
    pads: &[usize],
    scale: T,
    c: usize,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    backward_group(x, d, pads, scale, c, dq, dk, dv)
}

/// Gradients of (batch row, kv head) `c`: its `dk, dv: [s, hd]` and its query heads' dq.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group<T: Float>(
    x: Inputs<T>,
    d: Dims,
    pads: &[usize],
    scale: T,
    c: usize,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let Inputs { q, k, v, dout } = x;
    let rep = d.nh / d.nkv;
    let (q_group, kv_head) = (rep * d.t * d.hd, d.s * d.hd);
    let (bi, s, hd) = (c / d.nkv, d.s, d.hd);
    let kt = transpose(&k[c * kv_head..(c + 1) * kv_head], s, hd);
    let vt = transpose(&v[c * kv_head..(c + 1) * kv_head], s, hd);
    let (mut dkt, mut dvt) = (vec![T::ZERO; kv_head], vec![T::ZERO; kv_head]);
    let (mut p, mut ds) = (vec![T::ZERO; s], vec![T::ZERO; s]);
    for r in 0..rep {
        for i in 0..d.t {
            let at = c * q_group + (r * d.t + i) * hd;
            let (qi, doi) = (&q[at..at + hd], &dout[at..at + hd]);
            let keys = visible(pads[bi], s - d.t + i);
            let (lo, hi) = (keys.start, keys.end);
            softmax_row(qi, &kt, s, keys, scale, &mut p);
            // dp_j = do_i · v_j, then ds_j = p_j (dp_j - Σ_l p_l dp_l) · scale.
            let ds = &mut ds[lo..hi];
            ds.fill(T::ZERO);
            for (c, &g) in doi.iter().enumerate() {
                axpy(ds, g, &vt[c * s + lo..c * s + hi]);
            }
            let p = &p[lo..hi];
            let p_dot_dp = dot(p, ds);
            for (x, &pj) in ds.iter_mut().zip(p) {
                *x = pj * (*x - p_dot_dp) * scale;
            }
            let dqi = &mut dq[(r * d.t + i) * hd..(r * d.t + i + 1) * hd];
            for c in 0..hd {
                dqi[c] = dot(ds, &kt[c * s + lo..c * s + hi]);
                axpy(&mut dkt[c * s + lo..c * s + hi], qi[c], ds);
                axpy(&mut dvt[c * s + lo..c * s + hi], doi[c], p);
            }
        }
    }
    for j in 0..s {
        for c in 0..hd {
            dk[j * hd + c] = dkt[c * s + j];
            dv[j * hd + c] = dvt[c * s + j];
        }
    }
}

/// The op: per-row left paddings and the score scale (usually `1/√head_dim`).
#[derive(Debug, Clone)]
struct CausalAttention {
    pads: Vec<usize>,
    scale: f64,
}

/// The `[s, hd]` blocks of k or v (`[b, kv_heads, s, hd]`), each either row-major (`[s, hd]`
/// contiguous) or transposed (each channel's `s` values contiguous, as a decoding
/// [`crate::KvCache`] hands them out), the blocks at any strides.
#[derive(Clone, Copy)]
struct KvBlocks<'a, T> {
    data: &'a [T],
    start: usize,
    stride_b: usize,
    stride_h: usize,
    /// Distance between channels when transposed (`None`: row-major).
    channel_stride: Option<usize>,
    s: usize,
    hd: usize,
}

impl<'a, T> KvBlocks<'a, T> {
    fn of(data: &'a [T], l: &Layout, what: &str) -> Result<Self> {
        let (dims, st) = (l.dims(), l.stride());
        let (&[b, h, s, hd], &[sb, sh, ss, sc]) = (dims, st) else {
            candle_core::bail!(
                "causal_attention: {what} must be [batch, kv_heads, seq, head_dim], got {dims:?}"
            )
        };
        let channel_stride = match block_layout(s, hd, ss, sc) {
            Some(BlockLayout::RowMajor) => None,
            Some(BlockLayout::Transposed) => Some(sc),
            None => candle_core::bail!("causal_attention: the [seq, head_dim] blocks of {what} must be contiguous or transposed (strides {st:?})"),
        };
        let block_end = match channel_stride {
            None => s * hd,
            Some(sc) => (hd.max(1) - 1) * sc + s,
        };
        let end = l.start_offset() + (b.max(1) - 1) * sb + (h.max(1) - 1) * sh + block_end;
        if end > data.len() {
            candle_core::bail!(
                "causal_attention: {what} reaches element {end} of a storage of {}",
                data.len()
            )
        }
        Ok(Self {
            data,
            start: l.start_offset(),
            stride_b: sb,
            stride_h: sh,
            channel_stride,
            s,
            hd,
        })
    }

    fn base(&self, b: usize, h: usize) -> usize {
        self.start + b * self.stride_b + h * self.stride_h
    }

    /// Block `(b, h)` as `[s, hd]` row-major (the blocks must be row-major).
    fn row_major(&self, b: usize, h: usize) -> &'a [T] {
        debug_assert!(self.channel_stride.is_none());
        let at = self.base(b, h);
        &self.data[at..at + self.s * self.hd]
    }

    /// Block `(b, h)` transposed, with its channel stride, if the blocks are stored so.
    fn transposed(&self, b: usize, h: usize) -> Option<(&'a [T], usize)> {
        let sc = self.channel_stride?;
        let at = self.base(b, h);
        Some((&self.data[at..at + (self.hd.max(1) - 1) * sc + self.s], sc))
    }
}

enum BlockLayout {
    RowMajor,
    Transposed,
}

/// How an `[s, hd]` block with strides `(ss, sc)` lies in memory, if the kernel can read it.
fn block_layout(s: usize, hd: usize, ss: usize, sc: usize) -> Option<BlockLayout> {
    if (sc == 1 || hd <= 1) && (ss == hd || s <= 1) {
        Some(BlockLayout::RowMajor)
    } else if ss == 1 && sc >= s {
        Some(BlockLayout::Transposed)
    } else {
        None
    }
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(q.dims(), k.dims(), v.dims(), self.pads.len())?;
        let dev = q.device();
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

/// Whether [`causal_attention`] runs on tensors of this device and dtype (CPU, f32 or f64).
pub fn fused_attention_supported(dev: &Device, dtype: DType) -> bool {
    dev.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// Causal grouped-query attention with left padding: `q: [b, heads, t, head_dim]`,
/// `k, v: [b, kv_heads, s, head_dim]` (s ≥ t; the queries are the last t columns),
/// `pads[b]` padding columns at the left of row b → `[b, heads, t, head_dim]`.
/// Query head `h` attends kv head `h / (heads / kv_heads)`. Differentiable in q, k and v.
/// CPU only (see [`fused_attention_supported`]). k and v may be views whose `[s, head_dim]`
/// blocks are contiguous or transposed (as [`crate::KvCache`] hands out); anything else is
/// copied first.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let op = CausalAttention {
        pads: pads.to_vec(),
        scale,
    };
    q.contiguous()?
        .apply_op3(&blocks_contiguous(k)?, &blocks_contiguous(v)?, op)
}

/// `x` itself if the kernel reads its `[s, hd]` blocks as they are, else a contiguous copy.
fn blocks_contiguous(x: &Tensor) -> Result<Tensor> {
    match (x.dims(), x.stride()) {
        (&[_, _, s, hd], &[_, _, ss, sc]) if block_layout(s, hd, ss, sc).is_some() => Ok(x.clone()),
        _ => x.contiguous(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut state = seed;
        let data: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
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
