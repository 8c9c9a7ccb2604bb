//! The Llama decoder (RMSNorm, SwiGLU MLP, GQA attention with RoPE) over quantization hooks.

use crate::attention::{causal_attention_with_device_pads, fused_attention_supported};
use crate::cache::KvCache;
use crate::causal_softmax::{causal_softmax, causal_softmax_on, pads_tensor};
use crate::config::LlamaConfig;
use crate::hooks::{KvKind, LinearId, LinearKind, NoQuant, QuantHooks};
use crate::linear::{
    forward_joined, fuse_frozen, fused_gate_up_on, fused_qkv_on, hooked_inputs, QLinear,
};
use crate::rope::{rope_into, rope_into_on, RotaryEmbedding};
use crate::softmax::softmax_last_dim_with_grad;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// Whether a dtype is a 16-bit float, whose norms and softmaxes are computed in f32 (as HF does).
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// RMSNorm; `fused` selects candle's kernel (no gradient) over the differentiable composition,
/// which training on CUDA runs as one op with its own backward ([`crate::norm`], same values).
/// `weight` is cast to `x`'s dtype (a no-op unless the model computes in a narrower dtype than
/// its weights). The composition runs in f32 for 16-bit `x`, as HF's LlamaRMSNorm does (candle's
/// fused kernel accumulates in f32 by itself).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if !fused && crate::norm::fused_norm_on(x) {
        return crate::norm::rms_norm_with_grad(x, weight, eps);
    }
    let weight = weight.to_dtype(x.dtype())?;
    if fused {
        return candle_nn::ops::rms_norm(&x.contiguous()?, &weight, eps as f32);
    }
    if is_half(x.dtype()) {
        let x32 = x.to_dtype(DType::F32)?;
        let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
        return x32
            .broadcast_div(&(mean_sq + eps)?.sqrt()?)?
            .to_dtype(x.dtype())?
            .broadcast_mul(&weight);
    }
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?
        .broadcast_mul(&weight)
}

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
struct Attention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    /// q, k and v's frozen weights joined, `[q + 2 kv, hidden]` (inference on CUDA: see
    /// [`fused_qkv_on`]); their own weights are then row views of it.
    qkv: Option<Tensor>,
    layer: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
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
    fn forward(
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
fn matmul_operand(x: &Tensor) -> Result<Tensor> {
    match (x.dims(), x.stride()) {
        (&[_, h, _, d], &[sb, sh, ss, 1]) if ss == d && sb == sh * h => Ok(x.clone()),
        _ => x.contiguous(),
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
    /// gate's and up's frozen weights joined, `[2 intermediate, hidden]` (inference on CUDA: see
    /// [`fused_gate_up_on`]); their own weights are then row views of it.
    gate_up: Option<Tensor>,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let id = |kind| LinearId { layer, kind };
        Ok(Self {
            gate_proj: QLinear::load(vb.pp("gate_proj"), h, i, id(LinearKind::Gate))?,
            up_proj: QLinear::load(vb.pp("up_proj"), h, i, id(LinearKind::Up))?,
            down_proj: QLinear::load(vb.pp("down_proj"), i, h, id(LinearKind::Down))?,
            gate_up: None,
        })
    }

    /// `x: [b, t, hidden]` → `[b, t, hidden]`. On CUDA `silu(gate) · up` is one op with its
    /// own backward ([`crate::swiglu`]), in training and inference alike; the CPU composes it.
    fn forward(&self, x: &Tensor, hooks: &dyn QuantHooks) -> Result<Tensor> {
        if let Some(joined) = &self.gate_up {
            // One GEMM; its [.., 2 intermediate] output holds gate, then up, per row.
            let x = hooks.activation(self.gate_proj.id(), x)?;
            let gate_up = forward_joined(&x, joined)?;
            let h = if crate::swiglu::fused_swiglu_on(&gate_up) {
                crate::swiglu::swiglu_joined(&gate_up)?
            } else {
                let inter = gate_up.dim(D::Minus1)? / 2;
                let gate = gate_up.narrow(D::Minus1, 0, inter)?;
                (gate.silu()? * gate_up.narrow(D::Minus1, inter, inter)?)?
            };
            return self.down_proj.forward(&h, hooks);
        }
        let [x_gate, x_up] = hooked_inputs(x, [&self.gate_proj, &self.up_proj], hooks)?;
        let gate = self.gate_proj.forward_hooked_input(&x_gate, hooks)?;
        let up = self.up_proj.forward_hooked_input(&x_up, hooks)?;
        let h = if crate::swiglu::fused_swiglu_on(&gate) {
            crate::swiglu::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down_proj.forward(&h, hooks)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Per-forward values shared by all layers.
struct StepContext {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    fused: bool,
    /// Left paddings of the rows when attention runs as the fused op (then `mask` is None), and
    /// on CUDA the same as a device tensor (`[b]` u32, made once per forward pass).
    fused_attention_pads: Option<(Vec<usize>, Option<Tensor>)>,
    /// Left paddings of the rows (`[b]` u32, on the device, made once per forward pass) when
    /// the composed attention's softmax scales and masks its scores itself ([`causal_softmax`];
    /// then `mask` is None).
    softmax_mask_pads: Option<Tensor>,
}

/// A Llama causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    rope: RotaryEmbedding,
    cfg: LlamaConfig,
    hooks: Arc<dyn QuantHooks>,
    fused: bool,
    fused_attention: bool,
    /// The dtype activations are computed in (default: the weights' dtype). Weights of another
    /// dtype are cast on the fly, differentiably (f32 master weights, bf16 compute).
    compute_dtype: DType,
}

impl Llama {
    /// Loads all weights from `vb` (checkpoint keys `model.*`, `lm_head.weight` unless tied).
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = vb.pp("model.embed_tokens").get((v, h), "weight")?;
        let blocks = (0..cfg.num_layers)
            .map(|l| {
                let vb = vb.pp(format!("model.layers.{l}"));
                Ok(Block {
                    input_layernorm: vb.pp("input_layernorm").get(h, "weight")?,
                    self_attn: Attention::load(vb.pp("self_attn"), cfg, l)?,
                    post_attention_layernorm: vb.pp("post_attention_layernorm").get(h, "weight")?,
                    mlp: Mlp::load(vb.pp("mlp"), cfg, l)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = vb.pp("model.norm").get(h, "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((v, h), "weight")?
        };
        let rope = RotaryEmbedding::new(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            vb.dtype(),
            vb.device(),
        )?;
        let compute_dtype = vb.dtype();
        Ok(Self {
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            hooks: Arc::new(NoQuant),
            fused: true,
            fused_attention: true,
            compute_dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The dtype the forward pass computes in (see [`Self::set_compute_dtype`]).
    pub fn dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The dtype of the stored weights.
    pub fn weight_dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Computes in `dtype` (e.g. bf16) whatever the weights' dtype: embeddings, norm weights,
    /// the LM head and every linear weight (after its quantization hook, so fake quantization
    /// still sees the master weights) are cast in each forward pass; the cast is differentiable,
    /// so gradients reach f32 master weights in f32. Norms and softmaxes run in f32 internally,
    /// logits come back in f32. Default: the weights' dtype (no casts at all).
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// For inference with fixed weights: applies the quantization hook of every linear weight
    /// once (when [`QuantHooks::weight_is_static`]) and casts all weights to the compute dtype,
    /// so forward passes neither re-quantize nor cast. Values are identical to running without
    /// it, except on CUDA, where each layer's q, k and v weights are also joined into one matrix
    /// (one GEMM instead of three, see [`fused_qkv_on`]), and its gate and up weights into
    /// another (one GEMM instead of two, [`fused_gate_up_on`]); equal to the GEMMs' rounding. Call
    /// after [`Self::set_hooks`] and [`Self::set_compute_dtype`]; hooks set later still apply to
    /// activations and the KV cache, but not to the frozen weights.
    pub fn freeze_weights(&mut self) -> Result<()> {
        let dt = self.compute_dtype;
        let hooks = self.hooks.clone();
        let static_weights = hooks.weight_is_static();
        for block in &mut self.blocks {
            block.input_layernorm = block.input_layernorm.to_dtype(dt)?;
            block.post_attention_layernorm = block.post_attention_layernorm.to_dtype(dt)?;
            let (a, m) = (&mut block.self_attn, &mut block.mlp);
            for lin in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                lin.freeze(hooks.as_ref(), static_weights, dt)?;
            }
            let (q, k, v) = (a.q_proj.id(), a.k_proj.id(), a.v_proj.id());
            if a.qkv.is_none()
                && fused_qkv_on(a.q_proj.weight())
                && hooks.same_activation(q, k)
                && hooks.same_activation(q, v)
            {
                a.qkv = fuse_frozen([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
            }
            if m.gate_up.is_none()
                && fused_gate_up_on(m.gate_proj.weight())
                && hooks.same_activation(m.gate_proj.id(), m.up_proj.id())
            {
                m.gate_up = fuse_frozen([&mut m.gate_proj, &mut m.up_proj])?;
            }
        }
        self.embed_tokens = self.embed_tokens.to_dtype(dt)?;
        self.norm = self.norm.to_dtype(dt)?;
        self.lm_head = self.lm_head.to_dtype(dt)?;
        Ok(())
    }

    /// Replaces the quantization hooks (default: full precision).
    pub fn set_hooks(&mut self, hooks: Arc<dyn QuantHooks>) {
        self.hooks = hooks;
    }

    pub fn hooks(&self) -> &Arc<dyn QuantHooks> {
        &self.hooks
    }

    /// Fused kernels (default) are faster but carry no gradient; training turns them off.
    pub fn set_fused_kernels(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// The fused attention op ([`crate::attention`]; differentiable, so also used in training)
    /// where [`crate::fused_attention_supported`] says (the CPU; CUDA in bf16/f16 when opted in),
    /// or candle's composed ops (matmul + mask + softmax). Default: on.
    pub fn set_fused_attention(&mut self, fused: bool) {
        self.fused_attention = fused;
    }

    /// Every quantizable linear layer, in block order (q, k, v, o, gate, up, down).
    pub fn linears(&self) -> Vec<&QLinear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let (a, m) = (&b.self_attn, &b.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .collect()
    }

    /// A fresh cache for `batch` rows with the given left paddings.
    pub fn new_cache(&self, pads: Vec<usize>) -> KvCache {
        KvCache::new(self.cfg.num_layers, pads)
    }

    /// A cache for incremental decoding with room for `columns` columns (padding included)
    /// before it grows; inference only (appends write in place, outside autograd).
    pub fn new_decode_cache(&self, pads: Vec<usize>, columns: usize) -> KvCache {
        KvCache::with_capacity(self.cfg.num_layers, pads, columns)
    }

    /// Runs `tokens: [b, t]` (u32) after what `cache` holds; returns logits `[b, t, vocab]`
    /// (f32) and appends the chunk to the cache.
    pub fn forward(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_hidden(tokens, cache)?;
        self.logits(&hidden)
    }

    /// Full-sequence forward without padding: `tokens: [b, t]` → logits `[b, t, vocab]`.
    pub fn forward_full(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut cache = KvCache::unpadded(self.cfg.num_layers, tokens.dim(0)?);
        self.forward(tokens, &mut cache)
    }

    /// [`Self::forward_full`] without the LM head: `tokens: [b, t]` → the final normalized
    /// hidden states `[b, t, hidden]`, for callers that need the logits of some positions only
    /// ([`Self::logits`] of the rows they select).
    pub fn forward_hidden_full(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut cache = KvCache::unpadded(self.cfg.num_layers, tokens.dim(0)?);
        self.forward_hidden(tokens, &mut cache)
    }

    /// The final normalized hidden states `[b, t, hidden]` (before the LM head).
    pub fn forward_hidden(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.embed(tokens)?;
        let x = self.forward_blocks(x, 0..self.blocks.len(), cache)?;
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps, self.fused_ops())
    }

    /// Token embeddings: `tokens: [b, t]` (u32) → `[b, t, hidden]` in the compute dtype, the
    /// input of block 0.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.embed_tokens
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?
            .to_dtype(self.compute_dtype)
    }

    /// Runs decoder blocks `blocks` on `x: [b, t, hidden]`, the input of block `blocks.start`,
    /// after what `cache` holds; returns the output of block `blocks.end - 1` (`[b, t, hidden]`,
    /// not normalized) and advances the cache by `t`. `forward_hidden` is `embed`, all blocks,
    /// then the final norm; running the blocks in several calls (each with its own cache)
    /// gives the same values.
    pub fn forward_blocks(
        &self,
        x: Tensor,
        blocks: std::ops::Range<usize>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if b != cache.batch_size() {
            candle_core::bail!(
                "batch of {b} rows but the KV cache has {} rows",
                cache.batch_size()
            );
        }
        if blocks.end > self.blocks.len() {
            candle_core::bail!(
                "blocks {blocks:?} of a model with {} blocks",
                self.blocks.len()
            );
        }
        let end = cache.columns() + t;
        let max_pos = self.rope.max_positions();
        let longest = end - cache.pads().iter().min().copied().unwrap_or(0);
        if longest > max_pos {
            candle_core::bail!(
                "sequence of {longest} positions exceeds max_position_embeddings {max_pos}"
            );
        }
        let dev = self.device();
        let positions = cache.next_positions(t, dev)?;
        let dt = self.compute_dtype;
        let (cos, sin) = self.rope.tables(&positions)?;
        let (cos, sin) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
        let fused = self.fused_ops();
        // On CUDA this includes decoding: the kernel packs the query rows of a kv head's query
        // heads into one thread block, so the cached keys and values are read once per kv head.
        let fused_attention =
            self.fused_attention && fused_attention_supported(dev, self.dtype(), self.cfg.head_dim);
        let (mask, fused_attention_pads, softmax_mask_pads) = if fused_attention {
            // On CUDA the paddings go to the GPU once per forward pass, not in every layer.
            let device_pads = dev
                .is_cuda()
                .then(|| pads_tensor(cache.pads(), dev))
                .transpose()?;
            (None, Some((cache.pads().to_vec(), device_pads)), None)
        } else if causal_softmax_on(dev, self.dtype()) {
            (None, None, Some(pads_tensor(cache.pads(), dev)?))
        } else {
            let mask = cache.next_mask(t, dev)?;
            (
                mask.map(|m| m.to_dtype(self.dtype())).transpose()?,
                None,
                None,
            )
        };
        let ctx = StepContext {
            cos,
            sin,
            mask,
            fused,
            fused_attention_pads,
            softmax_mask_pads,
        };
        let hooks = self.hooks.as_ref();
        let eps = self.cfg.rms_norm_eps;
        // In inference on CUDA each residual add and the norm after it are one op
        // ([`crate::residual_add`]): the MLP output of a block is added by the next block's first norm.
        let add_norm = fused && crate::residual_add::fused_add_norm_on(&x);
        let add_then_norm = |x: Tensor, delta: Option<Tensor>, w: &Tensor| match delta {
            Some(delta) if add_norm => crate::residual_add::add_rms_norm(&x, &delta, w, eps),
            Some(delta) => {
                let x = (x + delta)?;
                let h = rms_norm(&x, w, eps, fused)?;
                Ok((x, h))
            }
            None => {
                let h = rms_norm(&x, w, eps, fused)?;
                Ok((x, h))
            }
        };
        let (mut x, mut pending) = (x, None);
        for block in &self.blocks[blocks] {
            let (sum, h) = add_then_norm(x, pending.take(), &block.input_layernorm)?;
            let attended = block.self_attn.forward(&h, &ctx, cache, hooks)?;
            let (sum, h) = add_then_norm(sum, Some(attended), &block.post_attention_layernorm)?;
            x = sum;
            pending = Some(block.mlp.forward(&h, hooks)?);
        }
        if let Some(delta) = pending {
            x = (x + delta)?;
        }
        cache.advance(t);
        Ok(x)
    }

    /// Whether candle's fused kernels (rms norm, softmax) run: they have no f64 version, and
    /// f64 (used by exactness tests) composes ops.
    fn fused_ops(&self) -> bool {
        self.fused && self.dtype() != DType::F64
    }

    /// LM head: `hidden: [.., hidden]` → f32 logits `[.., vocab]` (never quantized).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_in_dtype(hidden)?.to_dtype(DType::F32)
    }

    /// [`Self::logits`] in the compute dtype (no f32 copy), for consumers that read each logit
    /// once in f32 themselves ([`crate::token_nll()`]).
    pub fn logits_in_dtype(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let rows = hidden.elem_count() / self.cfg.hidden_size;
        let lm_head = self.lm_head.to_dtype(hidden.dtype())?;
        let logits = hidden
            .reshape((rows, self.cfg.hidden_size))?
            .matmul(&lm_head.t()?)?;
        let mut out = dims;
        *out.last_mut().expect("hidden has dims") = self.cfg.vocab_size;
        logits.reshape(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        loss_and_linear_gradients, random_weights, small_gqa_config, trainable_random_model,
    };
    use crate::{CacheLayout, KvCache, ModelDir};
    use candle_core::Device;

    fn stories260k() -> Llama {
        let data = std::env::var_os("QAT_DATA").map_or_else(
            || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
            std::path::PathBuf::from,
        );
        ModelDir::open(data.join("models/stories260K"))
            .expect("open stories260K")
            .load(&Device::Cpu, DType::F32)
            .expect("load stories260K")
    }

    /// The composed attention with its mask inside the softmax ([`causal_softmax`], CUDA's path,
    /// here through the op's CPU side) gives the logits of the mask add and softmax: a
    /// full-sequence forward (training's shape), and a left-padded batch's prefill and decoding
    /// steps through a KV cache.
    #[test]
    fn masked_softmax_op_gives_the_mask_adds_logits() -> Result<()> {
        let mut model = stories260k();
        model.set_fused_attention(false);
        let run = |op: bool| -> Result<Vec<Tensor>> {
            crate::causal_softmax::tests::ON_CPU.set(op);
            let out = full_and_padded_decode_logits(&model);
            crate::causal_softmax::tests::ON_CPU.set(false);
            out
        };
        assert_same_logits(&run(false)?, &run(true)?, 1e-4)
    }

    /// The residual add + RMSNorm op (run on the CPU through its test switch) in place of the
    /// composed add and candle's norm: the same logits to f32 rounding, for a full-sequence
    /// forward and a left-padded prefill with decode steps.
    #[test]
    fn residual_add_op_gives_the_composed_logits() -> Result<()> {
        let model = stories260k();
        let run = |op: bool| -> Result<Vec<Tensor>> {
            crate::residual_add::tests::ON_CPU.set(op);
            let out = full_and_padded_decode_logits(&model);
            crate::residual_add::tests::ON_CPU.set(false);
            out
        };
        assert_same_logits(&run(false)?, &run(true)?, 1e-4)
    }

    /// Logits of stories260K-sized vocabularies for a full-sequence forward (2 x 12 tokens) and a
    /// left-padded prefill (pads 0, 4, 7; 8 columns) followed by 4 decoding steps, on the CPU.
    fn full_and_padded_decode_logits(model: &Llama) -> Result<Vec<Tensor>> {
        let dev = Device::Cpu;
        let mut out = Vec::new();
        let seq: Vec<u32> = (0..24).map(|i| 1 + (i * 37) % 500).collect();
        out.push(model.forward_full(&Tensor::from_vec(seq.clone(), (2, 12), &dev)?)?);
        let mut cache = model.new_decode_cache(vec![0, 4, 7], 20);
        out.push(model.forward(&Tensor::from_vec(seq, (3, 8), &dev)?, &mut cache)?);
        for step in 0..4u32 {
            let next = Tensor::from_vec(vec![5 + step, 70 + step, 300 + step], (3, 1), &dev)?;
            out.push(model.forward(&next, &mut cache)?);
        }
        Ok(out)
    }

    /// Each pair of logits within `tol` of each other.
    fn assert_same_logits(want: &[Tensor], got: &[Tensor], tol: f64) -> Result<()> {
        assert_eq!(want.len(), got.len());
        for (i, (a, b)) in want.iter().zip(got).enumerate() {
            let diff = crate::custom_op::max_abs_diff(a, b)?;
            assert!(diff < tol, "output {i}: {diff}");
        }
        Ok(())
    }

    /// A random bf16 model of [`small_gqa_config`] on `dev`.
    fn random_bf16_model(dev: &Device) -> Result<Llama> {
        let cfg = small_gqa_config();
        let tensors = random_weights(&cfg)?
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(DType::BF16)?.to_device(dev)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        Llama::load(VarBuilder::from_tensors(tensors, DType::BF16, dev), &cfg)
    }

    /// The logits (on the host) of a left-padded prefill (2 rows, pads 0 and 3, 8 columns) and 4
    /// decoding steps.
    fn prefill_and_decode(model: &Llama, dev: &Device) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        let prompt: Vec<u32> = (0..16).map(|i| 3 + (i * 37) % 90).collect();
        let mut cache = model.new_decode_cache(vec![0, 3], 12);
        out.push(model.forward(&Tensor::from_vec(prompt, (2, 8), dev)?, &mut cache)?);
        for step in 0..4u32 {
            let next = Tensor::from_vec(vec![5 + step, 40 + step], (2, 1), dev)?;
            out.push(model.forward(&next, &mut cache)?);
        }
        out.iter().map(|t| t.to_device(&Device::Cpu)).collect()
    }

    /// Each pair of bf16 logits within `rel` of the larger magnitude of `want` (at least 1).
    fn assert_close_logits(got: &[Tensor], want: &[Tensor], rel: f64) -> Result<()> {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let diff = crate::custom_op::max_abs_diff(a, b)?;
            let size = f64::from(b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
            assert!(
                diff <= rel * size.max(1.0),
                "output {i}: {diff} (logits up to {size})"
            );
        }
        Ok(())
    }

    /// A random bf16 model with TinyLlama's head dim and grouped heads on the GPU: a left-padded
    /// prefill and decoding steps through the flash kernels (turned on by the test switch) give
    /// the composed attention's logits, to bf16 rounding. Runs only in a `--features cuda` build
    /// on a machine with a GPU (skipped otherwise).
    #[test]
    fn flash_prefill_and_decoding_match_the_composed_attention_on_cuda() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let mut model = random_bf16_model(&gpu)?;
        crate::attention::tests::FLASH_ON.set(true);
        let flash = prefill_and_decode(&model, &gpu);
        crate::attention::tests::FLASH_ON.set(false);
        model.set_fused_attention(false);
        let composed = prefill_and_decode(&model, &gpu)?;
        assert_close_logits(&flash?, &composed, 0.05)
    }

    /// Training on the GPU in bf16 (f32 master weights, as qat-distill): a full-sequence forward
    /// and backward pass with the flash kernels (the test switch) gives the composed attention's
    /// loss and linear weight gradients, to bf16 rounding. Covers the flash op's wiring in
    /// training: its token-major output into o_proj, the gradient arriving in that layout, dq in
    /// bf16 into RoPE's backward on the query view. Runs only in a `--features cuda` build on a
    /// machine with a GPU (skipped otherwise).
    #[test]
    fn flash_training_gradients_match_the_composed_attention_on_cuda() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let cfg = small_gqa_config();
        let run = |flash: bool| -> Result<(f32, Vec<Tensor>)> {
            let (mut model, vars) = trainable_random_model(&cfg, &gpu)?;
            model.set_fused_kernels(false);
            model.set_compute_dtype(DType::BF16);
            model.set_fused_attention(flash);
            let tokens: Vec<u32> = (0..80).map(|i| 3 + (i * 37) % 90).collect();
            let tokens = Tensor::from_vec(tokens, (2, 40), &gpu)?;
            crate::attention::tests::FLASH_ON.set(flash);
            let out = loss_and_linear_gradients(&model, &vars, &tokens, 5);
            crate::attention::tests::FLASH_ON.set(false);
            out
        };
        let ((loss_flash, flash), (loss_composed, composed)) = (run(true)?, run(false)?);
        assert_eq!(flash.len(), 2 * 7);
        assert!(
            (loss_flash - loss_composed).abs() <= 0.02 * loss_composed.abs().max(1.0),
            "loss {loss_flash} with flash, {loss_composed} composed"
        );
        assert_close_logits(&flash, &composed, 0.05)
    }

    /// On the GPU, a frozen model's joined projections (q/k/v and gate/up, one GEMM each per
    /// layer) give the logits of the separate projections, to bf16 rounding. Runs only in a
    /// `--features cuda` build on a machine with a GPU (skipped otherwise).
    #[test]
    fn joined_projections_on_cuda_give_the_separate_projections_logits() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let separate = prefill_and_decode(&random_bf16_model(&gpu)?, &gpu)?;
        let mut model = random_bf16_model(&gpu)?;
        model.freeze_weights()?;
        assert!(model
            .blocks
            .iter()
            .all(|b| b.self_attn.qkv.is_some() && b.mlp.gate_up.is_some()));
        assert_close_logits(&prefill_and_decode(&model, &gpu)?, &separate, 0.02)
    }

    /// The joined q/k/v and gate/up projections (run on the CPU through their test switch) give
    /// the logits of the separate ones, to f32 rounding: a full-sequence forward and a
    /// left-padded prefill with decoding steps of stories260K.
    #[test]
    fn joined_projections_give_the_separate_projections_logits() -> Result<()> {
        let run = |join: bool| -> Result<Vec<Tensor>> {
            let mut model = stories260k();
            crate::linear::tests::FUSE_ON_CPU.set(join);
            let frozen = model.freeze_weights();
            crate::linear::tests::FUSE_ON_CPU.set(false);
            frozen?;
            assert_eq!(model.blocks[0].self_attn.qkv.is_some(), join);
            assert_eq!(model.blocks[0].mlp.gate_up.is_some(), join);
            full_and_padded_decode_logits(&model)
        };
        assert_same_logits(&run(false)?, &run(true)?, 1e-4)
    }

    /// Prefill and decoding steps (across a buffer growth) with `rope_into_on` forced to
    /// `forced` and a row-major cache.
    fn decode_with_kv_written(
        model: &Llama,
        dev: &Device,
        forced: Option<bool>,
    ) -> Result<Vec<Tensor>> {
        crate::rope::tests::INTO_FORCED.set(forced);
        let run = || -> Result<Vec<Tensor>> {
            // Token ids below 96: the small random model's vocabulary.
            let seq: Vec<u32> = (0..24).map(|i| 1 + (i * 37) % 90).collect();
            let mut cache = model
                .new_decode_cache(vec![0, 4, 7], 10)
                .with_layout(crate::CacheLayout::RowMajor);
            let mut out = vec![model.forward(&Tensor::from_vec(seq, (3, 8), dev)?, &mut cache)?];
            for step in 0..4u32 {
                let next = Tensor::from_vec(vec![5 + step, 40 + step, 80 + step], (3, 1), dev)?;
                out.push(model.forward(&next, &mut cache)?);
            }
            out.iter().map(|t| t.to_device(&Device::Cpu)).collect()
        };
        let out = run();
        crate::rope::tests::INTO_FORCED.set(None);
        out
    }

    /// Decoding that writes its rotated keys and its values straight into a row-major cache
    /// (`rope_into`, on the CPU through its test switch) gives the logits of rotating and
    /// appending, to f32 rounding (the CPU op rotates in f64), across a buffer growth.
    #[test]
    fn keys_and_values_written_into_the_cache_give_the_appended_logits() -> Result<()> {
        let model = stories260k();
        let appended = decode_with_kv_written(&model, &Device::Cpu, Some(false))?;
        let written = decode_with_kv_written(&model, &Device::Cpu, Some(true))?;
        assert_same_logits(&appended, &written, 1e-4)
    }

    /// On the GPU the keys and values written into the cache give the appended path's logits
    /// bit for bit (the same rotation kernel). Runs only in a `--features cuda` build on a
    /// machine with a GPU.
    #[test]
    fn kv_written_into_the_cache_on_cuda_gives_the_appended_logits() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_or_skip() else {
            return Ok(());
        };
        let model = random_bf16_model(&gpu)?;
        let appended = decode_with_kv_written(&model, &gpu, Some(false))?;
        let written = decode_with_kv_written(&model, &gpu, None)?;
        for (a, w) in appended.iter().zip(&written) {
            assert_eq!(
                crate::custom_op::f32_bits(a)?,
                crate::custom_op::f32_bits(w)?
            );
        }
        Ok(())
    }

    /// A row-major cache view with spare columns reaches the matmuls as it is (no copy: its
    /// strides are kept); a transposed one is copied. The products equal those of contiguous
    /// copies: bit for bit on the CPU, within f32 rounding on a GPU (`--features cuda` builds
    /// with one; there cuBLAS reads the view through its leading dimension and batch stride).
    #[test]
    fn row_major_cache_views_reach_the_matmuls_without_a_copy_on_cpu_and_cuda() -> Result<()> {
        let (b, h, d) = (2, 3, 4);
        let mut devices = vec![Device::Cpu];
        if let Ok(gpu) = Device::new_cuda(0) {
            devices.push(gpu);
        }
        for dev in &devices {
            let chunk = |len: usize, seed: f32| {
                let n = b * h * len * d;
                Tensor::from_vec(
                    (0..n)
                        .map(|i| ((i as f32 + seed) * 0.37).sin())
                        .collect::<Vec<_>>(),
                    (b, h, len, d),
                    dev,
                )
            };
            for layout in [CacheLayout::RowMajor, CacheLayout::Transposed] {
                let mut cache = KvCache::with_capacity(1, vec![0; b], 16).with_layout(layout);
                let (k, v) = cache.append(0, &chunk(5, 0.0)?, &chunk(5, 100.0)?)?;
                let (mk, mv) = (matmul_operand(&k)?, matmul_operand(&v)?);
                let in_place = layout == CacheLayout::RowMajor;
                assert_eq!(mk.stride() == k.stride(), in_place, "{layout:?}");
                assert_eq!(mv.stride() == v.stride(), in_place, "{layout:?}");
                assert!(!k.is_contiguous());
                let q = chunk(2, 7.0)?;
                let scores = q.matmul(&mk.t()?)?;
                let want = q.matmul(&k.contiguous()?.t()?)?;
                let out = scores.matmul(&mv)?;
                let want_out = want.matmul(&v.contiguous()?)?;
                for (x, y) in [(scores, want), (out, want_out)] {
                    let x = x.flatten_all()?.to_vec1::<f32>()?;
                    let y = y.flatten_all()?.to_vec1::<f32>()?;
                    let same = |a: f32, b: f32| {
                        if dev.is_cpu() {
                            a.to_bits() == b.to_bits()
                        } else {
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0)
                        }
                    };
                    assert!(x.iter().zip(&y).all(|(&a, &b)| same(a, b)), "{layout:?}");
                }
            }
        }
        Ok(())
    }
}
