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
/// shapes as in [`super::causal_attention`], in the inputs' dtype: `p` recomputed,
/// `dv = pᵀ·dout`, `dp = dout·vᵀ`, `ds = p ∘ (dp − rowsum(dp ∘ p))`, `dq = ds·k·scale`,
/// `dk = dsᵀ·q·scale`, summed over the query heads of each kv head. The matmuls run in the
/// inputs' dtype (tensor cores for bf16, as the composed attention's own backward does), the
/// masked softmax and `ds` in f32 (f64 for f64 inputs).
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
    let dt = q.dtype();
    let acc = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    // Query heads of one kv head stacked, as in the model's composed attention.
    let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
    let dout = dout
        .to_dtype(dt)?
        .contiguous()?
        .reshape((b, nkv, rep * t, hd))?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let mask = additive_mask(pads, t, s, q.device())?.to_dtype(acc)?;
    let scores = (q.matmul(&k.t()?)?.to_dtype(acc)? * scale)?
        .reshape((b, nkv, rep, t, s))?
        .broadcast_add(&mask)?
        .reshape((b, nkv, rep * t, s))?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    let dv = p.to_dtype(dt)?.t()?.matmul(&dout)?;
    let dp = dout.matmul(&v.t()?)?.to_dtype(acc)?;
    let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
    let ds = (&p * dp.broadcast_sub(&row)?)?.to_dtype(dt)?;
    let dq = (ds.matmul(&k)? * scale)?.reshape((b, nh, t, hd))?;
    let dk = (ds.t()?.matmul(&q)? * scale)?;
    Ok((dq, dk, dv))
}
