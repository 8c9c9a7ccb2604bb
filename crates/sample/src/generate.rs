//! Batched generation with the teacher: left-padded prefill, then one token per step through
//! the KV cache, recording the teacher's top-K log-probabilities at every position.

use crate::rng::SequenceRng;
use crate::sampler::{self, SamplingParams};
use candle_core::{DType, IndexOp, Result, Tensor};
use qat_model::{Llama, StepProfile};
use qat_shards::SequenceRecord;
use rayon::prelude::*;

/// One sequence to generate: its id and the tokens it starts from (at least one).
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSpec {
    pub seq_id: u64,
    pub prompt: Vec<u32>,
}

/// What the generation loop needs to know.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Total length cap (prompt included).
    pub max_len: usize,
    /// How many teacher log-probabilities to keep per position (K).
    pub keep_top: usize,
    /// The first N generated tokens are greedy, N drawn per sequence from `greedy_min..=greedy_max`.
    pub greedy_min: u32,
    pub greedy_max: u32,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Generating any of these ends a sequence (the token is kept).
    pub eos_ids: Vec<u32>,
}

/// Counters over the generated (non-prompt) tokens of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationStats {
    pub generated_tokens: u64,
    /// Sum of the teacher's NLL (full softmax, temperature 1) of the tokens it generated.
    pub teacher_nll_sum: f64,
}

/// `logits: [rows, vocab]` (any device, any float type) as host rows of f32. 16-bit logits (a
/// bf16 teacher on CUDA) cross to the host as they are, half the bytes of an f32 copy, and are
/// widened there (exactly, as a cast on the device would).
fn rows_to_host(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    fn widen<T: Copy + Send + Sync>(rows: Vec<Vec<T>>, f: fn(T) -> f32) -> Vec<Vec<f32>> {
        rows.into_par_iter()
            .map(|row| row.into_iter().map(f).collect())
            .collect()
    }
    match logits.dtype() {
        DType::BF16 => Ok(widen(logits.to_vec2::<half::bf16>()?, half::bf16::to_f32)),
        DType::F16 => Ok(widen(logits.to_vec2::<half::f16>()?, half::f16::to_f32)),
        _ => logits.to_dtype(DType::F32)?.to_vec2(),
    }
}

struct RowState {
    record: SequenceRecord,
    rng: SequenceRng,
    greedy_left: u32,
    done: bool,
    nll: f64,
}

impl RowState {
    /// Stores the distribution of `logits` for the current last position and, if `choose`,
    /// appends the next token drawn from it.
    fn step(
        &mut self,
        logits: &[f32],
        params: &GenerationParams,
        choose: bool,
        scratch: &mut (Vec<f32>, Vec<f64>),
    ) {
        let (scratch, exps) = scratch;
        sampler::log_softmax_exps(logits, scratch, exps);
        for id in sampler::top_k_indices(scratch, params.keep_top) {
            self.record.topk_ids.push(id);
            self.record.topk_logprobs.push(scratch[id as usize]);
        }
        if !choose {
            return;
        }
        let next = if self.greedy_left > 0 {
            self.greedy_left -= 1;
            sampler::argmax(logits)
        } else {
            sampler::sample_with_exps(logits, Some(exps), &params.sampling, &mut self.rng)
        };
        self.nll -= scratch[next as usize] as f64;
        self.record.tokens.push(next);
        self.done = self.record.tokens.len() >= params.max_len || params.eos_ids.contains(&next);
    }
}

/// The phases `qat-sample --profile` times per batch (qat_model::profile), in order; `write`
/// (handing the batch's records to the file's writer thread) is timed by the caller.
pub const PROFILE_PHASES: [&str; 6] = [
    "prefill",
    "decode_forward",
    "logits_to_host",
    "log_softmax_topk_sample",
    "kv_cache_select",
    "write",
];

