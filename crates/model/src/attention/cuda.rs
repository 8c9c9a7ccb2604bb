//! The CUDA forward of the fused attention: kernels/flash_attention.cu (flash attention on tensor
//! cores, bf16 and f16, head dims in [`HEAD_DIMS`]), loaded once per device as a PTX module.
//! Written without a GPU at hand: its arithmetic is checked on the CPU through an emulation of
//! CUDA (crates/model/tests/flash_attention_emulated.rs), and on a GPU by this crate's CUDA test
//! (`make build-cuda CUDA_TESTS=1`, then the packed tests on the GPU machine).

use super::kernel::Dims;
use super::CausalAttention;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Result, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
/// Query rows per thread block (`BR` in the kernel) and threads per block.
const ROWS_PER_BLOCK: usize = 64;
const THREADS: u32 = 128;

/// `[batch, heads, seq, head_dim]` strides of `l` in elements, if every `[seq, head_dim]` block
/// is row-major and every block start is 16-byte aligned (the kernel's vector loads), given in
/// 16-bit elements.
pub(super) fn kernel_strides(l: &Layout) -> Option<(usize, usize)> {
    let (dims, st) = (l.dims(), l.stride());
    let (&[_, _, s, hd], &[sb, sh, ss, sc]) = (dims, st) else {
        return None;
    };
    let row_major = (sc == 1 || hd <= 1) && (ss == hd || s <= 1);
    let aligned = [l.start_offset(), sb, sh, hd]
        .iter()
        .all(|x| x.is_multiple_of(8));
    (row_major && aligned).then_some((sb, sh))
}

pub(super) fn forward(
    op: &CausalAttention,
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let d = Dims::of(lq.dims(), lk.dims(), lv.dims(), op.pads.len())?;
    if !super::HEAD_DIMS.contains(&d.hd) {
        candle_core::bail!(
            "causal_attention on cuda: head_dim {}, expected one of {:?}",
            d.hd,
            super::HEAD_DIMS
        );
    }
    let Some((q_start, q_end)) = lq
        .contiguous_offsets()
        .filter(|(start, _)| start.is_multiple_of(8))
    else {
        candle_core::bail!("causal_attention on cuda: q must be contiguous and 16-byte aligned");
    };
    let (Some((k_sb, k_sh)), Some((v_sb, v_sh))) = (kernel_strides(lk), kernel_strides(lv)) else {
        candle_core::bail!(
            "causal_attention on cuda: the [seq, head_dim] blocks of k and v must be row-major and \
             16-byte aligned (k strides {:?}, v strides {:?})",
            lk.stride(),
            lv.stride()
        );
    };
    let extent = |l: &Layout, sb: usize, sh: usize| {
        l.start_offset() + (d.b - 1) * sb + (d.nkv - 1) * sh + d.s * d.hd
    };
    let (k_end, v_end) = (extent(lk, k_sb, k_sh), extent(lv, v_sb, v_sh));
    let dev = &q.device;
    let pads: Vec<u32> = op.pads.iter().map(|&p| p as u32).collect();
    let pads = dev.clone_htod(&pads)?;
    let el = d.b * d.nh * d.t * d.hd;
    let cfg = LaunchConfig {
        grid_dim: (d.t.div_ceil(ROWS_PER_BLOCK) as u32, d.nh as u32, d.b as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0, // static shared memory, at most 44 KiB
    };
    let (heads, kv_heads, t, s) = (d.nh as i32, d.nkv as i32, d.t as i32, d.s as i32);
    let (k_sb, k_sh, v_sb, v_sh) = (k_sb as i64, k_sh as i64, v_sb as i64, v_sh as i64);
    let scale = op.scale as f32;
    macro_rules! launch {
        ($variant:ident, $ty:ty, $name:literal) => {{
            let (
                CudaStorageSlice::$variant(qs),
                CudaStorageSlice::$variant(ks),
                CudaStorageSlice::$variant(vs),
            ) = (&q.slice, &k.slice, &v.slice)
            else {
                candle_core::bail!("causal_attention on cuda: q, k and v must have one dtype")
            };
            if ks.len() < k_end || vs.len() < v_end {
                candle_core::bail!(
                    "causal_attention on cuda: k or v reaches past its storage ({k_end}, {v_end} \
                     elements of {}, {})",
                    ks.len(),
                    vs.len()
                );
            }
            let (qs, ks, vs) = (
                qs.slice(q_start..q_end),
                ks.slice(lk.start_offset()..),
                vs.slice(lv.start_offset()..),
            );
            let func = dev.get_or_load_custom_func(
                &format!("{}_hd{}", $name, d.hd),
                "qat_flash_attention",
                PTX,
            )?;
            // SAFETY: the kernel writes every output element.
            let out = unsafe { dev.alloc::<$ty>(el)? };
            let mut b = func.builder();
            b.arg(&qs).arg(&ks).arg(&vs).arg(&out).arg(&pads);
            b.arg(&heads).arg(&kv_heads).arg(&t).arg(&s);
            b.arg(&k_sb).arg(&k_sh).arg(&v_sb).arg(&v_sh).arg(&scale);
            // SAFETY: shapes, strides and extents were checked above against the storages.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorageSlice::$variant(out)
        }};
    }
    let slice = match &q.slice {
        CudaStorageSlice::BF16(_) => launch!(BF16, half::bf16, "flash_attention_fwd_bf16"),
        CudaStorageSlice::F16(_) => launch!(F16, half::f16, "flash_attention_fwd_f16"),
        _ => candle_core::bail!(
            "causal_attention on cuda: dtype {:?}, expected BF16 or F16",
            q.dtype()
        ),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        lq.shape().clone(),
    ))
}
