//! The batched KV cache: per-layer keys and values plus each row's left padding.
//!
//! Rows of a batch are left-padded to a common length, so that every row's newest token sits in
//! the same column. Column `c` of row `b` holds position `c - pad[b]`; padding columns are masked.
//!
//! Incremental decoding writes each new column in place into a buffer with spare columns (grown
//! by doubling) and hands out a `[batch, kv_heads, columns, head_dim]` view of the filled
//! columns, instead of concatenating the whole cache once per token and layer. The buffer's
//! [`CacheLayout`] is the one its readers take in place: transposed on the CPU (the fused
//! attention op), row-major on CUDA (cuBLAS's batched GEMMs in the composed attention, and the
//! flash kernel). A single forward pass (training, evaluation) keeps its keys and values as
//! they are, gradients included.

use candle_core::{Device, Result, Tensor};

/// How a decoding buffer lays out its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLayout {
    /// `[b, kv_heads, head_dim, capacity]`: each channel's values contiguous over the columns,
    /// which the CPU's fused attention reads in place (the CPU's layout).
    Transposed,
    /// `[b, kv_heads, capacity, head_dim]`: the view's `[columns, head_dim]` blocks row-major at a
    /// block stride of `capacity · head_dim`, which cuBLAS's strided batched GEMMs (keys
    /// transposed, values as they are) and the CUDA flash kernel read in place (CUDA's layout:
    /// decoding copies no key or value).
    RowMajor,
}

impl CacheLayout {
    /// The layout the attention on `dev` reads without a copy.
    pub fn for_device(dev: &Device) -> Self {
        if dev.is_cuda() {
            Self::RowMajor
        } else {
            Self::Transposed
        }
    }

    /// The buffer dimension that counts columns.
    fn column_dim(self) -> usize {
        match self {
            Self::Transposed => 3,
            Self::RowMajor => 2,
        }
    }
}

/// Keys and values of every layer for a batch, `[batch, kv_heads, columns, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    pads: Vec<usize>,
    columns: usize,
    /// Columns to allocate at the first append (0: exactly the first chunk).
    reserve: usize,
    /// The buffers' layout; `None`: [`CacheLayout::for_device`] of the first chunk.
    layout: Option<CacheLayout>,
    layers: Vec<Option<Layer>>,
}

/// One layer's keys and values.
#[derive(Debug, Clone)]
enum Layer {
    /// The first chunk as it came, `[b, h, columns, hd]` each (still part of any autograd graph).
    Plain(Tensor, Tensor),
    /// Buffers with spare columns, once a second chunk came or room was reserved.
    Buffer(Tensor, Tensor, CacheLayout),
}

impl KvCache {
    /// An empty cache for `num_layers` layers and rows with the given left paddings.
    pub fn new(num_layers: usize, pads: Vec<usize>) -> Self {
        Self {
            pads,
            columns: 0,
            reserve: 0,
            layout: None,
            layers: vec![None; num_layers],
        }
    }

    /// This cache with its buffers in `layout` whatever the device (the default follows the
    /// device: [`CacheLayout::for_device`]).
    pub fn with_layout(self, layout: CacheLayout) -> Self {
        Self {
            layout: Some(layout),
            ..self
        }
    }

