//! The CUDA side of the fused attention: the flash-attention kernels (tensor cores, bf16 and f16,
//! head dims in [`super::HEAD_DIMS`]) of kernels/flash_attention.cu (forward, and the log-sum-exp
//! the backward needs) and kernels/flash_attention_backward.cu (dK/dV and dQ), loaded once per
//! device as PTX modules. Written without a GPU at hand: their arithmetic is checked on the CPU
//! through an emulation of CUDA (crates/model/tests/flash_attention_emulated.rs), and on a GPU by
//! this crate's CUDA test (`make build-cuda CUDA_TESTS=1`, then the packed tests there).

use super::kernel::Dims;
use super::CausalAttention;
use crate::custom_op::span;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::CudaDevice;
use candle_core::{DType, Layout, Result, Shape, Storage, Tensor};

const FORWARD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const BACKWARD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention_backward.ptx"));
/// Packed query rows per forward thread block for a head dim (kernels/flash_attention.cu: BR, 4
/// warps of ROW_TILES row tiles of 16: two up to head dim 64, else one).
fn forward_rows_per_block(hd: usize) -> usize {
    if hd <= 64 {
        128
    } else {
        64
    }
}
/// Query rows per dq block (DQ_ROWS), and the threads of the forward and dq blocks.
const DQ_ROWS_PER_BLOCK: usize = 64;
const THREADS: u32 = 128;
/// Keys per dkdv thread block (one block per key tile, query head and batch row), and its threads.
const KEYS_PER_BLOCK: usize = 64;
const DKDV_THREADS: u32 = 128;
/// Threads per block of the delta kernel (one per query row).
const DELTA_THREADS: u32 = 256;

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

/// The checked shapes and strides of one call.
struct Geometry {
    d: Dims,
    q_range: (usize, usize),
    /// The element ranges of k and v the kernels read.
    k_range: (usize, usize),
    v_range: (usize, usize),
    strides: [i64; 4], // k_sb, k_sh, v_sb, v_sh
}

