//! Log-likelihood of a continuation given a context, batched, as lm-evaluation-harness's
//! `HFLM` computes it for a causal model (`lm_eval/models/huggingface.py`: `_encode_pair`,
//! `_loglikelihood_tokens`).
//!
//! Encoding: trailing whitespace of the context moves to the front of the continuation; the
//! whole string `context + continuation` is encoded, and the continuation's tokens are the
//! whole encoding's tokens after the context's own encoding length. BOS (when the model has one)
//! starts both encodings, as the tokenizer's post-processor does. Scoring: the sequence
//! `context + continuation` is cut from the left to `max_len + 1` tokens, the model reads all
//! but its last token, and the log-probabilities of the continuation tokens are summed.
//!
//! One departure: the harness refuses a continuation longer than the model's context
//! (`assert len(continuation_enc) <= self.max_length`); here its last `max_len` tokens are
//! scored and the result says so (`tokens < continuation_tokens`). This happens with small
//! contexts only (stories260K: 512 tokens, and a few PIQA solutions are longer).

use crate::error::{EvalError, Result};
use crate::task_checkpoint::{requests_sha256, TaskCheckpoint};
use candle_core::{DType, IndexOp, Tensor};
use indicatif::ProgressBar;
use qat_model::{token_nll, Llama};
use serde::Serialize;
use tokenizers::Tokenizer;

/// A request in tokens: the continuation is scored given the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Loglikelihood {
    /// Sum of the log-probabilities of the continuation tokens (natural log).
    pub ll: f64,
    /// Continuation tokens scored, and the continuation's length in tokens (larger when only
    /// its last `max_len` tokens fit the model's context).
    pub tokens: usize,
    pub continuation_tokens: usize,
    /// Whether every continuation token is the model's argmax (the harness's `is_greedy`).
    pub greedy: bool,
}

