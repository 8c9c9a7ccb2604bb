//! Batched generation with the teacher: left-padded prefill, then one token per step through
//! the KV cache, recording the teacher's top-K log-probabilities at every position.

use crate::device_rows::{self, PickedRow};
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
    /// How the next token is chosen: negative for the greedy one (the greedy prefix, or
    /// temperature 0), else the uniform its draw uses, the one [`sampler::sample`] would take
    /// from the row's stream.
    fn next_draw(&mut self, params: &GenerationParams) -> f64 {
        if self.greedy_left > 0 {
            self.greedy_left -= 1;
            return -1.0;
        }
        if params.sampling.temperature <= 0.0 {
            return -1.0;
        }
        self.rng.next_f64()
    }

    /// Appends the next token and its log-probability (for the teacher NLL).
    fn push_token(&mut self, next: u32, logprob: f32, params: &GenerationParams) {
        self.nll -= logprob as f64;
        self.record.tokens.push(next);
        self.done = self.record.tokens.len() >= params.max_len || params.eos_ids.contains(&next);
    }

    /// Stores the distribution of `logits` for the current last position and, if `choose`,
    /// appends the next token drawn from it (on the host).
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
        let u = self.next_draw(params);
        let next = if u < 0.0 {
            sampler::argmax(logits)
        } else {
            sampler::draw(logits, Some(exps), &params.sampling, u)
        };
        self.push_token(next, scratch[next as usize], params);
    }

    /// [`RowState::step`] from what the GPU computed for the position ([`device_rows`]).
    fn take(&mut self, picked: &PickedRow, choose: bool, params: &GenerationParams) {
        self.record.topk_ids.extend(&picked.topk_ids);
        self.record.topk_logprobs.extend(&picked.topk_logprobs);
        if choose {
            self.push_token(picked.token, picked.logprob, params);
        }
    }
}

/// Whether `logits: [rows, vocab]` go through the sampling kernel ([`device_rows::available`]);
/// unit tests can send CPU logits through the op too (`ROW_OP_ON_CPU`).
fn row_op(logits: &Tensor, params: &GenerationParams) -> bool {
    #[cfg(test)]
    if tests::ROW_OP_ON_CPU.get() && device_rows::fits(logits, params.keep_top, &params.sampling) {
        tests::ROW_OP_CALLS.set(tests::ROW_OP_CALLS.get() + 1);
        return true;
    }
    device_rows::available(logits, params.keep_top, &params.sampling)
}

/// [`device_rows::pick_rows`] with the generation's K and temperature, timed.
fn pick_rows(
    logits: &Tensor,
    draws: &[f64],
    params: &GenerationParams,
    profile: &StepProfile,
) -> Result<Vec<PickedRow>> {
    profile.time("log_softmax_topk_sample", || {
        let t = params.sampling.temperature;
        device_rows::pick_rows(logits, draws, t, params.keep_top)
    })
}

