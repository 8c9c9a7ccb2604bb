//! Rotary position embeddings (the Hugging Face "rotate half" layout) with per-row positions.

use candle_core::{DType, Device, Result, Tensor, D};

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

    /// Rotates `x: [batch, heads, seq, head_dim]` with tables from [`Self::tables`].
    /// `fused` uses candle's single kernel (no gradient); otherwise a differentiable composition.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
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
