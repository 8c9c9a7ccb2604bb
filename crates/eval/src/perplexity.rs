//! Perplexity: mean next-token NLL of a model over token sequences, batched and left-padded.

use crate::checkpoint::NllCheckpoint;
use crate::corpus::Corpus;
use crate::error::{EvalError, Result};
use candle_core::{DType, IndexOp, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qat_model::{token_nll, Llama, StepProfile};
use serde::Serialize;
use tokenizers::Tokenizer;

/// How a corpus becomes sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PplMode {
    /// Each document (split at a delimiter) is BOS + text, truncated to seq_len; every token
    /// after BOS is predicted.
    Docs,
    /// The whole file tokenized once (BOS first), cut into non-overlapping seq_len windows;
    /// every token of a window but its first is predicted (the WikiText-2 convention).
    Stream,
}

/// Sum and count of the NLL over predicted tokens.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NllTotals {
    pub nll_sum: f64,
    pub tokens: u64,
    pub sequences: u64,
}

impl NllTotals {
    pub fn mean(&self) -> f64 {
        self.nll_sum / self.tokens.max(1) as f64
    }
}

/// What [`nll`] computed.
#[derive(Debug, Clone, Copy)]
pub struct NllRun {
    /// Over all sequences, those of an interrupted run included.
    pub totals: NllTotals,
    /// The totals the checkpoint held when this run started (`None`: started from zero).
    pub resumed: Option<NllTotals>,
}

/// Turns the corpus into token sequences under `mode`.
pub fn tokenize(
    corpus: &Corpus,
    tokenizer: &Tokenizer,
    bos: Option<u32>,
    mode: PplMode,
    seq_len: usize,
    delimiter: &str,
    limit: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        return Err(EvalError::Config(format!(
            "--seq-len must be >= 2, got {seq_len}"
        )));
    }
    let encode = |text: &str| -> Result<Vec<u32>> {
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| EvalError::Corpus {
                path: corpus.path.clone(),
                what: format!("cannot tokenize: {e}"),
            })?;
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(enc.get_ids());
        Ok(ids)
    };
    let mut seqs = match mode {
        PplMode::Docs => {
            let docs = corpus.documents(delimiter);
            let docs = &docs[..limit.unwrap_or(docs.len()).min(docs.len())];
            docs.iter()
                .map(|d| {
                    encode(d).map(|mut ids| {
                        ids.truncate(seq_len);
                        ids
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
        PplMode::Stream => {
            let ids = encode(&corpus.text)?;
            let mut windows: Vec<Vec<u32>> = ids.chunks(seq_len).map(|c| c.to_vec()).collect();
            if let Some(n) = limit {
                windows.truncate(n);
            }
            windows
        }
    };
    seqs.retain(|s| s.len() >= 2);
    if seqs.is_empty() {
        return Err(EvalError::Corpus {
            path: corpus.path.clone(),
            what: "no sequence of 2 or more tokens to evaluate".into(),
        });
    }
    Ok(seqs)
}

/// The phases `qat-eval --profile` times per batch (qat_model::profile), in order.
pub const PROFILE_PHASES: [&str; 4] = ["batch_to_device", "forward", "logits_nll", "checkpoint"];

/// Mean NLL of `model` over `seqs`, `batch_size` sequences per forward pass. With a
/// `checkpoint`, the totals are saved there after every batch, and a run that finds the file
/// (from an interrupted run of the same evaluation) starts after its last saved batch; the
/// caller removes it once the result is safe. `profile` times each batch's
/// [`PROFILE_PHASES`] (a disabled profile times nothing).
pub fn nll(
    model: &Llama,
    seqs: &[Vec<u32>],
    batch_size: usize,
    progress: bool,
    checkpoint: Option<&NllCheckpoint>,
    profile: &StepProfile,
) -> Result<NllRun> {
    if batch_size == 0 {
        return Err(EvalError::Config("--batch-size must be >= 1".into()));
    }
    let dev = model.device().clone();
    // Longest first: similar lengths share a batch, which keeps padding small.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let bar = if progress {
        ProgressBar::new(seqs.len() as u64)
    } else {
        ProgressBar::with_draw_target(Some(seqs.len() as u64), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template("qat-eval {bar:30} {pos}/{len} sequences  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let resumed = match checkpoint {
        Some(c) => c.load(order.len().div_ceil(batch_size) as u64)?,
        None => None,
    };
    let (done, mut totals) = resumed.unwrap_or_default();
    bar.set_position(totals.sequences);
    for (b, batch) in order.chunks(batch_size).enumerate().skip(done as usize) {
        // Inputs are all tokens but the last; targets all but the first.
        let width = batch.iter().map(|&i| seqs[i].len() - 1).max().unwrap_or(0);
        let pads: Vec<usize> = batch.iter().map(|&i| width - (seqs[i].len() - 1)).collect();
        let mut input = Vec::with_capacity(batch.len() * width);
        for (&i, &pad) in batch.iter().zip(&pads) {
            let s = &seqs[i];
            input.extend(std::iter::repeat_n(s[0], pad));
            input.extend(&s[..s.len() - 1]);
        }
        let input = profile.time("batch_to_device", || {
            Tensor::from_vec(input, (batch.len(), width), &dev)
        })?;
        let hidden = profile.time("forward", || {
            let mut cache = model.new_cache(pads.clone());
            model.forward_hidden(&input, &mut cache)
        })?;
        profile.time("logits_nll", || {
            // Per sequence (no LM head on padding), the NLL of every target in one pass over
            // its logits; one copy to the host per batch.
            let per_row = batch
                .iter()
                .zip(&pads)
                .enumerate()
                .map(|(row, (&i, &pad))| {
                    let logits = model.logits_in_dtype(&hidden.i((row, pad..width))?)?;
                    token_nll(&logits, &seqs[i][1..]) // [len-1, 2]: nll, rank
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let nll: Vec<f64> = Tensor::cat(&per_row, 0)?
                .i((.., 0))?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            totals.nll_sum += nll.iter().sum::<f64>();
            totals.tokens += nll.len() as u64;
            candle_core::Result::Ok(())
        })?;
        totals.sequences += batch.len() as u64;
        if let Some(c) = checkpoint {
            profile.time("checkpoint", || c.save(b as u64 + 1, &totals))?;
        }
        profile.end_step();
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(NllRun {
        totals,
        resumed: resumed.map(|(_, t)| t),
    })
}