impl Geometry {
    fn of(op: &CausalAttention, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Self> {
        let d = Dims::of(lq.dims(), lk.dims(), lv.dims(), op.pads.len())?;
        if !super::HEAD_DIMS.contains(&d.hd) {
            candle_core::bail!(
                "causal_attention on cuda: head_dim {}, expected one of {:?}",
                d.hd,
                super::HEAD_DIMS
            );
        }
        let Some(q_range) = aligned_contiguous(lq) else {
            candle_core::bail!(
                "causal_attention on cuda: q must be contiguous and 16-byte aligned"
            );
        };
        let (Some((k_sb, k_sh)), Some((v_sb, v_sh))) = (kernel_strides(lk), kernel_strides(lv))
        else {
            candle_core::bail!(
                "causal_attention on cuda: the [seq, head_dim] blocks of k and v must be row-major \
                 and 16-byte aligned (k strides {:?}, v strides {:?})",
                lk.stride(),
                lv.stride()
            );
        };
        Ok(Self {
            d,
            q_range,
            k_range: (lk.start_offset(), lk.start_offset() + span(lk)),
            v_range: (lv.start_offset(), lv.start_offset() + span(lv)),
            strides: [k_sb as i64, k_sh as i64, v_sb as i64, v_sh as i64],
        })
    }

    fn grid(&self, per_block: usize, over: usize, y: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (over.div_ceil(per_block) as u32, y as u32, self.d.b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0, // static shared memory, at most 45 KiB
        }
    }
}

/// The element range of a contiguous layout whose start is 16-byte aligned (16-bit elements).
fn aligned_contiguous(l: &Layout) -> Option<(usize, usize)> {
    l.contiguous_offsets()
        .filter(|(start, _)| start.is_multiple_of(8))
}

/// `(sb, sh, st)` element strides of batch row, head and query row of a `[b, t, heads, head_dim]`
/// layout (the op's output, token-major) whose rows are contiguous and whose strides and start
/// are 16-byte aligned (the kernels' vector loads, 16-bit elements).
pub(super) fn token_major_strides(l: &Layout) -> Option<[i64; 3]> {
    let (&[_, _, _, hd], &[sb, st, sh, sc]) = (l.dims(), l.stride()) else {
        return None;
    };
    let aligned = [l.start_offset(), sb, st, sh]
        .iter()
        .all(|x| x.is_multiple_of(8));
    ((sc == 1 || hd <= 1) && aligned).then_some([sb as i64, sh as i64, st as i64])
}

/// The token-major strides (for a fresh `[b, t, heads, head_dim]` output of these dims).
fn fresh_token_major(d: &Dims) -> [i64; 3] {
    let st = d.nh * d.hd;
    [(d.t * st) as i64, d.hd as i64, st as i64]
}

/// A `[b, t, heads, head_dim]` operand (dout or the output) as a typed view from its layout's
/// start and its strides, checked against its storage.
fn token_major_view<'a, T: CudaDType>(
    x: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<(CudaView<'a, T>, [i64; 3])> {
    let Some(strides) = token_major_strides(l) else {
        candle_core::bail!(
            "causal_attention backward on cuda: {what} must have contiguous, 16-byte aligned rows \
             (strides {:?})",
            l.stride()
        );
    };
    let xs = x.as_cuda_slice::<T>()?;
    let extent = span(l);
    if xs.len() < l.start_offset() + extent {
        candle_core::bail!(
            "causal_attention backward on cuda: {what} reaches past its storage ({} elements of {})",
            l.start_offset() + extent,
            xs.len()
        );
    }
    Ok((xs.slice(l.start_offset()..), strides))
}

/// q, k and v as typed views at their layouts' starts, checked against their storages.
#[allow(clippy::type_complexity)]
fn views<'a, T: CudaDType>(
    g: &Geometry,
    q: &'a CudaStorage,
    k: &'a CudaStorage,
    v: &'a CudaStorage,
) -> Result<(CudaView<'a, T>, CudaView<'a, T>, CudaView<'a, T>)> {
    let (qs, ks, vs) = (
        q.as_cuda_slice::<T>()?,
        k.as_cuda_slice::<T>()?,
        v.as_cuda_slice::<T>()?,
    );
    let (k_end, v_end) = (g.k_range.1, g.v_range.1);
    if ks.len() < k_end || vs.len() < v_end {
        candle_core::bail!(
            "causal_attention on cuda: k or v reaches past its storage ({k_end}, {v_end} \
             elements of {}, {})",
            ks.len(),
            vs.len()
        );
    }
    Ok((
        qs.slice(g.q_range.0..g.q_range.1),
        ks.slice(g.k_range.0..),
        vs.slice(g.v_range.0..),
    ))
}

/// The row paddings as the kernels read them: a view of the op's device tensor, or of a fresh
/// upload of its host paddings.
enum RowPads<'a> {
    Given(candle_core::StorageRef<'a>, usize),
    Uploaded(CudaSlice<u32>),
}

impl<'a> RowPads<'a> {
    fn of(op: &'a CausalAttention, dev: &CudaDevice) -> Result<Self> {
        let Some(t) = &op.device_pads else {
            let host: Vec<u32> = op.pads.iter().map(|&p| p as u32).collect();
            return Ok(Self::Uploaded(dev.clone_htod(&host)?));
        };
        let (storage, layout) = t.storage_and_layout();
        match (layout.contiguous_offsets(), t.dtype()) {
            (Some((start, end)), DType::U32) if end - start == op.pads.len() => {
                Ok(Self::Given(storage, start))
            }
            _ => candle_core::bail!(
                "causal_attention on cuda: device pads must be {} contiguous u32, got {:?} {:?}",
                op.pads.len(),
                t.dtype(),
                t.dims()
            ),
        }
    }

    fn view(&self) -> Result<CudaView<'_, u32>> {
        match self {
            Self::Uploaded(slice) => Ok(slice.slice(0..)),
            Self::Given(storage, start) => match &**storage {
                Storage::Cuda(s) => Ok(s.as_cuda_slice::<u32>()?.slice(*start..)),
                _ => candle_core::bail!("causal_attention on cuda: device pads not on the GPU"),
            },
        }
    }
}

/// The kernels' dtype suffix.
fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => {
            candle_core::bail!("causal_attention on cuda: dtype {other:?}, expected BF16 or F16")
        }
    }
}

/// The kernels' names end in the dtype and the head dim.
fn kernel_name(prefix: &str, dtype: DType, hd: usize) -> Result<String> {
    Ok(format!("{prefix}_{}_hd{hd}", dtype_suffix(dtype)?))
}

