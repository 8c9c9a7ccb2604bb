//! Zero-shot multiple-choice evaluation of one task: every choice of every item scored in one
//! batched pass ([`crate::loglikelihood`]), then `acc` / `acc_norm` ([`crate::accuracy`]).

use crate::accuracy::{mean_stderr, predict};
use crate::error::Result;
use crate::loglikelihood::{encode_pair, loglikelihoods, EncodedPair, Loglikelihood};
use crate::task_checkpoint::TaskCheckpoint;
use crate::tasks::{Task, TaskData};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qat_model::Llama;
use serde::Serialize;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Scores of one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScores {
    pub task: Task,
    pub harness_task: &'static str,
    pub acc: f64,
    pub acc_stderr: Option<f64>,
    /// None where the harness's task config does not list `acc_norm` (BoolQ, WinoGrande).
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    pub items: usize,
    /// Loglikelihood requests (choices) scored, and their continuation tokens.
    pub requests: usize,
    pub continuation_tokens: usize,
    /// Tokens the model read (context and continuation, after truncation).
    pub tokens: usize,
    /// Requests cut from the left to fit the model's context: in the context only (as the
    /// harness does), or into the continuation (the harness refuses those; see
    /// [`crate::loglikelihood`]).
    pub truncated_contexts: usize,
    pub truncated_continuations: usize,
    pub files: Vec<String>,
    pub sha256: Vec<String>,
    /// Requests whose scores came from `--checkpoint` (an interrupted run's) instead of the model.
    pub resumed_requests: usize,
    pub seconds: f64,
}

/// One request of an item, for `--per-item`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestDetail {
    pub context: String,
    pub continuation: String,
    pub context_tokens: usize,
    #[serde(flatten)]
    pub score: Loglikelihood,
}

/// One item's log-likelihoods and predictions, for `--per-item`.
#[derive(Debug, Clone, Serialize)]
pub struct ItemDetail {
    pub task: Task,
    /// 0-based item index, and the item's line in its file.
    pub index: usize,
    pub line: usize,
    pub gold: usize,
    pub pred: usize,
    pub pred_norm: usize,
    pub lls: Vec<f64>,
    /// Characters of each `doc_to_choice` string (acc_norm divides by them).
    pub choice_chars: Vec<usize>,
    pub choices: Vec<String>,
    pub requests: Vec<RequestDetail>,
}

/// Evaluates `data` with `model`; `bos` starts every sequence, `max_len` is the model's
/// context length. Shows a progress bar on stderr if `progress`. With a `checkpoint`, scored
/// batches are saved there and the ones it holds are not scored again.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Llama,
    tokenizer: &Tokenizer,
    bos: Option<u32>,
    data: &TaskData,
    max_len: usize,
    batch_size: usize,
    progress: bool,
    checkpoint: Option<&TaskCheckpoint>,
) -> Result<(TaskScores, Vec<ItemDetail>)> {
    let started = Instant::now();
    let mut pairs: Vec<EncodedPair> = Vec::new();
    for item in &data.items {
        for (ctx, cont) in &item.requests {
            pairs.push(encode_pair(tokenizer, bos, ctx, cont)?);
        }
    }
    let bar = if progress {
        ProgressBar::new(pairs.len() as u64)
    } else {
        ProgressBar::with_draw_target(Some(pairs.len() as u64), ProgressDrawTarget::hidden())
    };
    let template = format!(
        "qat-eval {} {{bar:30}} {{pos}}/{{len}} choices  eta {{eta}}",
        data.task.name()
    );
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let checkpoint = checkpoint.map(|c| (c, data.task.name()));
    let (scores, resumed_requests) =
        loglikelihoods(model, &pairs, max_len, batch_size, &bar, checkpoint)?;
    bar.finish_and_clear();

    let mut details = Vec::with_capacity(data.items.len());
    let mut at = 0;
    for (index, item) in data.items.iter().enumerate() {
        let n = item.requests.len();
        let (s, p) = (&scores[at..at + n], &pairs[at..at + n]);
        at += n;
        let lls: Vec<f64> = s.iter().map(|x| x.ll).collect();
        let pred = predict(&lls, &item.choices, item.gold);
        let requests = item
            .requests
            .iter()
            .zip(s.iter().zip(p))
            .map(|((c, k), (score, pair))| RequestDetail {
                context: c.clone(),
                continuation: k.clone(),
                context_tokens: pair.context.len(),
                score: *score,
            })
            .collect();
        details.push(ItemDetail {
            task: data.task,
            index,
            line: item.line,
            gold: item.gold,
            pred: pred.pred,
            pred_norm: pred.pred_norm,
            lls,
            choice_chars: item.choices.iter().map(|c| c.chars().count()).collect(),
            choices: item.choices.clone(),
            requests,
        });
    }
    let acc: Vec<f64> = details
        .iter()
        .map(|d| (d.pred == d.gold) as u8 as f64)
        .collect();
    let acc_norm: Vec<f64> = details
        .iter()
        .map(|d| (d.pred_norm == d.gold) as u8 as f64)
        .collect();
    let (acc, acc_stderr) = mean_stderr(&acc);
    let (acc_norm, acc_norm_stderr) = if data.task.reports_acc_norm() {
        mean_stderr(&acc_norm)
    } else {
        (f64::NAN, None)
    };
    let scores = TaskScores {
        task: data.task,
        harness_task: data.task.harness_name(),
        acc,
        acc_stderr,
        acc_norm: data.task.reports_acc_norm().then_some(acc_norm),
        acc_norm_stderr,
        items: details.len(),
        requests: pairs.len(),
        continuation_tokens: scores.iter().map(|s| s.tokens).sum(),
        tokens: pairs
            .iter()
            .map(|p| (p.context.len() + p.continuation.len()).min(max_len + 1) - 1)
            .sum(),
        truncated_contexts: pairs
            .iter()
            .filter(|p| {
                p.context.len() + p.continuation.len() > max_len + 1
                    && p.continuation.len() <= max_len
            })
            .count(),
        truncated_continuations: pairs
            .iter()
            .filter(|p| p.continuation.len() > max_len)
            .count(),
        files: data.files.iter().map(|f| f.display().to_string()).collect(),
        sha256: data.sha256.clone(),
        resumed_requests,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((scores, details))
}