/// Generates every spec in one batch; records come back in the order of `specs`.
/// Prompts must be shorter than `params.max_len`. `profile` times the [`PROFILE_PHASES`] (a
/// disabled profile times nothing).
pub fn generate_batch(
    model: &Llama,
    specs: &[SequenceSpec],
    params: &GenerationParams,
    profile: &StepProfile,
) -> Result<(Vec<SequenceRecord>, GenerationStats)> {
    let dev = model.device().clone();
    let width = specs.iter().map(|s| s.prompt.len()).max().unwrap_or(0);
    if specs.is_empty() {
        return Ok((Vec::new(), GenerationStats::default()));
    }
    if specs
        .iter()
        .any(|s| s.prompt.is_empty() || s.prompt.len() >= params.max_len)
    {
        candle_core::bail!(
            "every prompt needs 1..{} tokens (max_len {})",
            params.max_len - 1,
            params.max_len
        );
    }
    let mut rows: Vec<RowState> = specs
        .iter()
        .map(|s| {
            let mut rng = SequenceRng::new(params.seed, s.seq_id);
            let greedy_left = rng.range_inclusive(params.greedy_min, params.greedy_max);
            let cap = params.max_len.saturating_sub(1) * params.keep_top;
            RowState {
                record: SequenceRecord {
                    seq_id: s.seq_id,
                    tokens: s.prompt.clone(),
                    prompt_len: s.prompt.len() as u32,
                    topk_ids: Vec::with_capacity(cap),
                    topk_logprobs: Vec::with_capacity(cap),
                },
                rng,
                greedy_left,
                done: false,
                nll: 0.0,
            }
        })
        .collect();

    // Prefill: all prompts left-padded to `width`.
    let pads: Vec<usize> = specs.iter().map(|s| width - s.prompt.len()).collect();
    let mut input = Vec::with_capacity(specs.len() * width);
    for s in specs {
        input.extend(std::iter::repeat_n(s.prompt[0], width - s.prompt.len()));
        input.extend(&s.prompt);
    }
    // Each row ends by max_len tokens, i.e. at column width - prompt_len + max_len at most.
    let mut cache = model.new_decode_cache(
        pads.clone(),
        pads.iter().max().copied().unwrap_or(0) + params.max_len,
    );
    let hidden = profile.time("prefill", || {
        model.forward_hidden(
            &Tensor::from_vec(input, (specs.len(), width), &dev)?,
            &mut cache,
        )
    })?;
    for (b, row) in rows.iter_mut().enumerate() {
        // One row's logits at a time bounds memory to width x vocab.
        let logits: Vec<Vec<f32>> = profile.time("logits_to_host", || {
            rows_to_host(&model.logits_in_dtype(&hidden.i((b, pads[b]..width))?)?)
        })?;
        profile.time("log_softmax_topk_sample", || {
            let mut scratch = (Vec::new(), Vec::new());
            let last = logits.len() - 1;
            for (j, row_logits) in logits.iter().enumerate() {
                row.step(row_logits, params, j == last, &mut scratch);
            }
            candle_core::Result::Ok(())
        })?;
    }

    // Decode one token per step for the rows still running.
    let mut active: Vec<usize> = (0..rows.len()).filter(|&b| !rows[b].done).collect();
    if active.len() < rows.len() {
        profile.time("kv_cache_select", || cache.select_rows(&active))?;
    }
    while !active.is_empty() {
        let last: Vec<u32> = active
            .iter()
            .map(|&b| *rows[b].record.tokens.last().expect("non-empty"))
            .collect();
        let logits = profile.time("decode_forward", || {
            let tokens = Tensor::from_vec(last, (active.len(), 1), &dev)?;
            model.logits_in_dtype(&model.forward_hidden(&tokens, &mut cache)?)
        })?;
        let logits: Vec<Vec<f32>> =
            profile.time("logits_to_host", || rows_to_host(&logits.squeeze(1)?))?;
        let mut stepping: Vec<(&mut RowState, &Vec<f32>)> = Vec::with_capacity(active.len());
        {
            let mut by_index: Vec<Option<&mut RowState>> = rows.iter_mut().map(Some).collect();
            for (slot, &b) in active.iter().enumerate() {
                stepping.push((by_index[b].take().expect("row listed once"), &logits[slot]));
            }
        }
        profile.time("log_softmax_topk_sample", || {
            stepping
                .par_iter_mut()
                .for_each_init(Default::default, |scratch, (row, l)| {
                    row.step(l, params, true, scratch)
                });
            candle_core::Result::Ok(())
        })?;
        let keep: Vec<usize> = (0..active.len())
            .filter(|&slot| !rows[active[slot]].done)
            .collect();
        if keep.len() < active.len() {
            profile.time("kv_cache_select", || cache.select_rows(&keep))?;
            active = keep.iter().map(|&slot| active[slot]).collect();
        }
    }

    let mut stats = GenerationStats::default();
    let records = rows
        .into_iter()
        .map(|r| {
            stats.generated_tokens += (r.record.tokens.len() - r.record.prompt_len as usize) as u64;
            stats.teacher_nll_sum += r.nll;
            r.record
        })
        .collect();
    Ok((records, stats))
}