/// Launches the forward kernel: writes `out` (token-major, [b, t, heads, head_dim]) and/or `lse`
/// (a null pointer where `None`).
#[allow(clippy::too_many_arguments)]
fn launch_forward<T: CudaDType + DeviceRepr>(
    g: &Geometry,
    dev: &CudaDevice,
    dtype: DType,
    (q, k, v): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
    out: Option<&CudaSlice<T>>,
    lse: Option<&CudaSlice<f32>>,
    pads: &CudaView<'_, u32>,
    scale: f32,
) -> Result<()> {
    let d = &g.d;
    let name = kernel_name("flash_attention_fwd", dtype, d.hd)?;
    let func = dev.get_or_load_custom_func(&name, "qat_flash_attention", FORWARD_PTX)?;
    let null = 0u64;
    let (heads, kv_heads, t, s) = (d.nh as i32, d.nkv as i32, d.t as i32, d.s as i32);
    let mut b = func.builder();
    b.arg(q).arg(k).arg(v);
    match out {
        Some(out) => b.arg(out),
        None => b.arg(&null),
    };
    match lse {
        Some(lse) => b.arg(lse),
        None => b.arg(&null),
    };
    b.arg(pads).arg(&heads).arg(&kv_heads).arg(&t).arg(&s);
    for x in &g.strides {
        b.arg(x);
    }
    let out_strides = fresh_token_major(d);
    for x in &out_strides {
        b.arg(x);
    }
    b.arg(&scale);
    // Blocks of forward_rows_per_block packed query rows (the rows of a kv head's query heads,
    // head-major) per (kv head, batch row).
    let packed_rows = d.nh / d.nkv * d.t;
    // SAFETY: shapes, strides and extents were checked against the storages (Geometry, views);
    // out holds b·heads·t·hd elements and lse b·heads·t.
    unsafe { b.launch(g.grid(forward_rows_per_block(d.hd), packed_rows, d.nkv)) }.w()?;
    Ok(())
}

/// The op's forward on CUDA: the output token-major, `[b, t, heads, head_dim]`, which
/// [`super::causal_attention`] hands out as a `[b, heads, t, head_dim]` view (and which the output
/// projection reads without a transpose copy).
pub(super) fn forward(
    op: &CausalAttention,
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let g = Geometry::of(op, lq, lk, lv)?;
    let dev = &q.device;
    let pads = RowPads::of(op, dev)?;
    let pads = pads.view()?;
    let el = g.d.b * g.d.nh * g.d.t * g.d.hd;
    let scale = op.scale as f32;
    // SAFETY: the kernel writes every element of lse (b·heads·t) when given one.
    let lse = match &op.saved_lse {
        Some(_) => Some(unsafe { dev.alloc::<f32>(g.d.b * g.d.nh * g.d.t)? }),
        None => None,
    };
    macro_rules! run {
        ($variant:ident, $ty:ty) => {{
            // SAFETY: the kernel writes every output element.
            let out = unsafe { dev.alloc::<$ty>(el)? };
            let (qv, kv, vv) = views::<$ty>(&g, q, k, v)?;
            let dtype = q.dtype();
            launch_forward(
                &g,
                dev,
                dtype,
                (&qv, &kv, &vv),
                Some(&out),
                lse.as_ref(),
                &pads,
                scale,
            )?;
            CudaStorageSlice::$variant(out)
        }};
    }
    let slice = match q.dtype() {
        DType::BF16 => run!(BF16, half::bf16),
        DType::F16 => run!(F16, half::f16),
        other => {
            candle_core::bail!("causal_attention on cuda: dtype {other:?}, expected BF16 or F16")
        }
    };
    if let (Some(slot), Some(lse)) = (&op.saved_lse, lse) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    }
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((g.d.b, g.d.t, g.d.nh, g.d.hd)),
    ))
}