/// Splits `(context, continuation)` into tokens as the harness's `_encode_pair` does.
pub fn encode_pair(
    tokenizer: &Tokenizer,
    bos: Option<u32>,
    context: &str,
    continuation: &str,
) -> Result<EncodedPair> {
    let kept = context.trim_end();
    let continuation = format!("{}{continuation}", &context[kept.len()..]);
    let encode = |text: &str| -> Result<Vec<u32>> {
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| EvalError::Config(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(bos
            .into_iter()
            .chain(enc.get_ids().iter().copied())
            .collect())
    };
    let mut whole = encode(&format!("{kept}{continuation}"))?;
    let context_len = encode(kept)?.len().min(whole.len());
    let cont = whole.split_off(context_len);
    if cont.is_empty() {
        return Err(EvalError::Config(format!(
            "continuation {continuation:?} after {kept:?} encodes to no token"
        )));
    }
    Ok(EncodedPair {
        context: whole,
        continuation: cont,
    })
}

/// Scores `pairs` with `model`, `batch_size` sequences per forward pass (longest first, left
/// padded); `max_len` is the model's context length. Results are in the order of `pairs`.
/// With a `checkpoint` (and the task's name), the batches it holds are taken from it and every
/// new batch is appended to it; the second value counts the requests taken from it.
pub fn loglikelihoods(
    model: &Llama,
    pairs: &[EncodedPair],
    max_len: usize,
    batch_size: usize,
    bar: &ProgressBar,
    checkpoint: Option<(&TaskCheckpoint, &str)>,
) -> Result<(Vec<Loglikelihood>, usize)> {
    if batch_size == 0 {
        return Err(EvalError::Config("--batch-size must be >= 1".into()));
    }
    // Model inputs: context + continuation cut to max_len + 1 tokens from the left, minus the last.
    let mut seqs: Vec<(Vec<u32>, usize)> = Vec::with_capacity(pairs.len());
    for p in pairs {
        if max_len == 0 {
            return Err(EvalError::Config("the model's context length is 0".into()));
        }
        let n = p.continuation.len().min(max_len);
        let mut full: Vec<u32> = p.context.iter().chain(&p.continuation).copied().collect();
        if full.len() > max_len + 1 {
            full.drain(..full.len() - (max_len + 1));
        }
        seqs.push((full, n));
    }
    let dev = model.device().clone();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].0.len()));
    let mut out = vec![
        Loglikelihood {
            ll: 0.0,
            tokens: 0,
            continuation_tokens: 0,
            greedy: false
        };
        seqs.len()
    ];
    let sha = checkpoint.map(|_| requests_sha256(pairs));
    let saved = match (checkpoint, &sha) {
        (Some((c, task)), Some(sha)) => c.saved(task, sha)?,
        _ => Vec::new(),
    };
    for (b, batch) in order.chunks(batch_size).enumerate() {
        if let Some(scores) = saved.get(b) {
            let same = scores.len() == batch.len()
                && scores.iter().zip(batch).all(|(&(i, _), &want)| i == want);
            if !same {
                let (c, task) = checkpoint.expect("saved batches come from a checkpoint");
                return Err(EvalError::Checkpoint {
                    path: c.path.clone(),
                    what: format!("batch {b} of {task} holds other requests than this run's"),
                });
            }
            for &(i, score) in scores {
                out[i] = score;
            }
            bar.inc(batch.len() as u64);
            continue;
        }
        let width = batch
            .iter()
            .map(|&i| seqs[i].0.len() - 1)
            .max()
            .unwrap_or(0);
        let pads: Vec<usize> = batch
            .iter()
            .map(|&i| width - (seqs[i].0.len() - 1))
            .collect();
        let mut input = Vec::with_capacity(batch.len() * width);
        for (&i, &pad) in batch.iter().zip(&pads) {
            let s = &seqs[i].0;
            input.extend(std::iter::repeat_n(s[0], pad));
            input.extend(&s[..s.len() - 1]);
        }
        let mut cache = model.new_cache(pads.clone());
        let hidden = model.forward_hidden(
            &Tensor::from_vec(input, (batch.len(), width), &dev)?,
            &mut cache,
        )?; // [b, width, hidden]
            // Only the positions that predict continuation tokens go through the LM head.
        let rows = batch
            .iter()
            .enumerate()
            .map(|(row, &i)| hidden.i((row, width - seqs[i].1..width)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let logits = model.logits_in_dtype(&Tensor::cat(&rows, 0)?)?; // [sum n, vocab]
        let targets: Vec<u32> = batch
            .iter()
            .flat_map(|&i| seqs[i].0[seqs[i].0.len() - seqs[i].1..].to_vec())
            .collect();
        // Per target: its NLL and its rank (0: the greedy choice), in one pass over the logits.
        let scored: Vec<Vec<f64>> = token_nll(&logits, &targets)?
            .to_dtype(DType::F64)?
            .to_vec2()?;
        let mut at = 0;
        for &i in batch {
            let n = seqs[i].1;
            let ll = -scored[at..at + n].iter().map(|x| x[0]).sum::<f64>();
            let greedy = scored[at..at + n].iter().all(|x| x[1] == 0.0);
            out[i] = Loglikelihood {
                ll,
                tokens: n,
                continuation_tokens: pairs[i].continuation.len(),
                greedy,
            };
            at += n;
        }
        if let (Some((c, task)), Some(sha)) = (checkpoint, &sha) {
            let scores: Vec<(usize, Loglikelihood)> = batch.iter().map(|&i| (i, out[i])).collect();
            c.append(task, sha, b, &scores)?;
        }
        bar.inc(batch.len() as u64);
    }
    let resumed = saved.iter().map(Vec::len).sum();
    Ok((out, resumed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok512() -> Tokenizer {
        let dir = match std::env::var_os("QAT_DATA") {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
            }
        };
        Tokenizer::from_file(dir.join("models/stories260K/tokenizer.json")).unwrap()
    }

    /// `_encode_pair`: the context's trailing space moves to the continuation, and the
    /// continuation is what the whole encoding adds after the context's encoding.
    #[test]
    fn trailing_space_moves_to_the_continuation() {
        let t = tok512();
        let a = encode_pair(&t, Some(1), "Question: Is it?\nAnswer: ", "yes").unwrap();
        let b = encode_pair(&t, Some(1), "Question: Is it?\nAnswer:", " yes").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.context[0], 1);
        let whole = t.encode("Question: Is it?\nAnswer: yes", false).unwrap();
        assert_eq!(
            [&a.context[1..], &a.continuation[..]].concat(),
            whole.get_ids()
        );
        assert!(
            encode_pair(&t, Some(1), "Answer:", " ").is_err(),
            "a continuation of only spaces encodes to nothing"
        );
    }
}
