//! The composed attention's softmax with its score scale and its causal / left-padding mask
//! applied inside, as one op with its own backward pass, for CUDA (kernels/causal_softmax.cu).
//!
//! The composed attention adds a `[b, 1, 1, t, s]` mask of 0 / -inf to the `[b, kv_heads,
//! rep·t, s]` scores (a read and a write of every score) before the softmax, and candle's
//! softmax has no backward pass, so training composed one from five ops (`g·y`, its row sums,
//! `g - dot`, the product: nine passes over the scores). At seq 1024, batch 4 and 32 heads each
//! pass is 268 MB per layer in bf16. This op reads the scores once and writes the
//! probabilities once; its backward reads `y` and `g` once and writes `dx` once. Visible keys
//! are those of [`crate::KvCache::next_mask`]: query column `q` (the last `t` of the `s` key
//! columns) of batch row `b` sees `pad[b]..=q`, or `0..=q` when `q` is itself a padding column.
//! The scale (`1/√head_dim`) is applied inside too, so neither q nor the scores take a pass of
//! their own, and the paddings come as a device tensor made once per forward pass, not uploaded
//! by every layer. The CPU implementation is the reference the kernels are tested against;
//! [`crate::Llama`] uses the op on CUDA only (`QAT_CUDA_FUSED_SOFTMAX=0` keeps the mask add and
//! the softmax).

use crate::custom_op::contiguous_range;
use crate::kernel_switch::{switch_on, FLOAT_DTYPES};
use crate::softmax::num_like;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

/// Whether [`crate::Llama`] runs its composed attention's softmax through [`causal_softmax`] on
/// `dev` in `dtype`: CUDA (a `cuda` build), f32 / bf16 / f16, `QAT_CUDA_FUSED_SOFTMAX` not `0`.
pub fn causal_softmax_on(dev: &Device, dtype: DType) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if tests::ON_CPU.get() {
        return true;
    }
    cfg!(feature = "cuda")
        && dev.is_cuda()
        && FLOAT_DTYPES.contains(&dtype)
        && switch_on(&ON, "QAT_CUDA_FUSED_SOFTMAX")
}

/// `softmax(scale · scores + mask)` over the last dim, differentiable: `scores: [b, .., s]`
/// with rows ordered query-last (row `r` of batch row `b` is query `r % t`), `pads: [b]` u32 (on
/// the scores' device) the left-padding columns per batch row, `t` queries (the last `t` of the
/// `s` columns). Hidden keys get probability 0. The backward pass keeps only the output.
pub fn causal_softmax(scores: &Tensor, pads: &Tensor, t: usize, scale: f64) -> Result<Tensor> {
    let dims = scores.dims();
    let (b, s) = (
        dims.first().copied().unwrap_or(0),
        dims.last().copied().unwrap_or(0),
    );
    let rows = scores.elem_count() / s.max(1);
    let pads_fit = pads.dtype() == DType::U32 && pads.dims() == [b];
    if dims.len() < 2 || !pads_fit || t == 0 || t > s || !rows.is_multiple_of((b * t).max(1)) {
        candle_core::bail!(
            "causal_softmax: scores {dims:?} with pads {:?} {:?} and t {t}: expected [batch, .., \
             rows of t queries, s >= t] and u32 pads [batch]",
            pads.dims(),
            pads.dtype()
        );
    }
    let op = CausalSoftmax {
        t,
        scale: scale as f32,
    };
    scores.contiguous()?.apply_op2(&pads.contiguous()?, op)
}

/// [`causal_softmax`]'s `pads` from host paddings, on `dev`.
pub fn pads_tensor(pads: &[usize], dev: &Device) -> Result<Tensor> {
    let pads: Vec<u32> = pads.iter().map(|&p| p as u32).collect();
    let n = pads.len();
    Tensor::from_vec(pads, n, dev)
}

/// The forward op, on (scores, pads).
#[derive(Debug, Clone, Copy)]
struct CausalSoftmax {
    t: usize,
    scale: f32,
}

/// Row `row`'s visible key range `lo..hi` (as kernels/causal_softmax.cu's `visible`).
fn visible(row: usize, rows_per_batch: usize, t: usize, s: usize, pads: &[u32]) -> (usize, usize) {
    let pad = pads[row / rows_per_batch] as usize;
    let q = s - t + row % t;
    (if q >= pad { pad } else { 0 }, q + 1)
}

