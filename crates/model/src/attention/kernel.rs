//! The arithmetic of the fused CPU attention: each query row's masked softmax in a scratch
//! vector, the output rows, and the flash-attention backward that recomputes the softmax;
//! parallel over (batch row, head) with rayon, in AVX2 + FMA builds where the CPU has them.

use super::blocks::KvBlocks;
use candle_core::Result;
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Range, Sub};

/// The float types the kernel runs in (f32 for models, f64 for exactness tests).
pub(super) trait Float:
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
pub(super) struct Dims {
    pub b: usize,
    pub nh: usize,
    pub nkv: usize,
    pub t: usize,
    pub s: usize,
    pub hd: usize,
}

impl Dims {
    pub(super) fn of(q: &[usize], k: &[usize], v: &[usize], pads: usize) -> Result<Self> {
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

pub(super) fn forward<T: Float>(
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
pub(super) fn has_avx2_fma() -> bool {
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
pub(super) unsafe fn forward_head_avx2<T: Float>(
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
pub(super) fn forward_head<T: Float>(
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
pub(super) const DECODE_ROWS: usize = 8;

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
pub(super) fn backward<T: Float>(
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
pub(super) struct Inputs<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub dout: &'a [T],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn backward_group_avx2<T: Float>(
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
pub(super) fn backward_group<T: Float>(
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