/// `(dq, dk, dv)` for the output gradient `dout` of `out = causal_attention(q, k, v)` (the
/// tensors the op was applied to; `out` and `dout` token-major, `[b, t, heads, head_dim]`), in q's
/// dtype: the log-sum-exp of every query row (the one the forward pass saved, else from the
/// forward kernel again: the same kernel on the same inputs, so the same bits),
/// `delta = rowsum(dout ∘ out)` in f32 (the delta kernel), then the dK/dV kernel (per query head,
/// summed over each kv head's heads) and the dQ kernel (f32 accumulation, fixed summation order,
/// written in q's dtype).
pub(super) fn backward(
    op: &CausalAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = q.dtype();
    let token_major = |x: Tensor| -> Result<Tensor> {
        match token_major_strides(x.layout()) {
            Some(_) => Ok(x),
            None => x.force_contiguous(),
        }
    };
    let (dout, out) = (
        token_major(dout.to_dtype(dtype)?)?,
        token_major(out.clone())?,
    );
    let (qs, lq) = q.storage_and_layout();
    let (ks, lk) = k.storage_and_layout();
    let (vs, lv) = v.storage_and_layout();
    let (dos, ldo) = dout.storage_and_layout();
    let (os, lo) = out.storage_and_layout();
    let (
        Storage::Cuda(qs),
        Storage::Cuda(ks),
        Storage::Cuda(vs),
        Storage::Cuda(dos),
        Storage::Cuda(os),
    ) = (&*qs, &*ks, &*vs, &*dos, &*os)
    else {
        candle_core::bail!("causal_attention backward on cuda: every input must be on the GPU")
    };
    let g = Geometry::of(op, lq, lk, lv)?;
    let d = &g.d;
    let want = [d.b, d.t, d.nh, d.hd];
    if ldo.dims() != want || lo.dims() != want {
        candle_core::bail!(
            "causal_attention backward on cuda: dout {:?} and out {:?}, expected {want:?}",
            ldo.dims(),
            lo.dims()
        );
    }
    let dev = qs.device.clone();
    let pads = RowPads::of(op, &dev)?;
    let pads = pads.view()?;
    let (rows, kv_heads_el) = (d.b * d.nh * d.t, d.b * d.nh * d.s * d.hd);
    let saved_lse = op
        .saved_lse
        .as_ref()
        .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take())
        .filter(|lse| lse.len() == rows);
    let recompute_lse = saved_lse.is_none();
    // SAFETY: the forward kernel writes every element of a fresh lse, the delta kernel every
    // element of delta, the dK/dV kernel every element of the per-query-head dk and dv.
    let (lse, delta, dk, dv) = unsafe {
        (
            match saved_lse {
                Some(lse) => lse,
                None => dev.alloc::<f32>(rows)?,
            },
            dev.alloc::<f32>(rows)?,
            dev.alloc::<f32>(kv_heads_el)?,
            dev.alloc::<f32>(kv_heads_el)?,
        )
    };
    let inputs = BackwardInputs {
        g: &g,
        dev: &dev,
        dtype,
        storages: [qs, ks, vs, dos, os],
        layouts: [ldo, lo],
        pads: &pads,
        scale: op.scale as f32,
    };
    let outputs = (&lse, &delta, &dk, &dv);
    let dq = match dtype {
        DType::BF16 => CudaStorageSlice::BF16(inputs.launch::<half::bf16>(recompute_lse, outputs)?),
        DType::F16 => CudaStorageSlice::F16(inputs.launch::<half::f16>(recompute_lse, outputs)?),
        other => candle_core::bail!(
            "causal_attention backward on cuda: dtype {other:?}, expected BF16 or F16"
        ),
    };
    let tensor = |storage: CudaStorage, shape: (usize, usize, usize, usize)| {
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    };
    let f32_tensor = |slice| CudaStorage::wrap_cuda_slice(slice, dev.clone());
    // The query heads of each kv head, summed (f32), for dk and dv.
    let per_kv_head = |per_head: Tensor| -> Result<Tensor> {
        let rep = d.nh / d.nkv;
        if rep == 1 {
            return Ok(per_head);
        }
        per_head.reshape((d.b, d.nkv, rep, d.s, d.hd))?.sum(2)
    };
    let dq = CudaStorage {
        slice: dq,
        device: dev.clone(),
    };
    Ok((
        tensor(dq, (d.b, d.nh, d.t, d.hd)),
        per_kv_head(tensor(f32_tensor(dk), (d.b, d.nh, d.s, d.hd)))?.to_dtype(dtype)?,
        per_kv_head(tensor(f32_tensor(dv), (d.b, d.nh, d.s, d.hd)))?.to_dtype(dtype)?,
    ))
}