/// The forward on host rows of f32 or f64 (the reference).
fn cpu_forward<F: num_like::Float>(x: &[F], s: usize, pads: &[u32], t: usize, scale: F) -> Vec<F> {
    let rows_per_batch = x.len() / s / pads.len().max(1);
    let mut y = vec![F::zero(); x.len()];
    for (row, (xr, yr)) in x.chunks(s).zip(y.chunks_mut(s)).enumerate() {
        let (lo, hi) = visible(row, rows_per_batch, t, s, pads);
        let m = xr[lo..hi]
            .iter()
            .map(|&v| v * scale)
            .fold(F::neg_infinity(), F::max);
        let mut sum = F::zero();
        for (o, &v) in yr[lo..hi].iter_mut().zip(&xr[lo..hi]) {
            *o = (v * scale - m).exp();
            sum = sum + *o;
        }
        yr[lo..hi].iter_mut().for_each(|o| *o = *o / sum);
    }
    y
}

/// The elements of a contiguous operand (`what` names it in the error).
fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    let (a, b) = contiguous_range(l, "causal_softmax", what)?;
    Ok(&data[a..b])
}

impl CustomOp2 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        pads: &CpuStorage,
        pads_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = layout.dims().last().copied().unwrap_or(1).max(1);
        let CpuStorage::U32(pads) = pads else {
            candle_core::bail!("causal_softmax: pads must be u32");
        };
        let pads = contiguous(pads, pads_layout, "pads")?;
        let out = match storage {
            CpuStorage::F32(x) => {
                let x = contiguous(x, layout, "scores")?;
                CpuStorage::F32(cpu_forward(x, s, pads, self.t, self.scale))
            }
            CpuStorage::F64(x) => {
                let x = contiguous(x, layout, "scores")?;
                CpuStorage::F64(cpu_forward(x, s, pads, self.t, f64::from(self.scale)))
            }
            other => candle_core::bail!(
                "causal_softmax on the CPU: {:?}, expected F32/F64",
                other.dtype()
            ),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
        pads: &candle_core::CudaStorage,
        pads_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::forward(*self, (storage, layout), (pads, pads_layout))?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _pads: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = SoftmaxBackward { scale: self.scale };
        let dx = y.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((Some(dx), None))
    }
}

/// The backward op: `(y, g)` → `scale · y · (g - Σ g·y)` per row of the last dim.
#[derive(Debug, Clone, Copy)]
struct SoftmaxBackward {
    scale: f32,
}

