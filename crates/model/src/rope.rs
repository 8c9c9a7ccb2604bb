//! Rotary position embeddings (the Hugging Face "rotate half" layout) with per-row positions.
//!
//! On CUDA q and k are rotated by one kernel per tensor whose backward is the same kernel on the
//! gradient with the angle negated (kernels/rope.cu, [`rope_with_grad`]); it reads the queries as
//! a transposed view of their projection and writes their gradient back in that layout, so
//! neither direction copies a transpose. Elsewhere the composition of candle ops, or candle's own
//! kernel (no gradient) in inference.

use crate::custom_op::{storage_from_f64, storage_to_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

/// Precomputed cos/sin tables, `[max_positions, head_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    head_dim: usize,
}

impl RotaryEmbedding {
    /// `inv_freq[i] = theta^(-2i / head_dim)`; `angle(pos, i) = pos * inv_freq[i]`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for i in 0..half {
                // f32 angles, as HF computes them (inv_freq and positions in float32).
                let inv_freq = (1.0f64 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32;
                let angle = pos as f32 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), dev)?.to_dtype(dtype)?;
        Ok(Self { cos, sin, head_dim })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Gathers `(cos, sin)` for `positions: [batch, seq]` (u32) → each `[batch, seq, head_dim/2]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.head_dim / 2;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` (any layout) with tables from
    /// [`Self::tables`] → contiguous `[batch, heads, seq, head_dim]`. On CUDA one op with its own
    /// backward ([`rope_with_grad`], unless `QAT_CUDA_FUSED_ROPE=0`); elsewhere `fused` uses
    /// candle's single kernel (no gradient), and otherwise a differentiable composition.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Tensor> {
        if fused_rope_on(x) {
            return rope_with_grad(x, cos, sin);
        }
        let x = &x.contiguous()?;
        if fused {
            return candle_nn::rotary_emb::rope(x, cos, sin);
        }
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?; // [b, 1, seq, head_dim]
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// The rotation as a custom op: `sign` +1 rotates by the table's angles, −1 by their negation
/// (the backward of the +1 rotation). The output is `[b, heads, t, d]`, or with `token_major`
/// (CUDA only) `[b, t, heads, d]`.
#[derive(Debug, Clone, Copy)]
struct RopeWithGrad {
    sign: f32,
    token_major: bool,
}

impl CustomOp3 for RopeWithGrad {
    fn name(&self) -> &'static str {
        "rope-with-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.token_major {
            candle_core::bail!("rope_with_grad: a token-major output is for CUDA only");
        }
        let (b, h, t, d) = lx.shape().dims4()?;
        let (xs, cs, ss) = (
            storage_to_f64(x, lx, "rope_with_grad")?,
            storage_to_f64(cos, lc, "rope_with_grad")?,
            storage_to_f64(sin, ls, "rope_with_grad")?,
        );
        let half = d / 2;
        let sign = f64::from(self.sign);
        let mut y = vec![0f64; xs.len()];
        for row in 0..b * h * t {
            let (batch, pos) = (row / (h * t), row % t);
            for i in 0..half {
                let table = (batch * t + pos) * half + i;
                let (c, s) = (cs[table], sign * ss[table]);
                let (x1, x2) = (xs[row * d + i], xs[row * d + half + i]);
                y[row * d + i] = x1 * c - x2 * s;
                y[row * d + half + i] = x2 * c + x1 * s;
            }
        }
        Ok((storage_from_f64(x.dtype(), y), lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        cos: &candle_core::CudaStorage,
        lc: &Layout,
        sin: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = cuda::rope(self.sign, self.token_major, (x, lx), (cos, lc), (sin, ls))?;
        let (b, h, t, d) = lx.shape().dims4()?;
        let shape = if self.token_major {
            Shape::from((b, t, h, d))
        } else {
            Shape::from((b, h, t, d))
        };
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = operand(&dy.to_dtype(cos.dtype())?)?;
        // dx in x's own layout when x is a transposed view of a [b, t, heads, d] tensor (the
        // queries): the gradient then reaches the projection without a transpose copy.
        let token_major = x.device().is_cuda() && x.transpose(1, 2)?.is_contiguous();
        let back = RopeWithGrad {
            sign: -self.sign,
            token_major,
        };
        let dx = dy.apply_op3_no_bwd(cos, sin, &back)?;
        let dx = if token_major { dx.transpose(1, 2)? } else { dx };
        Ok((Some(dx), None, None))
    }
}

/// `x` as the op reads it: on CUDA any layout whose rows (the last dim) are contiguous, on the
/// CPU a contiguous copy.
fn operand(x: &Tensor) -> Result<Tensor> {
    match x.stride().last() {
        Some(1) if x.device().is_cuda() => Ok(x.clone()),
        _ => x.contiguous(),
    }
}

