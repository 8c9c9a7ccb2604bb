//! The per-position math of [`crate::sampler`] for a batch of logits rows on the GPU
//! (kernels/sample_rows.cu): each row's top-K log-probabilities and its next token, so that a
//! decode step copies 2K + 2 numbers per row to the host instead of the row's logits.

use crate::sampler::{self, SamplingParams};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use qat_model::kernel_switch::cuda_kernel_on;

/// The largest K the kernel keeps (its shared-memory sort); larger K run on the host.
pub const MAX_K: usize = 1024;

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct PickedRow {
    /// The K largest log-probabilities' ids, largest first, ties by the smaller id.
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f32>,
    /// The next token (greedy or drawn) and its log-probability.
    pub token: u32,
    pub logprob: f32,
}

/// Whether [`pick_rows`] runs for `logits` (`[rows, vocab]`) with K = `k` under `sampling`: a
/// `cuda` build, CUDA logits of f32, bf16 or f16, 1 <= K <= min(vocab, [`MAX_K`]), sampling
/// without truncation (top-k / top-p stay on the host), and `QAT_CUDA_FUSED_SAMPLE` not `0`.
pub fn available(logits: &Tensor, k: usize, sampling: &SamplingParams) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fits(logits, k, sampling) && cuda_kernel_on(&ON, "QAT_CUDA_FUSED_SAMPLE", logits)
}

/// [`available`] but for the device and the switch: K and the sampling settings are the op's.
pub(crate) fn fits(logits: &Tensor, k: usize, sampling: &SamplingParams) -> bool {
    let vocab = logits.dims().last().copied().unwrap_or(0);
    (1..=vocab.min(MAX_K)).contains(&k)
        && vocab < u32::MAX as usize
        && !sampler::truncates(sampling, vocab)
}

/// For each row of `logits: [rows, vocab]` (contiguous, on CUDA): the K largest
/// log-probabilities, and the next token: the greedy one where `draws[row]` is negative, else the
/// one the inverse CDF of `exp((z - max) / temperature)` gives for the uniform `draws[row]`. The
/// same as [`sampler::log_softmax_exps`], [`sampler::top_k_indices`], [`sampler::argmax`] and
/// [`sampler::draw`] (untruncated) on the host, up to the order of f64 additions (tested through
/// the CUDA emulation: the same bits). One transfer of `rows x (2K + 2)` u32 to the host. CPU
/// logits go through those host functions (for tests; [`available`] is false there).
pub fn pick_rows(
    logits: &Tensor,
    draws: &[f64],
    temperature: f64,
    k: usize,
) -> Result<Vec<PickedRow>> {
    let (rows, vocab) = logits.dims2()?;
    if draws.len() != rows {
        candle_core::bail!("pick_rows: {} draws for {rows} rows", draws.len());
    }
    if k > vocab.min(MAX_K) {
        candle_core::bail!("pick_rows: K {k} above min(vocab {vocab}, {MAX_K})");
    }
    let op = SampleRows {
        draws: draws.to_vec(),
        temperature,
        k,
    };
    let packed = logits.apply_op1_no_bwd(&op)?.to_vec2::<u32>()?;
    Ok(packed
        .into_iter()
        .map(|row| PickedRow {
            topk_ids: row[..k].to_vec(),
            topk_logprobs: row[k..2 * k].iter().map(|&b| f32::from_bits(b)).collect(),
            token: row[2 * k],
            logprob: f32::from_bits(row[2 * k + 1]),
        })
        .collect())
}

/// The op: `[rows, vocab]` logits to `[rows, 2K + 2]` u32 (K ids, K log-probability bits, the
/// token, its log-probability's bits).
struct SampleRows {
    draws: Vec<f64>,
    temperature: f64,
    k: usize,
}