fn cpu_backward<F: num_like::Float>(y: &[F], g: &[F], s: usize, scale: F) -> Vec<F> {
    let mut dx = vec![F::zero(); y.len()];
    for ((yr, gr), dr) in y.chunks(s).zip(g.chunks(s)).zip(dx.chunks_mut(s)) {
        let dot = yr
            .iter()
            .zip(gr)
            .fold(F::zero(), |acc, (&a, &b)| acc + a * b);
        for ((d, &a), &b) in dr.iter_mut().zip(yr).zip(gr) {
            *d = scale * a * (b - dot);
        }
    }
    dx
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = ly.dims().last().copied().unwrap_or(1).max(1);
        let out = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(cpu_backward(
                contiguous(y, ly, "y")?,
                contiguous(g, lg, "the gradient")?,
                s,
                self.scale,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(cpu_backward(
                contiguous(y, ly, "y")?,
                contiguous(g, lg, "the gradient")?,
                s,
                f64::from(self.scale),
            )),
            _ => candle_core::bail!("causal_softmax backward on the CPU: F32 or F64 expected"),
        };
        Ok((out, ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        ly: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::backward(self.scale, y, ly, g, lg)?;
        Ok((out, ly.shape().clone()))
    }
}

/// The CUDA side: kernels/causal_softmax.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use super::CausalSoftmax;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/causal_softmax.ptx"));
    const BLOCK: u32 = 256; // CS_BLOCK

    fn rows_grid(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        crate::kernel_switch::float_kernel_suffix(dtype, "causal_softmax")
    }

    fn range(l: &Layout) -> Result<(usize, usize)> {
        crate::custom_op::contiguous_range(l, "causal_softmax", "operands")
    }

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn forward(
        op: CausalSoftmax,
        x: Operand<'_>,
        pads: Operand<'_>,
    ) -> Result<CudaStorage> {
        match x.0.dtype() {
            DType::BF16 => forward_as::<half::bf16>(op, x, pads),
            DType::F16 => forward_as::<half::f16>(op, x, pads),
            _ => forward_as::<f32>(op, x, pads),
        }
    }

    fn forward_as<T: CudaDType + DeviceRepr>(
        op: CausalSoftmax,
        (x, l): Operand<'_>,
        (pads, lp): Operand<'_>,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let name = format!("causal_softmax_{}", suffix(x.dtype())?);
        let func = dev.get_or_load_custom_func(&name, "qat_causal_softmax", PTX)?;
        let ((a, b), (pa, pb)) = (range(l)?, range(lp)?);
        let s = l.dims().last().copied().unwrap_or(1).max(1);
        let rows = (b - a) / s;
        let rows_per_batch = (rows / (pb - pa).max(1)) as u32;
        let xs = x.as_cuda_slice::<T>()?.slice(a..b);
        let ps = pads.as_cuda_slice::<u32>()?.slice(pa..pb);
        // SAFETY: the kernel writes every element of every row (0 outside the visible keys).
        let y = unsafe { dev.alloc::<T>(b - a)? };
        let (t, s) = (op.t as u32, s as u32);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&y).arg(&ps);
        builder.arg(&rows_per_batch).arg(&t).arg(&s).arg(&op.scale);
        // SAFETY: x and y hold rows · s T, pads one u32 per batch row (checked by the caller).
        unsafe { builder.launch(rows_grid(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    pub(super) fn backward(
        scale: f32,
        y: &CudaStorage,
        ly: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        match y.dtype() {
            DType::BF16 => backward_as::<half::bf16>(scale, y, ly, g, lg),
            DType::F16 => backward_as::<half::f16>(scale, y, ly, g, lg),
            _ => backward_as::<f32>(scale, y, ly, g, lg),
        }
    }

    fn backward_as<T: CudaDType + DeviceRepr>(
        scale: f32,
        y: &CudaStorage,
        ly: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        let dev = y.device().clone();
        let name = format!("softmax_backward_{}", suffix(y.dtype())?);
        let func = dev.get_or_load_custom_func(&name, "qat_causal_softmax", PTX)?;
        let ((ya, yb), (ga, gb)) = (range(ly)?, range(lg)?);
        if yb - ya != gb - ga || g.dtype() != y.dtype() {
            candle_core::bail!("causal_softmax backward: the gradient does not match y");
        }
        let s = ly.dims().last().copied().unwrap_or(1).max(1);
        let ys = y.as_cuda_slice::<T>()?.slice(ya..yb);
        let gs = g.as_cuda_slice::<T>()?.slice(ga..gb);
        // SAFETY: the kernel writes every element.
        let dx = unsafe { dev.alloc::<T>(yb - ya)? };
        let s32 = s as u32;
        let mut builder = func.builder();
        builder.arg(&ys).arg(&gs).arg(&dx).arg(&s32).arg(&scale);
        // SAFETY: y, g and dx hold rows · s T.
        unsafe { builder.launch(rows_grid((yb - ya) / s)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::custom_op::max_abs_diff;
    use candle_core::{Var, D};
    use std::cell::Cell;

    thread_local! {
        /// Unit tests of the model's wiring can turn the op on for CPU tensors.
        pub(crate) static ON_CPU: Cell<bool> = const { Cell::new(false) };
    }

    /// The composed ops the op replaces: the scores scaled, the mask of KvCache::next_mask
    /// added, then softmax.
    fn composed(x: &Tensor, pads: &[usize], t: usize, scale: f64) -> Result<Tensor> {
        let x = (x * scale)?;
        let dims = x.dims().to_vec();
        let (b, s) = (dims[0], dims[dims.len() - 1]);
        let rows = x.elem_count() / s / b;
        let mut cache = crate::KvCache::new(1, pads.to_vec());
        cache.advance(s - t);
        let Some(mask) = cache.next_mask(t, x.device())? else {
            return candle_nn::ops::softmax(&x, D::Minus1); // nothing hidden
        };
        let mask = mask.to_dtype(x.dtype())?; // [b or 1, 1, 1, t, s]
        let mask = mask.reshape((mask.dim(0)?, 1, t, s))?;
        let y = x.reshape((b, rows / t, t, s))?.broadcast_add(&mask)?;
        candle_nn::ops::softmax(&y, D::Minus1)?.reshape(dims)
    }

    fn random(dims: &[usize], seed: u64) -> Result<Tensor> {
        crate::custom_op::lcg_tensor(dims, seed, -4.0, 4.0)
    }

    fn op(x: &Tensor, pads: &[usize], t: usize, scale: f64) -> Result<Tensor> {
        causal_softmax(x, &pads_tensor(pads, x.device())?, t, scale)
    }

    /// Value and gradient against the composed ops in f64: left padding (real and padding
    /// queries), a decode chunk (t = 1) and a chunk after cached columns (t < s), grouped heads,
    /// scales 1, 1/8 (head dim 64) and 0.375. (The op keeps its scale in f32: these are exact.)
    #[test]
    fn value_and_gradient_match_the_mask_add_and_softmax() -> Result<()> {
        for (pads, t, s, heads, scale) in [
            (vec![0, 3, 5], 6, 6, 2, 1.0),
            (vec![0, 0], 1, 9, 3, 0.125),
            (vec![2, 0, 4], 3, 8, 4, 0.375),
            (vec![0], 5, 5, 1, 0.125),
        ] {
            let b = pads.len();
            let x = Var::from_tensor(&random(&[b, heads, t, s], 7 + s as u64)?)?;
            let g = random(&[b, heads, t, s], 99)?;
            let got = op(&x, &pads, t, scale)?;
            let want = composed(&x, &pads, t, scale)?;
            assert!(max_abs_diff(&got, &want)? < 1e-14, "pads {pads:?} t {t}");
            let gg = (&got * &g)?.sum_all()?.backward()?;
            let gw = (&want * &g)?.sum_all()?.backward()?;
            let (dg, dw) = (gg.get(&x).expect("grad"), gw.get(&x).expect("grad"));
            assert!(max_abs_diff(dg, dw)? < 1e-13, "pads {pads:?} t {t}");
        }
        Ok(())
    }

    /// A hand-worked row: pads [1], t = s = 3, scale 1/2; query 2 sees keys 1..=2; query 0 (a
    /// padding query) sees key 0 alone.
    #[test]
    fn hand_worked_rows() -> Result<()> {
        let x = Tensor::new(
            &[[[
                [0f64, 5.0, 7.0],
                [1.0, 2.0, 3.0],
                [9.0, 0.0, 2.0 * 2f64.ln()],
            ]]],
            &Device::Cpu,
        )?;
        let y = op(&x, &[1], 3, 0.5)?.flatten_all()?.to_vec1::<f64>()?;
        // Row 0 (query column 0 < pad 1): key 0 only. Row 1 (column 1): key 1 only. Row 2:
        // keys 1, 2 with scaled scores 0 and ln 2 → 1/3, 2/3.
        let want = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0];
        assert!(
            y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-15),
            "{y:?}"
        );
        Ok(())
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() -> Result<()> {
        let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu)?;
        let err = op(&x, &[0], 3, 1.0).unwrap_err().to_string();
        assert!(err.contains("with pads [1] U32 and t 3"), "{err}");
        assert!(op(&x, &[0, 0], 5, 1.0).is_err()); // t > s
        assert!(op(&x, &[0, 0], 2, 1.0).is_err()); // 3 rows per batch row, not of 2
        let f32_pads = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        assert!(causal_softmax(&x, &f32_pads, 3, 1.0).is_err());
        Ok(())
    }

    /// On a GPU (`--features cuda` builds; skipped without one): the kernels against the CPU
    /// op, in value and gradient, f32 and bf16, at an attention shape with left padding.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (pads, t, s, heads, scale) = (vec![0usize, 5, 17, 0], 40, 300, 6, 0.125);
        let x64 = random(&[pads.len(), heads, t, s], 3)?;
        let g64 = random(&[pads.len(), heads, t, s], 4)?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let (x, g) = (x64.to_dtype(dtype)?, g64.to_dtype(dtype)?);
            let xv = Var::from_tensor(&x.to_device(&gpu)?)?;
            let y = op(&xv, &pads, t, scale)?;
            let dx = (&y * &g.to_device(&gpu)?)?.sum_all()?.backward()?;
            let dx = dx.get(&xv).expect("grad").to_device(&Device::Cpu)?;
            let xc = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
            let want = op(&xc, &pads, t, scale)?;
            let dwant = (&want * &g.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let dwant = dwant.get(&xc).expect("grad");
            let y = y.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
            assert!(max_abs_diff(&y, &want)? < tol, "{dtype:?} value");
            assert!(
                max_abs_diff(&dx.to_dtype(DType::F64)?, dwant)? < 4.0 * tol,
                "{dtype:?} gradient"
            );
        }
        Ok(())
    }
}