/// Rotates `x: [batch, heads, seq, head_dim]` (any float dtype; `head_dim` even) with `cos`,
/// `sin: [batch, seq, head_dim / 2]` in `x`'s dtype, differentiable in `x` (the tables are
/// constants): the values of [`RotaryEmbedding::apply`]'s composition, computed in f32 (f64 on
/// the CPU) with one rounding per output.
pub fn rope_with_grad(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let want = [b, t, d / 2];
    if d % 2 != 0 || cos.dims() != want || sin.dims() != want {
        candle_core::bail!(
            "rope_with_grad: x {:?}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let forward = RopeWithGrad {
        sign: 1.0,
        token_major: false,
    };
    operand(x)?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, forward)
}

/// `x: [batch, heads, seq, head_dim]` rotated by `tables` (`cos`, `sin`: `[batch, seq,
/// head_dim / 2]`, as [`rope_with_grad`] takes them) or, with `None`, as it is, written in place
/// into `dst`, a `[batch, heads, seq, head_dim]` view of another tensor's storage (the new
/// columns of a decoding KV cache: [`crate::KvCache::append_in_place`]). `x` and `dst` may have
/// any strides with contiguous rows on CUDA (kernels/rope.cu `rope_*`, `rope_copy_*`); the CPU
/// computes in f64 (the values of [`rope_with_grad`]). No gradient (inference).
pub fn rope_into(x: &Tensor, tables: Option<(&Tensor, &Tensor)>, dst: &Tensor) -> Result<()> {
    let (b, _, t, d) = x.dims4()?;
    if dst.dims() != x.dims() || dst.dtype() != x.dtype() || d % 2 != 0 {
        candle_core::bail!(
            "rope_into: x {:?} {:?} into {:?} {:?}",
            x.dims(),
            x.dtype(),
            dst.dims(),
            dst.dtype()
        );
    }
    let tables = match tables {
        Some((cos, sin)) => {
            let want = [b, t, d / 2];
            if cos.dims() != want || sin.dims() != want {
                candle_core::bail!(
                    "rope_into: x {:?}, cos {:?}, sin {:?}",
                    x.dims(),
                    cos.dims(),
                    sin.dims()
                );
            }
            let cast = |t: &Tensor| t.to_dtype(x.dtype())?.contiguous();
            Some((cast(cos)?, cast(sin)?))
        }
        None => None,
    };
    dst.inplace_op2(&operand(x)?, &RopeInto { tables })
}

/// Whether decoding writes its rotated keys and its values straight into the KV cache with
/// [`rope_into`] ([`crate::KvCache::append_in_place`]): where [`fused_rope_on`] holds (the same
/// rotation kernel, so the same bits as rotating and then appending), unless
/// `QAT_CUDA_FUSED_KV_WRITE=0`. Per layer and decoding step that is three launches fewer: the
/// rotated keys' tensor, the values' contiguous copy, and the two appends become two kernels.
pub fn rope_into_on(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if let Some(forced) = tests::INTO_FORCED.get() {
        return forced;
    }
    fused_rope_on(x) && crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_KV_WRITE", x)
}

/// [`rope_into`]'s op: `dst ← rotate(x)` (or `x`), `dst` the in-place op's destination.
#[derive(Debug, Clone)]
struct RopeInto {
    tables: Option<(Tensor, Tensor)>,
}

