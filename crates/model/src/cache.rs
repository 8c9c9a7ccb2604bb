//! The batched KV cache: per-layer keys and values plus each row's left padding.
//!
//! Rows of a batch are left-padded to a common length, so that every row's newest token sits in
//! the same column. Column `c` of row `b` holds position `c - pad[b]`; padding columns are masked.

use candle_core::{Device, Result, Tensor};

/// Keys and values of every layer for a batch, `[batch, kv_heads, columns, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    pads: Vec<usize>,
    columns: usize,
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers and rows with the given left paddings.
    pub fn new(num_layers: usize, pads: Vec<usize>) -> Self {
        Self { pads, columns: 0, layers: vec![None; num_layers] }
    }

    /// An empty cache for `batch` unpadded rows.
    pub fn unpadded(num_layers: usize, batch: usize) -> Self {
        Self::new(num_layers, vec![0; batch])
    }

    pub fn batch_size(&self) -> usize {
        self.pads.len()
    }

    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Columns already in the cache (padding included).
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Positions of the next `len` columns, `[batch, len]` u32 (padding columns get 0).
    pub fn next_positions(&self, len: usize, dev: &Device) -> Result<Tensor> {
        let mut pos = Vec::with_capacity(self.pads.len() * len);
        for &pad in &self.pads {
            for c in self.columns..self.columns + len {
                pos.push(c.saturating_sub(pad) as u32);
            }
        }
        Tensor::from_vec(pos, (self.pads.len(), len), dev)
    }

    /// Additive attention mask for the next `len` query columns over all `columns + len` key
    /// columns, `[batch, 1, 1, len, columns + len]`, or None when nothing needs masking. When
    /// every row has the same padding (e.g. none, in training) the batch dim is 1 (it
    /// broadcasts): one row's mask is built on the host and uploaded, not `batch` copies.
    pub fn next_mask(&self, len: usize, dev: &Device) -> Result<Option<Tensor>> {
        let no_pads = self.pads.iter().all(|&p| p == 0);
        if len == 1 && no_pads {
            return Ok(None);
        }
        let keys = self.columns + len;
        let uniform = self.pads.windows(2).all(|w| w[0] == w[1]);
        let rows = if uniform { &self.pads[..self.pads.len().min(1)] } else { &self.pads[..] };
        let mut mask = Vec::with_capacity(rows.len() * len * keys);
        for &pad in rows {
            for q in self.columns..self.columns + len {
                for k in 0..keys {
                    // A real query never sees padding; a padding query (whose output is
                    // discarded) sees causally so that its softmax stays finite.
                    let hidden = k > q || (k < pad && q >= pad);
                    mask.push(if hidden { f32::NEG_INFINITY } else { 0.0 });
                }
            }
        }
        Tensor::from_vec(mask, (rows.len(), 1, 1, len, keys), dev).map(Some)
    }

    /// Appends `k, v: [batch, kv_heads, len, head_dim]` to layer `layer` and returns the
    /// whole cached keys and values of that layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Marks `len` new columns as written (called once per forward, after all layers).
    pub fn advance(&mut self, len: usize) {
        self.columns += len;
    }

    /// Keeps only the rows in `keep` (e.g. drop finished sequences from a decoding batch).
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() == self.pads.len() {
            return Ok(());
        }
        let dev = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => Device::Cpu,
        };
        let idx = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), keep.len(), &dev)?;
        for entry in self.layers.iter_mut().flatten() {
            *entry = (entry.0.index_select(&idx, 0)?, entry.1.index_select(&idx, 0)?);
        }
        self.pads = keep.iter().map(|&i| self.pads[i]).collect();
        Ok(())
    }
}