    /// Like [`KvCache::new`], with room for `columns` columns before the buffers grow
    /// (for decoding; the cache then holds plain values, not part of any autograd graph).
    pub fn with_capacity(num_layers: usize, pads: Vec<usize>, columns: usize) -> Self {
        Self {
            reserve: columns,
            ..Self::new(num_layers, pads)
        }
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
        let rows = if uniform {
            &self.pads[..self.pads.len().min(1)]
        } else {
            &self.pads[..]
        };
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

    /// Appends the contiguous `k, v: [batch, kv_heads, len, head_dim]` to layer `layer` and
    /// returns all its cached keys and values, `[batch, kv_heads, columns + len, head_dim]`:
    /// views whose `[columns + len, head_dim]` blocks are contiguous, but which are not
    /// contiguous as a whole once the buffer has spare columns.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (start, len) = (self.columns, k.dim(2)?);
        let filled = start + len;
        let layout = self
            .layout
            .unwrap_or_else(|| CacheLayout::for_device(k.device()));
        let (bk, bv, layout) = match self.layers[layer].take() {
            None if self.reserve <= len => {
                self.layers[layer] = Some(Layer::Plain(k.clone(), v.clone()));
                return Ok((k.clone(), v.clone()));
            }
            None => (
                Self::buffer(k, self.reserve, start, layout)?,
                Self::buffer(v, self.reserve, start, layout)?,
                layout,
            ),
            Some(Layer::Plain(pk, pv)) => {
                let cap = filled.max(2 * start);
                let bk = Self::buffer(&pk, cap, 0, layout)?;
                let bv = Self::buffer(&pv, cap, 0, layout)?;
                Self::write(&bk, k, start, layout)?;
                Self::write(&bv, v, start, layout)?;
                (bk, bv, layout)
            }
            // A buffer keeps the layout it was made with.
            Some(Layer::Buffer(bk, bv, layout)) => {
                let capacity = bk.dim(layout.column_dim())?;
                let (bk, bv) = if capacity < filled {
                    let cap = filled.max(2 * capacity);
                    (
                        Self::grown(&bk, cap, start, layout)?,
                        Self::grown(&bv, cap, start, layout)?,
                    )
                } else {
                    (bk, bv)
                };
                Self::write(&bk, k, start, layout)?;
                Self::write(&bv, v, start, layout)?;
                (bk, bv, layout)
            }
        };
        let out = (
            Self::view(&bk, filled, layout)?,
            Self::view(&bv, filled, layout)?,
        );
        self.layers[layer] = Some(Layer::Buffer(bk, bv, layout));
        Ok(out)
    }

    /// [`Self::append`] for a caller that writes the chunk into the cache itself: `write` gets
    /// `[batch, kv_heads, len, head_dim]` views of the new columns of the key and value buffers
    /// (`like` gives the chunk's shape, dtype and device) and fills them, e.g. with the rotated
    /// keys, so that no chunk tensor is made and copied. Only for row-major buffers with room
    /// reserved ([`Self::with_capacity`]: decoding); otherwise nothing happens and it returns
    /// `None` (the caller appends as usual). Returns what [`Self::append`] returns.
    pub fn append_in_place(
        &mut self,
        layer: usize,
        like: &Tensor,
        write: impl FnOnce(&Tensor, &Tensor) -> Result<()>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (b, h, len, d) = like.dims4()?;
        let (start, filled) = (self.columns, self.columns + len);
        let layout = self
            .layout
            .unwrap_or_else(|| CacheLayout::for_device(like.device()));
        if layout != CacheLayout::RowMajor {
            return Ok(None);
        }
        let (bk, bv) = match self.layers[layer].take() {
            None if self.reserve > len => {
                let shape = (b, h, self.reserve.max(filled), d);
                (
                    Tensor::zeros(shape, like.dtype(), like.device())?,
                    Tensor::zeros(shape, like.dtype(), like.device())?,
                )
            }
            Some(Layer::Buffer(bk, bv, CacheLayout::RowMajor)) => {
                let capacity = bk.dim(2)?;
                if capacity < filled {
                    let cap = filled.max(2 * capacity);
                    let grown = |x: &Tensor| Self::grown(x, cap, start, CacheLayout::RowMajor);
                    (grown(&bk)?, grown(&bv)?)
                } else {
                    (bk, bv)
                }
            }
            other => {
                self.layers[layer] = other;
                return Ok(None);
            }
        };
        let written = write(&bk.narrow(2, start, len)?, &bv.narrow(2, start, len)?);
        let out = (bk.narrow(2, 0, filled)?, bv.narrow(2, 0, filled)?);
        self.layers[layer] = Some(Layer::Buffer(bk, bv, CacheLayout::RowMajor));
        written.map(|()| Some(out))
    }

    /// A zeroed buffer of `cap` columns in `layout` with `x: [b, kv_heads, len, head_dim]`
    /// written at column `start`.
    fn buffer(x: &Tensor, cap: usize, start: usize, layout: CacheLayout) -> Result<Tensor> {
        let (b, h, len, d) = x.dims4()?;
        let cap = cap.max(start + len);
        let shape = match layout {
            CacheLayout::Transposed => (b, h, d, cap),
            CacheLayout::RowMajor => (b, h, cap, d),
        };
        let buf = Tensor::zeros(shape, x.dtype(), x.device())?;
        Self::write(&buf, x, start, layout)?;
        Ok(buf)
    }

