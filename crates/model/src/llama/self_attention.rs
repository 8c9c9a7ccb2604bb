//! A Llama layer's grouped-query self-attention: q/k/v projections through the quantization
//! hooks, RoPE, the KV cache and the hooks' KV quantizer, then fused or composed attention and o_proj.

use super::{is_half, StepContext};
use crate::attention::causal_attention_with_device_pads;
use crate::cache::KvCache;
use crate::causal_softmax::causal_softmax;
use crate::config::LlamaConfig;
use crate::hooks::{KvKind, LinearId, LinearKind, QuantHooks};
use crate::linear::{forward_joined, hooked_inputs, QLinear};
use crate::rope::{rope_into, rope_into_on, RotaryEmbedding};
use crate::softmax::softmax_last_dim_with_grad;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Softmax over the last dim. Training (not `fused`) on CUDA: one kernel with a gradient that
/// keeps only its output ([`crate::softmax`]); elsewhere the composition, in f32 for 16-bit `x`.
fn softmax_last(x: &Tensor, fused: bool) -> Result<Tensor> {
    if fused {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    } else if x.device().is_cuda() {
        softmax_last_dim_with_grad(x)
    } else if is_half(x.dtype()) {
        candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(x.dtype())
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q_proj: QLinear,
    pub(super) k_proj: QLinear,
    pub(super) v_proj: QLinear,
    pub(super) o_proj: QLinear,
    /// q, k and v's frozen weights joined, `[q + 2 kv, hidden]` (inference on CUDA: see
    /// [`fused_qkv_on`](crate::linear::fused_qkv_on)); their own weights are then row views of it.
    pub(super) qkv: Option<Tensor>,
    layer: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub(super) fn load(vb: VarBuilder, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let id = |kind| LinearId { layer, kind };
        Ok(Self {
            q_proj: QLinear::load(vb.pp("q_proj"), h, q, id(LinearKind::Q))?,
            k_proj: QLinear::load(vb.pp("k_proj"), h, kv, id(LinearKind::K))?,
            v_proj: QLinear::load(vb.pp("v_proj"), h, kv, id(LinearKind::V))?,
            o_proj: QLinear::load(vb.pp("o_proj"), q, h, id(LinearKind::O))?,
            qkv: None,
            layer,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x: [b, t, hidden]` → `[b, t, hidden]`; appends this chunk's keys/values to `cache`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        cache: &mut KvCache,
        hooks: &dyn QuantHooks,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            // One GEMM; its [b, t, nh + 2 nkv, hd] output's head ranges are q, k and v (views).
            Some(joined) => {
                let x = hooks.activation(self.q_proj.id(), x)?;
                let y = forward_joined(&x, joined)?.reshape((b, t, nh + 2 * nkv, hd))?;
                (
                    y.narrow(2, 0, nh)?,
                    y.narrow(2, nh, nkv)?,
                    y.narrow(2, nh + nkv, nkv)?,
                )
            }
            None => {
                let [xq, xk, xv] =
                    hooked_inputs(x, [&self.q_proj, &self.k_proj, &self.v_proj], hooks)?;
                let project = |lin: &QLinear, x: &Tensor, heads: usize| {
                    lin.forward_hooked_input(x, hooks)?
                        .reshape((b, t, heads, hd))
                };
                (
                    project(&self.q_proj, &xq, nh)?,
                    project(&self.k_proj, &xk, nkv)?,
                    project(&self.v_proj, &xv, nkv)?,
                )
            }
        };
        // [b, heads, t, hd] views.
        let (q, k, v) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
        // On CUDA the KV hook takes k and v as the views they are (the per-token quantizer wants
        // them token-major, which the projection's output already is) and the rotation reads k
        // in place; the CPU copies them first, as it always did.
        let kv_input = |x: Tensor| {
            if x.device().is_cuda() {
                Ok(x)
            } else {
                x.contiguous()
            }
        };
        let k = hooks.kv(self.layer, KvKind::Key, &kv_input(k)?)?;
        let v = hooks.kv(self.layer, KvKind::Value, &kv_input(v)?)?;
        // q is a transposed view of the projection: on CUDA the rotation reads it in place.
        let q = RotaryEmbedding::apply(&q, &ctx.cos, &ctx.sin, ctx.fused)?;
        // Decoding on CUDA: the keys rotated and the values copied straight into the cache's new
        // columns (no rotated-keys tensor, no copy of v, no appends).
        let written = match !k.track_op() && rope_into_on(&k) {
            true => cache.append_in_place(self.layer, &k, |cache_k, cache_v| {
                rope_into(&k, Some((&ctx.cos, &ctx.sin)), cache_k)?;
                rope_into(&v, None, cache_v)
            })?,
            false => None,
        };
        let (k, v) = match written {
            Some(kv) => kv,
            None => {
                let k = RotaryEmbedding::apply(&k, &ctx.cos, &ctx.sin, ctx.fused)?;
                cache.append(self.layer, &k.contiguous()?, &v.contiguous()?)? // [b, nkv, s, hd]
            }
        };
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some((pads, device_pads)) = &ctx.fused_attention_pads {
            let out =
                causal_attention_with_device_pads(&q, &k, &v, pads, device_pads.as_ref(), scale)?; // [b, nh, t, hd]
            let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            return self.o_proj.forward(&out, hooks);
        }
        let (k, v) = (matmul_operand(&k)?, matmul_operand(&v)?); // a cache view may have spare columns
        let s = k.dim(2)?;
        let rep = nh / nkv;
        // Grouped-query attention without copying keys: query heads of one KV head are stacked.
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let probs = if let Some(pads) = &ctx.softmax_mask_pads {
            // The op scales and masks the [b, nkv, rep*t, s] scores itself.
            causal_softmax(&q.matmul(&k.t()?)?, pads, t, scale)?
        } else {
            let scores = if q.device().is_cuda() {
                // On CUDA scale q, not the scores: a pass over [b, nkv, rep*t, hd] instead of a
                // read and a write of [b, nkv, rep*t, s] (1 GB per layer at eval's 16 x 1024
                // tokens in bf16), and in training one scores-sized tensor fewer kept for the
                // backward pass.
                (q * scale)?.matmul(&k.t()?)?
            } else {
                (q.matmul(&k.t()?)? * scale)?
            }; // [b, nkv, rep*t, s]
            let scores = match &ctx.mask {
                Some(mask) => scores
                    .reshape((b, nkv, rep, t, s))?
                    .broadcast_add(mask)?
                    .reshape((b, nkv, rep * t, s))?,
                None => scores,
            };
            softmax_last(&scores, ctx.fused)?
        };
        let out = probs.matmul(&v)?; // [b, nkv, rep*t, hd]
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out, hooks)
    }
}

/// `x: [b, h, s, d]` as the composed attention's matmuls take it: `x` itself when its `[s, d]`
/// blocks are row-major and its two batch dims collapse into one stride (a
/// [`CacheLayout::RowMajor`](crate::CacheLayout) view: cuBLAS and the CPU's gemm read it in
/// place, keys through a transposed operand), else a contiguous copy.
pub(super) fn matmul_operand(x: &Tensor) -> Result<Tensor> {
    match (x.dims(), x.stride()) {
        (&[_, h, _, d], &[sb, sh, ss, 1]) if ss == d && sb == sh * h => Ok(x.clone()),
        _ => x.contiguous(),
    }
}
