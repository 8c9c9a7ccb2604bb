//! The Llama decoder (RMSNorm, SwiGLU MLP, GQA attention with RoPE) over quantization hooks.

mod mlp;
mod self_attention;
#[cfg(test)]
mod tests;

use crate::attention::fused_attention_supported;
use crate::cache::KvCache;
use crate::causal_softmax::{causal_softmax_on, pads_tensor};
use crate::config::LlamaConfig;
use crate::hooks::{NoQuant, QuantHooks};
use crate::linear::{fuse_frozen, fused_gate_up_on, fused_qkv_on, QLinear};
use crate::rope::RotaryEmbedding;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

use mlp::Mlp;
use self_attention::Attention;

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