    fn write(buf: &Tensor, x: &Tensor, start: usize, layout: CacheLayout) -> Result<()> {
        match layout {
            CacheLayout::Transposed => buf.slice_set(&x.transpose(2, 3)?.contiguous()?, 3, start),
            CacheLayout::RowMajor => buf.slice_set(&x.contiguous()?, 2, start),
        }
    }

    /// The first `filled` columns of a buffer as `[b, kv_heads, filled, head_dim]` (a view).
    fn view(buf: &Tensor, filled: usize, layout: CacheLayout) -> Result<Tensor> {
        match layout {
            CacheLayout::Transposed => buf.narrow(3, 0, filled)?.transpose(2, 3),
            CacheLayout::RowMajor => buf.narrow(2, 0, filled),
        }
    }

    /// A copy of the first `filled` columns of `buf` in a buffer of `cap` columns.
    fn grown(buf: &Tensor, cap: usize, filled: usize, layout: CacheLayout) -> Result<Tensor> {
        Self::buffer(&Self::view(buf, filled, layout)?, cap, 0, layout)
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
            Some(Layer::Plain(k, _) | Layer::Buffer(k, _, _)) => k.device().clone(),
            None => Device::Cpu,
        };
        let idx = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            keep.len(),
            &dev,
        )?;
        for entry in self.layers.iter_mut().flatten() {
            *entry = match entry {
                Layer::Plain(k, v) => {
                    Layer::Plain(k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)
                }
                Layer::Buffer(k, v, layout) => {
                    Layer::Buffer(k.index_select(&idx, 0)?, v.index_select(&idx, 0)?, *layout)
                }
            };
        }
        self.pads = keep.iter().map(|&i| self.pads[i]).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(b: usize, len: usize, seed: f32) -> Result<Tensor> {
        let n = b * 2 * len * 3;
        Tensor::from_vec(
            (0..n).map(|i| seed + i as f32).collect::<Vec<_>>(),
            (b, 2, len, 3),
            &Device::Cpu,
        )
    }

    /// In-place appends (reserved, grown, after dropping rows) equal plain concatenation.
    #[test]
    fn appends_match_concatenation() -> Result<()> {
        for (reserve, layout) in [0, 2, 5, 64]
            .into_iter()
            .flat_map(|r| [(r, CacheLayout::Transposed), (r, CacheLayout::RowMajor)])
        {
            let mut cache = KvCache::with_capacity(1, vec![0, 0, 0], reserve).with_layout(layout);
            let (mut want_k, mut want_v) = (chunk(3, 4, 0.0)?, chunk(3, 4, 1000.0)?);
            let (k, v) = cache.append(0, &want_k, &want_v)?;
            cache.advance(4);
            assert_eq!(
                k.flatten_all()?.to_vec1::<f32>()?,
                want_k.flatten_all()?.to_vec1::<f32>()?
            );
            assert_eq!(
                v.flatten_all()?.to_vec1::<f32>()?,
                want_v.flatten_all()?.to_vec1::<f32>()?
            );
            for step in 0..6 {
                if step == 3 {
                    cache.select_rows(&[0, 2])?;
                    let idx = Tensor::new(&[0u32, 2], &Device::Cpu)?;
                    want_k = want_k.index_select(&idx, 0)?;
                    want_v = want_v.index_select(&idx, 0)?;
                }
                let b = cache.batch_size();
                let (nk, nv) = (
                    chunk(b, 1, 5000.0 + step as f32)?,
                    chunk(b, 1, 9000.0 + step as f32)?,
                );
                want_k = Tensor::cat(&[&want_k, &nk], 2)?;
                want_v = Tensor::cat(&[&want_v, &nv], 2)?;
                let (k, v) = cache.append(0, &nk, &nv)?;
                cache.advance(1);
                assert_eq!(k.dims(), want_k.dims());
                assert_eq!(
                    k.flatten_all()?.to_vec1::<f32>()?,
                    want_k.flatten_all()?.to_vec1::<f32>()?,
                    "reserve {reserve} {layout:?} step {step}"
                );
                assert_eq!(
                    v.flatten_all()?.to_vec1::<f32>()?,
                    want_v.flatten_all()?.to_vec1::<f32>()?,
                    "reserve {reserve} {layout:?} step {step}"
                );
            }
        }
        Ok(())
    }
}