/// What the backward kernels read: q, k, v, dout and out (storages; dout's and out's layouts).
struct BackwardInputs<'a> {
    g: &'a Geometry,
    dev: &'a CudaDevice,
    dtype: DType,
    storages: [&'a CudaStorage; 5],
    layouts: [&'a Layout; 2],
    pads: &'a CudaView<'a, u32>,
    scale: f32,
}

impl BackwardInputs<'_> {
    /// Runs the forward kernel for lse (if `recompute_lse`), then the delta, dK/dV and dQ
    /// kernels into `(lse, delta, dk, dv)`; returns dq.
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        recompute_lse: bool,
        (lse, delta, dk, dv): (
            &CudaSlice<f32>,
            &CudaSlice<f32>,
            &CudaSlice<f32>,
            &CudaSlice<f32>,
        ),
    ) -> Result<CudaSlice<T>> {
        let (g, dev, dtype) = (self.g, self.dev, self.dtype);
        let d = &g.d;
        let [qs, ks, vs, dos, os] = self.storages;
        let (qv, kv, vv) = views::<T>(g, qs, ks, vs)?;
        if recompute_lse {
            launch_forward::<T>(
                g,
                dev,
                dtype,
                (&qv, &kv, &vv),
                None,
                Some(lse),
                self.pads,
                self.scale,
            )?;
        }
        let (dov, do_strides) = token_major_view::<T>(dos, self.layouts[0], "dout")?;
        let (ov, o_strides) = token_major_view::<T>(os, self.layouts[1], "out")?;
        let rows = d.b * d.nh * d.t;
        let (heads, kv_heads, t, s) = (d.nh as i32, d.nkv as i32, d.t as i32, d.s as i32);
        let load = |name: &str| {
            dev.get_or_load_custom_func(name, "qat_flash_attention_backward", BACKWARD_PTX)
        };

        let delta_name = format!("flash_attention_bwd_delta_{}", dtype_suffix(dtype)?);
        let func = load(&delta_name)?;
        let (hd, rows32) = (d.hd as i32, rows as i32);
        let mut b = func.builder();
        b.arg(&dov).arg(&ov).arg(delta);
        b.arg(&heads).arg(&t).arg(&hd);
        for x in do_strides.iter().chain(&o_strides) {
            b.arg(x);
        }
        b.arg(&rows32);
        let cfg = LaunchConfig {
            grid_dim: (
                rows.div_ceil(DELTA_THREADS as usize).clamp(1, 1 << 16) as u32,
                1,
                1,
            ),
            block_dim: (DELTA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dout and out were checked against their storages (token_major_view); delta
        // holds one f32 per query row.
        unsafe { b.launch(cfg) }.w()?;

        // SAFETY: the dQ kernel writes every element of dq.
        let dq = unsafe { dev.alloc::<T>(rows * d.hd)? };
        // The dK/dV and dQ kernels share their arguments but the outputs.
        macro_rules! launch_backward {
            ($prefix:literal, $cfg:expr, $($output:expr),+) => {{
                let func = load(&kernel_name($prefix, dtype, d.hd)?)?;
                let mut b = func.builder();
                b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(lse).arg(delta);
                $(b.arg($output);)+
                b.arg(self.pads).arg(&heads).arg(&kv_heads).arg(&t).arg(&s);
                for x in g.strides.iter().chain(&do_strides) {
                    b.arg(x);
                }
                b.arg(&self.scale);
                // SAFETY: q, k, v checked as for the forward, dout against its storage; lse and
                // delta hold one f32 per query row; dq holds b·heads·t·hd elements, dk and dv
                // b·heads·s·hd.
                unsafe { b.launch($cfg) }.w()?;
            }};
        }
        launch_backward!(
            "flash_attention_bwd_dkdv",
            LaunchConfig {
                block_dim: (DKDV_THREADS, 1, 1),
                ..g.grid(KEYS_PER_BLOCK, d.s, d.nh)
            },
            dk,
            dv
        );
        launch_backward!(
            "flash_attention_bwd_dq",
            g.grid(DQ_ROWS_PER_BLOCK, d.t, d.nh),
            &dq
        );
        Ok(dq)
    }
}
