//! The fused attention's backward pass from composed candle ops, for devices without a backward
//! kernel (CUDA): it recomputes the masked softmax of one layer from q and k, as the flash-attention
//! backward does, so the forward pass keeps no `[t, s]` tensor; this one exists only while the
//! layer's gradient is computed. The mask is built on the device from the pads.

use candle_core::{DType, Device, Result, Tensor, D};

/// The additive mask `[b, 1, 1, t, s]` (0 visible, -inf hidden) of the visibility rule in
/// [`super`]: query column `c` (the last `t` of `s`) of row `b` sees key columns `pads[b]..=c`, or
/// `0..=c` when `c` is itself a padding column. Built with tensor ops on `dev` (no host copy).
pub(super) fn additive_mask(pads: &[usize], t: usize, s: usize, dev: &Device) -> Result<Tensor> {
    let b = pads.len();
    let keys = Tensor::arange(0u32, s as u32, dev)?.reshape((1, 1, s))?;
    let queries = Tensor::arange((s - t) as u32, s as u32, dev)?.reshape((1, t, 1))?;
    let pads = Tensor::from_vec(
        pads.iter().map(|&p| p as u32).collect::<Vec<_>>(),
        (b, 1, 1),
        dev,
    )?;
    let future = keys.broadcast_gt(&queries)?; // [1, t, s]
    let padding_key = keys.broadcast_lt(&pads)?; // [b, 1, s]
    let real_query = queries.broadcast_ge(&pads)?; // [b, t, 1]
    let hidden = future.broadcast_add(&padding_key.broadcast_mul(&real_query)?)?; // [b, t, s]
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (b, t, s), dev)?;
    let zero = Tensor::zeros((b, t, s), DType::F32, dev)?;
    hidden.where_cond(&neg_inf, &zero)?.reshape((b, 1, 1, t, s))
}

/// Gradients `(dq, dk, dv)` of `softmax(q·kᵀ·scale + mask)·v` for the output gradient `dout`,
/// shapes as in [`super::causal_attention`], in the inputs' dtype; computed in f32:
/// `p` recomputed, `dv = pᵀ·dout`, `dp = dout·vᵀ`, `ds = p ∘ (dp − rowsum(dp ∘ p))`,
/// `dq = ds·k·scale`, `dk = dsᵀ·q·scale`, summed over the query heads of each kv head.
pub(super) fn composed_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    pads: &[usize],
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let rep = nh / nkv;
    let f32_of = |x: &Tensor| x.to_dtype(DType::F32)?.contiguous();
    // Query heads of one kv head stacked, as in the model's composed attention.
    let q32 = f32_of(q)?.reshape((b, nkv, rep * t, hd))?;
    let dout32 = f32_of(dout)?.reshape((b, nkv, rep * t, hd))?;
    let (k32, v32) = (f32_of(k)?, f32_of(v)?);
    let mask = additive_mask(pads, t, s, q.device())?;
    let scores = (q32.matmul(&k32.t()?)? * scale)?
        .reshape((b, nkv, rep, t, s))?
        .broadcast_add(&mask)?
        .reshape((b, nkv, rep * t, s))?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    let dv = p.t()?.matmul(&dout32)?;
    let dp = dout32.matmul(&v32.t()?)?;
    let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
    let ds = (&p * dp.broadcast_sub(&row)?)?;
    let dq = (ds.matmul(&k32)? * scale)?.reshape((b, nh, t, hd))?;
    let dk = (ds.t()?.matmul(&q32)? * scale)?;
    let dt = q.dtype();
    Ok((dq.to_dtype(dt)?, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
}