/// One decode step's per-row math on the host: `logits: [active, vocab]` (row `slot` is that of
/// `rows[active[slot]]`) copied over, then the rows stepped in parallel.
fn host_step(
    rows: &mut [RowState],
    active: &[usize],
    logits: &Tensor,
    params: &GenerationParams,
    profile: &StepProfile,
) -> Result<()> {
    let logits: Vec<Vec<f32>> = profile.time("logits_to_host", || rows_to_host(logits))?;
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
    })
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
        let logits = profile.time("prefill", || {
            model.logits_in_dtype(&hidden.i((b, pads[b]..width))?)
        })?;
        let last = logits.dim(0)? - 1;
        if row_op(&logits, params) {
            let mut draws = vec![-1.0; last + 1];
            draws[last] = row.next_draw(params);
            let picked = pick_rows(&logits, &draws, params, profile)?;
            for (j, p) in picked.iter().enumerate() {
                row.take(p, j == last, params);
            }
            continue;
        }
        let logits: Vec<Vec<f32>> = profile.time("logits_to_host", || rows_to_host(&logits))?;
        profile.time("log_softmax_topk_sample", || {
            let mut scratch = (Vec::new(), Vec::new());
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
            model
                .logits_in_dtype(&model.forward_hidden(&tokens, &mut cache)?)?
                .squeeze(1)
        })?;
        if row_op(&logits, params) {
            let draws: Vec<f64> = active.iter().map(|&b| rows[b].next_draw(params)).collect();
            let picked = pick_rows(&logits, &draws, params, profile)?;
            for (&b, p) in active.iter().zip(&picked) {
                rows[b].take(p, true, params);
            }
        } else {
            host_step(&mut rows, &active, &logits, params, profile)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use qat_model::ModelDir;
    use std::cell::Cell;

    thread_local! {
        /// Whether [`row_op`] sends CPU logits through the op (its CPU side: the host functions).
        pub(super) static ROW_OP_ON_CPU: Cell<bool> = const { Cell::new(false) };
        /// How often it did.
        pub(super) static ROW_OP_CALLS: Cell<usize> = const { Cell::new(0) };
    }

    /// The kernel path's bookkeeping (which uniform each row draws when, the prompts' positions,
    /// finished rows leaving the batch) gives the host path's records, byte for byte, when the op
    /// computes what the host does: stories260K on the CPU, prompts of 1-4 tokens, an EOS id
    /// that ends rows early, greedy prefixes, temperatures 1, 0.7 and 0.
    #[test]
    fn the_row_op_path_gives_the_host_paths_records() -> Result<()> {
        let data = std::env::var_os("QAT_DATA").map_or_else(
            || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
            std::path::PathBuf::from,
        );
        let model = ModelDir::open(data.join("models/stories260K"))
            .map_err(candle_core::Error::wrap)?
            .load(&candle_core::Device::Cpu, DType::F32)
            .map_err(candle_core::Error::wrap)?;
        let prompts: [&[u32]; 5] = [&[1], &[1, 300], &[1, 45, 46, 47], &[1, 9], &[1, 400, 3]];
        let specs: Vec<SequenceSpec> = (0..prompts.len())
            .map(|i| SequenceSpec {
                seq_id: 10 + i as u64,
                prompt: prompts[i].to_vec(),
            })
            .collect();
        for temperature in [1.0, 0.7, 0.0] {
            let mut params = GenerationParams {
                max_len: 40,
                keep_top: 24,
                greedy_min: 1,
                greedy_max: 3,
                sampling: SamplingParams {
                    temperature,
                    ..Default::default()
                },
                seed: 4,
                eos_ids: Vec::new(),
            };
            // An id that row 0 generates: it ends that row (at least) early.
            let (free, _) = generate_batch(&model, &specs, &params, &StepProfile::disabled())?;
            params.eos_ids = vec![free[0].tokens[12]];
            let run = |on_cpu: bool| {
                ROW_OP_ON_CPU.set(on_cpu);
                ROW_OP_CALLS.set(0);
                let out = generate_batch(&model, &specs, &params, &StepProfile::disabled());
                ROW_OP_ON_CPU.set(false);
                out
            };
            let (host, host_stats) = run(false)?;
            assert_eq!(ROW_OP_CALLS.get(), 0);
            let (op, op_stats) = run(true)?;
            // Every prompt's prefill and every decode step went through the op.
            assert!(ROW_OP_CALLS.get() > prompts.len(), "T {temperature}");
            assert_eq!(op, host, "T {temperature}");
            assert_eq!(op_stats.generated_tokens, host_stats.generated_tokens);
            assert_eq!(
                op_stats.teacher_nll_sum.to_bits(),
                host_stats.teacher_nll_sum.to_bits()
            );
            let lens: Vec<usize> = host.iter().map(|r| r.tokens.len()).collect();
            assert!(
                lens.iter().any(|&l| l < params.max_len),
                "no row ended early (T {temperature}): {lens:?}"
            );
        }
        Ok(())
    }
}