impl candle_core::InplaceOp2 for RopeInto {
    fn name(&self) -> &'static str {
        "rope-into"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        ld: &Layout,
        x: &CpuStorage,
        lx: &Layout,
    ) -> Result<()> {
        let (b, h, t, d) = lx.shape().dims4()?;
        let get = |i: usize| -> Result<f64> {
            Ok(match x {
                CpuStorage::F32(v) => f64::from(v[i]),
                CpuStorage::F64(v) => v[i],
                CpuStorage::BF16(v) => v[i].to_f64(),
                CpuStorage::F16(v) => v[i].to_f64(),
                other => candle_core::bail!("rope_into: dtype {:?}", other.dtype()),
            })
        };
        let xs: Vec<f64> = crate::custom_op::element_offsets(lx)
            .into_iter()
            .map(get)
            .collect::<Result<_>>()?;
        let ys = match &self.tables {
            None => xs,
            Some((cos, sin)) => {
                let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
                let (cs, ss) = (flat(cos)?, flat(sin)?);
                let half = d / 2;
                let mut y = vec![0f64; xs.len()];
                for row in 0..b * h * t {
                    let (batch, pos) = (row / (h * t), row % t);
                    for i in 0..half {
                        let table = (batch * t + pos) * half + i;
                        let (c, s) = (cs[table], ss[table]);
                        let (x1, x2) = (xs[row * d + i], xs[row * d + half + i]);
                        y[row * d + i] = x1 * c - x2 * s;
                        y[row * d + half + i] = x2 * c + x1 * s;
                    }
                }
                y
            }
        };
        let to = crate::custom_op::element_offsets(ld).into_iter().zip(ys);
        match dst {
            CpuStorage::F32(v) => to.for_each(|(i, y)| v[i] = y as f32),
            CpuStorage::F64(v) => to.for_each(|(i, y)| v[i] = y),
            CpuStorage::BF16(v) => to.for_each(|(i, y)| v[i] = half::bf16::from_f64(y)),
            CpuStorage::F16(v) => to.for_each(|(i, y)| v[i] = half::f16::from_f64(y)),
            other => candle_core::bail!("rope_into: dtype {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        ld: &Layout,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> Result<()> {
        match &self.tables {
            None => cuda::into(None, (dst, ld), (x, lx)),
            Some((cos, sin)) => {
                let (cs, lc) = cos.storage_and_layout();
                let (ss, ls) = sin.storage_and_layout();
                let (candle_core::Storage::Cuda(cs), candle_core::Storage::Cuda(ss)) = (&*cs, &*ss)
                else {
                    candle_core::bail!("rope_into: the tables are not on the GPU")
                };
                cuda::into(Some(((cs, lc), (ss, ls))), (dst, ld), (x, lx))
            }
        }
    }
}

/// Whether training rotates with [`rope_with_grad`]: CUDA tensors of f32, bf16 or f16 with
/// fewer than 2^31 rotated pairs, in `cuda` builds, unless `QAT_CUDA_FUSED_ROPE=0`.
pub fn fused_rope_on(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.rank() == 4
        && x.elem_count() / 2 < (1 << 31)
        && crate::kernel_switch::cuda_kernel_on(&ON, "QAT_CUDA_FUSED_ROPE", x)
}

/// The CUDA side: kernels/rope.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    /// Batch, head and position strides of a 4-d layout whose rows are contiguous and lie within
    /// a storage of `len` elements from its start offset; `op` and `what` name it in the error.
    fn row_strides(l: &Layout, len: usize, op: &str, what: &str) -> Result<[i64; 3]> {
        let &[sb, sh, st, sc] = l.stride() else {
            candle_core::bail!("{op}: {what} must be 4-d, got {:?}", l.dims());
        };
        if (sc != 1 && l.dims()[3] > 1) || len < l.start_offset() + crate::custom_op::span(l) {
            candle_core::bail!(
                "{op}: {what} strides {:?} from {}: rows must be contiguous and within the \
                 storage's {len} elements",
                l.stride(),
                l.start_offset()
            );
        }
        Ok([sb as i64, sh as i64, st as i64])
    }

    /// One launch over `x: [b, h, t, d]` (rows contiguous, any strides otherwise) into `y` at
    /// `y_strides`: with `tables` (cos, sin: `[b, t, d/2]`, contiguous) the rotation by `sign`
    /// (`rope_{T}`), without them a copy (`rope_copy_{T}`). `op` names the caller in errors.
    fn launch<T: CudaDType + DeviceRepr>(
        op: &str,
        sign: f32,
        (x, lx): Operand<'_>,
        tables: Option<(Operand<'_>, Operand<'_>)>,
        y: &mut CudaViewMut<'_, T>,
        y_strides: [i64; 3],
    ) -> Result<()> {
        let (b, h, t, d) = lx.shape().dims4()?;
        let n = b * h * t * d;
        if n >= 1 << 32 {
            candle_core::bail!("{op}: {n} elements, more than the kernel's 2^32");
        }
        let xs = x.as_cuda_slice::<T>()?;
        let x_strides = row_strides(lx, xs.len(), op, "x")?;
        let xs = xs.slice(lx.start_offset()..);
        let strides: Vec<i64> = x_strides.into_iter().chain(y_strides).collect();
        let dev = x.device();
        let sfx = crate::kernel_switch::float_kernel_suffix(x.dtype(), op)?;
        let (h32, t32) = (h as u32, t as u32);
        let (cs, ss, half32, pairs, d32, elems);
        let name = match tables {
            Some(_) => format!("rope_{sfx}"),
            None => format!("rope_copy_{sfx}"),
        };
        let func = dev.get_or_load_custom_func(&name, "qat_rope", PTX)?;
        let mut bld = func.builder();
        let work = match tables {
            Some(((cos, lc), (sin, ls))) => {
                let range = |l: &Layout| crate::custom_op::contiguous_range(l, op, "tables");
                let ((c0, c1), (s0, s1)) = (range(lc)?, range(ls)?);
                if c1 - c0 != b * t * (d / 2) || s1 - s0 != c1 - c0 {
                    candle_core::bail!(
                        "{op}: tables of {} and {} elements for x {:?}",
                        c1 - c0,
                        s1 - s0,
                        lx.dims()
                    );
                }
                cs = cos.as_cuda_slice::<T>()?.slice(c0..c1);
                ss = sin.as_cuda_slice::<T>()?.slice(s0..s1);
                (half32, pairs) = ((d / 2) as u32, (n / 2) as u32);
                bld.arg(&xs).arg(&cs).arg(&ss).arg(y);
                bld.arg(&h32).arg(&t32).arg(&half32).arg(&pairs).arg(&sign);
                pairs
            }
            None => {
                (d32, elems) = (d as u32, n as u32);
                bld.arg(&xs)
                    .arg(y)
                    .arg(&h32)
                    .arg(&t32)
                    .arg(&d32)
                    .arg(&elems);
                elems
            }
        };
        for st in &strides {
            bld.arg(st);
        }
        let cfg = LaunchConfig {
            grid_dim: (work.div_ceil(256).clamp(1, 1 << 20), 1, 1),
            block_dim: (256, 1, 1), // ROPE_BLOCK
            shared_mem_bytes: 0,
        };
        // SAFETY: x's rows lie within its storage at its strides (checked), the tables hold
        // b · t · d/2 elements (checked); y's rows at `y_strides` lie within it (the callers'
        // check).
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    /// [`super::rope_into`] on CUDA: `x` rotated by the tables or copied into the view `dst` of
    /// a storage, in place.
    pub(super) fn into(
        tables: Option<(Operand<'_>, Operand<'_>)>,
        (dst, ld): (&mut CudaStorage, &Layout),
        x: Operand<'_>,
    ) -> Result<()> {
        fn run<T: CudaDType + DeviceRepr>(
            tables: Option<(Operand<'_>, Operand<'_>)>,
            (dst, ld): (&mut CudaStorage, &Layout),
            x: Operand<'_>,
        ) -> Result<()> {
            let ys = dst.as_cuda_slice_mut::<T>()?;
            let y_strides = row_strides(ld, ys.len(), "rope_into", "the destination")?;
            let mut ys = ys.slice_mut(ld.start_offset()..);
            launch("rope_into", 1.0, x, tables, &mut ys, y_strides)
        }
        match x.0.dtype() {
            DType::F32 => run::<f32>(tables, (dst, ld), x),
            DType::BF16 => run::<half::bf16>(tables, (dst, ld), x),
            DType::F16 => run::<half::f16>(tables, (dst, ld), x),
            other => candle_core::bail!("rope_into on cuda: dtype {other:?}"),
        }
    }

    /// The rotation of `x: [b, h, t, d]` (rows contiguous, any strides otherwise) into a fresh
    /// `[b, h, t, d]` tensor, or `[b, t, h, d]` with `token_major`.
    pub(super) fn rope(
        sign: f32,
        token_major: bool,
        x: Operand<'_>,
        cos: Operand<'_>,
        sin: Operand<'_>,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr>(
            (sign, token_major): (f32, bool),
            x: Operand<'_>,
            cos: Operand<'_>,
            sin: Operand<'_>,
        ) -> Result<CudaStorage> {
            let (b, h, t, d) = x.1.shape().dims4()?;
            let dev = x.0.device().clone();
            // SAFETY: every element is written by the kernel.
            let mut y = unsafe { dev.alloc::<T>(b * h * t * d)? };
            let y_strides = if token_major {
                [t * h * d, d, h * d]
            } else {
                [h * t * d, t * d, d]
            };
            let y_strides = y_strides.map(|st| st as i64);
            launch(
                "rope_with_grad",
                sign,
                x,
                Some((cos, sin)),
                &mut y.slice_mut(..),
                y_strides,
            )?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev))
        }
        let how = (sign, token_major);
        match x.0.dtype() {
            DType::F32 => run::<f32>(how, x, cos, sin),
            DType::BF16 => run::<half::bf16>(how, x, cos, sin),
            DType::F16 => run::<half::f16>(how, x, cos, sin),
            other => candle_core::bail!("rope_with_grad on cuda: dtype {other:?}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// The model's wiring tests force [`rope_into_on`]: on, on the CPU (with a row-major
        /// cache), or off, on CUDA (the path it replaces).
        pub(crate) static INTO_FORCED: std::cell::Cell<Option<bool>> =
            const { std::cell::Cell::new(None) };
    }
    use crate::custom_op::max_abs_diff;
    use candle_core::Var;

    /// Tables for per-row positions (row 1 left-padded by 2), `[b, t, head_dim / 2]`.
    fn tables(dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
        let rope = RotaryEmbedding::new(16, 64, 10_000.0, dtype, dev)?;
        let positions = Tensor::new(&[[3u32, 4, 5, 6, 7], [0, 0, 0, 1, 2]], dev)?;
        rope.tables(&positions)
    }

    #[test]
    fn value_and_gradient_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (cos, sin) = tables(DType::F64, &dev)?;
        let x = Var::from_tensor(
            &(Tensor::arange(0f64, 2.0 * 3.0 * 5.0 * 16.0, &dev)?
                .reshape((2, 3, 5, 16))?
                .affine(0.37, 0.0)?
                .sin()?
                * 2.0)?,
        )?;
        let w = Tensor::arange(0f64, 480.0, &dev)?
            .reshape((2, 3, 5, 16))?
            .cos()?;
        let a = rope_with_grad(&x, &cos, &sin)?;
        let b = RotaryEmbedding::apply(&x, &cos, &sin, false)?;
        assert!(max_abs_diff(&a, &b)? < 1e-14, "{}", max_abs_diff(&a, &b)?);
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gb = (b * &w)?.sum_all()?.backward()?;
        let (p, q) = (ga.get(&x).expect("grad"), gb.get(&x).expect("grad"));
        assert!(max_abs_diff(p, q)? < 1e-14, "{}", max_abs_diff(p, q)?);
        // A rotation keeps each pair's norm (to the f32 tables' cos² + sin² = 1).
        let pair_norms = |t: &Tensor| -> Result<Tensor> {
            t.narrow(3, 0, 8)?.sqr()? + t.narrow(3, 8, 8)?.sqr()?
        };
        let y = rope_with_grad(&x, &cos, &sin)?;
        assert!(max_abs_diff(&pair_norms(&y)?, &pair_norms(&x)?)? < 1e-5);
        Ok(())
    }

    /// The CUDA kernel against the CPU op (f64), value and gradient, f32 / bf16 / f16, with x
    /// contiguous and as a transposed view of a `[b, t, heads, d]` variable (the queries' case:
    /// read in place, the gradient written back token-major). Runs only in a `--features cuda`
    /// build on a machine with a GPU.
    #[test]
    fn cuda_matches_the_cpu_op() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let x = (Tensor::arange(0f32, 480.0, &Device::Cpu)?
            .reshape((2, 3, 5, 16))?
            .affine(0.37, 0.0)?
            .sin()?
            * 2.0)?;
        let w = Tensor::arange(0f32, 480.0, &Device::Cpu)?
            .reshape((2, 3, 5, 16))?
            .cos()?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let run = |dev: &Device, fdtype: DType, view: bool| -> Result<(Tensor, Tensor)> {
                let (cos, sin) = tables(dtype, &Device::Cpu)?;
                let cast = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(fdtype)?.to_device(dev);
                let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
                if view {
                    let xv = Var::from_tensor(&cast(&x)?.transpose(1, 2)?.contiguous()?)?;
                    let y = rope_with_grad(&xv.transpose(1, 2)?, &cast(&cos)?, &cast(&sin)?)?;
                    assert!(y.is_contiguous());
                    let g = (&y * cast(&w)?)?.sum_all()?.backward()?;
                    let dx = g.get(&xv).expect("grad");
                    assert!(
                        dx.is_contiguous(),
                        "the gradient of the view is token-major"
                    );
                    return Ok((back(&y)?, back(&dx.transpose(1, 2)?)?));
                }
                let xv = Var::from_tensor(&cast(&x)?)?;
                let y = rope_with_grad(&xv, &cast(&cos)?, &cast(&sin)?)?;
                let g = (&y * cast(&w)?)?.sum_all()?.backward()?;
                Ok((back(&y)?, back(g.get(&xv).expect("grad"))?))
            };
            let (y0, g0) = run(&Device::Cpu, DType::F64, false)?;
            for view in [false, true] {
                let (y, g) = run(&gpu, dtype, view)?;
                assert!(
                    max_abs_diff(&y, &y0)? <= tol * 2.0,
                    "{dtype:?} y (view {view})"
                );
                assert!(
                    max_abs_diff(&g, &g0)? <= tol * 2.0,
                    "{dtype:?} dx (view {view})"
                );
            }
        }
        Ok(())
    }
}