impl CustomOp1 for SampleRows {
    fn name(&self) -> &'static str {
        "sample_rows"
    }

    /// The host functions themselves, row by row: the reference the kernel is tested against,
    /// and what lets the callers' bookkeeping be tested without a GPU.
    fn cpu_fwd(&self, logits: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (rows, vocab) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sample_rows: the logits must be contiguous");
        };
        let z: Vec<f32> = match logits {
            CpuStorage::F32(v) => v[start..end].to_vec(),
            CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            _ => candle_core::bail!("sample_rows: logits must be f32, bf16 or f16"),
        };
        let params = SamplingParams {
            temperature: self.temperature,
            ..Default::default()
        };
        let k = self.k;
        let out: Vec<u32> = z
            .par_chunks(vocab.max(1))
            .zip(&self.draws)
            .flat_map_iter(|(row, &u)| {
                let (mut lp, mut exps) = (Vec::new(), Vec::new());
                sampler::log_softmax_exps(row, &mut lp, &mut exps);
                let ids = sampler::top_k_indices(&lp, k);
                let token = if u < 0.0 {
                    sampler::argmax(row)
                } else {
                    sampler::draw(row, Some(&exps), &params, u)
                };
                let bits: Vec<u32> = ids.iter().map(|&i| lp[i as usize].to_bits()).collect();
                let token_bits = lp[token as usize].to_bits();
                ids.into_iter().chain(bits).chain([token, token_bits])
            })
            .collect();
        Ok((CpuStorage::U32(out), Shape::from((rows, 2 * k + 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("sample_rows: the logits must be contiguous");
        };
        if self.k > vocab.min(MAX_K) {
            candle_core::bail!(
                "sample_rows: K {} above min(vocab {vocab}, {MAX_K})",
                self.k
            );
        }
        let out = cuda::launch(self, logits, range, rows, vocab)?;
        Ok((out, Shape::from((rows, 2 * self.k + 2))))
    }
}

/// The CUDA side: kernels/sample_rows.cu, loaded once per device as a custom PTX module.
#[cfg(feature = "cuda")]
mod cuda {
    use super::SampleRows;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample_rows.ptx"));
    const BLOCK: u32 = 512; // SR_BLOCK

    pub(super) fn launch(
        op: &SampleRows,
        logits: &CudaStorage,
        range: (usize, usize),
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        match logits.dtype() {
            DType::BF16 => launch_as::<half::bf16>(op, logits, range, rows, vocab, "bf16"),
            DType::F16 => launch_as::<half::f16>(op, logits, range, rows, vocab, "f16"),
            DType::F32 => launch_as::<f32>(op, logits, range, rows, vocab, "f32"),
            other => candle_core::bail!("sample_rows: logits {other:?}, expected f32/bf16/f16"),
        }
    }

    fn launch_as<T: CudaDType + DeviceRepr>(
        op: &SampleRows,
        logits: &CudaStorage,
        (start, end): (usize, usize),
        rows: usize,
        vocab: usize,
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = logits.device().clone();
        let func =
            dev.get_or_load_custom_func(&format!("sample_rows_{suffix}"), "qat_sample_rows", PTX)?;
        let z = logits.as_cuda_slice::<T>()?.slice(start..end);
        let draws = dev.clone_htod(&op.draws)?;
        // SAFETY: thread 0 of each row's block writes the token and its log-probability, the
        // block's threads the K ids and log-probabilities: every element.
        let out = unsafe { dev.alloc::<u32>(rows * (2 * op.k + 2))? };
        let (vocab, k) = (vocab as u32, op.k as u32);
        let mut b = func.builder();
        b.arg(&z).arg(&draws).arg(&out);
        b.arg(&vocab).arg(&k).arg(&op.temperature);
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0, // static: the reductions, the histogram, the K selected
        };
        // SAFETY: z holds rows · vocab T, draws rows f64, out rows · (2k + 2) u32; k <= min(vocab,
        // SR_MAX_K) (checked by the caller).
        unsafe { b.launch(config) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_kernel_is_not_used_off_cuda() -> Result<()> {
        let logits = Tensor::zeros((2, 300), DType::F32, &Device::Cpu)?;
        assert!(!available(&logits, 64, &SamplingParams::default()));
        assert!(pick_rows(&logits, &[0.5], 1.0, 4)
            .unwrap_err()
            .to_string()
            .contains("1 draws for 2 rows"));
        assert!(pick_rows(&logits, &[0.5, 0.5], 1.0, 301)
            .unwrap_err()
            .to_string()
            .contains("K 301 above min(vocab 300, 1024)"));
        Ok(())
    }

    /// The CPU op on a hand-worked row: logits [0, ln 3, -inf] → probabilities [1/4, 3/4, 0].
    #[test]
    fn cpu_op_hand_worked() -> Result<()> {
        let z = Tensor::new(&[[0f32, 3f32.ln(), f32::NEG_INFINITY]; 3], &Device::Cpu)?;
        // Greedy; u = 0.2 < 1/4 → token 0; u = 0.3 → token 1.
        let got = pick_rows(
            &z.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
            &[-1.0, 0.2, 0.3],
            1.0,
            2,
        )?;
        let close = |a: f32, b: f64| (f64::from(a) - b).abs() < 1e-2; // ln 3 rounded to bf16
        for (row, token) in got.iter().zip([1, 0, 1]) {
            assert_eq!(row.topk_ids, vec![1, 0]);
            assert!(close(row.topk_logprobs[0], 0.75f64.ln()), "{row:?}");
            assert!(close(row.topk_logprobs[1], 0.25f64.ln()), "{row:?}");
            assert_eq!(
                (row.token, row.logprob),
                (token, row.topk_logprobs[1 - token as usize])
            );
        }
        Ok(())
    }

    /// On a GPU (`--features cuda` builds; skipped without one): the kernel against the host
    /// functions (the op on the CPU) on bf16 and f32 logits of Llama-2's vocabulary, K = 64,
    /// greedy and drawn rows.
    #[test]
    fn cuda_matches_the_host_sampler() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        let (rows, vocab, k) = (6, 32000, 64);
        let z = (Tensor::randn(0f32, 3.0, (rows, vocab), &Device::Cpu)?).to_dtype(DType::F32)?;
        let draws = [-1.0, 0.0, 0.25, 0.5, 0.75, 0.999_999];
        for (dtype, temperature) in [(DType::F32, 1.0), (DType::BF16, 1.0), (DType::BF16, 0.7)] {
            let zd = z.to_dtype(dtype)?;
            let want = pick_rows(&zd, &draws, temperature, k)?; // the host functions
            let got = pick_rows(&zd.to_device(&gpu)?, &draws, temperature, k)?;
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let what = format!("{dtype:?} T {temperature} row {r}");
                assert_eq!(g.topk_ids, w.topk_ids, "{what}");
                for (&a, &b) in g.topk_logprobs.iter().zip(&w.topk_logprobs) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{what}: {a} vs {b}"
                    );
                }
                assert_eq!(g.token, w.token, "{what}");
            }
        }
        Ok(())
    }
}
