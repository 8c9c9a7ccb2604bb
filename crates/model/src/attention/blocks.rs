//! Views of the `[s, head_dim]` key and value blocks the fused attention reads in place:
//! row-major, or transposed as a decoding [`crate::KvCache`] stores them, at any strides.

use candle_core::{Layout, Result};

/// The `[s, hd]` blocks of k or v (`[b, kv_heads, s, hd]`), each either row-major (`[s, hd]`
/// contiguous) or transposed (each channel's `s` values contiguous, as a decoding
/// [`crate::KvCache`] hands them out), the blocks at any strides.
#[derive(Clone, Copy)]
pub(super) struct KvBlocks<'a, T> {
    data: &'a [T],
    start: usize,
    stride_b: usize,
    stride_h: usize,
    /// Distance between channels when transposed (`None`: row-major).
    channel_stride: Option<usize>,
    s: usize,
    hd: usize,
}

impl<'a, T> KvBlocks<'a, T> {
    pub(super) fn of(data: &'a [T], l: &Layout, what: &str) -> Result<Self> {
        let (dims, st) = (l.dims(), l.stride());
        let (&[b, h, s, hd], &[sb, sh, ss, sc]) = (dims, st) else {
            candle_core::bail!(
                "causal_attention: {what} must be [batch, kv_heads, seq, head_dim], got {dims:?}"
            )
        };
        let channel_stride = match block_layout(s, hd, ss, sc) {
            Some(BlockLayout::RowMajor) => None,
            Some(BlockLayout::Transposed) => Some(sc),
            None => candle_core::bail!("causal_attention: the [seq, head_dim] blocks of {what} must be contiguous or transposed (strides {st:?})"),
        };
        let block_end = match channel_stride {
            None => s * hd,
            Some(sc) => (hd.max(1) - 1) * sc + s,
        };
        let end = l.start_offset() + (b.max(1) - 1) * sb + (h.max(1) - 1) * sh + block_end;
        if end > data.len() {
            candle_core::bail!(
                "causal_attention: {what} reaches element {end} of a storage of {}",
                data.len()
            )
        }
        Ok(Self {
            data,
            start: l.start_offset(),
            stride_b: sb,
            stride_h: sh,
            channel_stride,
            s,
            hd,
        })
    }

    fn base(&self, b: usize, h: usize) -> usize {
        self.start + b * self.stride_b + h * self.stride_h
    }

    /// Block `(b, h)` as `[s, hd]` row-major (the blocks must be row-major).
    pub(super) fn row_major(&self, b: usize, h: usize) -> &'a [T] {
        debug_assert!(self.channel_stride.is_none());
        let at = self.base(b, h);
        &self.data[at..at + self.s * self.hd]
    }

    /// Block `(b, h)` transposed, with its channel stride, if the blocks are stored so.
    pub(super) fn transposed(&self, b: usize, h: usize) -> Option<(&'a [T], usize)> {
        let sc = self.channel_stride?;
        let at = self.base(b, h);
        Some((&self.data[at..at + (self.hd.max(1) - 1) * sc + self.s], sc))
    }
}

pub(super) enum BlockLayout {
    RowMajor,
    Transposed,
}

/// How an `[s, hd]` block with strides `(ss, sc)` lies in memory, if the kernel can read it.
pub(super) fn block_layout(s: usize, hd: usize, ss: usize, sc: usize) -> Option<BlockLayout> {
    if (sc == 1 || hd <= 1) && (ss == hd || s <= 1) {
        Some(BlockLayout::RowMajor)
    } else if ss == 1 && sc >= s {
        Some(BlockLayout::Transposed)
    } else {
        None
    }
}
