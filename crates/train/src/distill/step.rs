//! One optimizer step's forward and backward passes: `grad_accum` micro-batches from the
//! shards, each split into parts that train on their own threads, their gradients summed
//! weighted by trained positions.

use crate::data::Prefetch;
use crate::error::{Result, TrainError};
use crate::grad_sum::GradSum;
use crate::loss::{Loss, TopKTargets};
use crate::parallel::{split_even, PartPools};
use crate::student::Student;
use candle_core::{Device, Tensor, Var};
use qat_model::{Llama, StepProfile};
use qat_shards::SequenceRecord;
use std::collections::HashMap;

/// The phases `--profile` times (qat_model::profile), in step order.
pub(super) const PHASES: [&str; 10] = [
    "data",
    "batch_to_device",
    "teacher_forward",
    "student_forward",
    "loss",
    "backward",
    "accumulate",
    "clip_grad",
    "optimizer",
    "log_checkpoint",
];

/// The models and objective of a step.
pub(super) struct StepModels<'a> {
    pub student: &'a Student,
    /// The online teacher (`--teacher`); `None` = targets from the shards.
    pub teacher: Option<&'a Llama>,
    pub objective: &'a Loss,
    pub dev: &'a Device,
    /// The shards' top-K and the teacher's vocabulary size.
    pub top_k: usize,
    pub vocab: usize,
    /// `--profile`: times the phases (disabled: times nothing).
    pub profile: &'a StepProfile,
}

/// What a step computed, before the optimizer applies it.
pub(super) struct StepGrads {
    /// Per variable name, the gradient of the step's mean loss.
    pub grads: HashMap<String, Tensor>,
    /// Mean loss over the step's trained positions.
    pub loss: f32,
    /// Input tokens (padding excluded).
    pub tokens: u64,
}

/// How the step runs and what a non-finite loss reports.
pub(super) struct StepPlan<'a> {
    pub grad_accum: usize,
    pub data_parallel: usize,
    pub step: u64,
    /// Test hook: multiply the loss by NaN.
    pub poison: bool,
    /// Named in the error when the loss is not finite.
    pub last_good: &'a str,
}

/// What one part of a micro-batch contributes.
struct PartOutcome {
    /// Mean loss over the part's trained positions.
    loss: f32,
    positions: usize,
    /// Input tokens (padding excluded).
    real: u64,
    /// `None` when the part has no trained position.
    grads: Option<candle_core::backprop::GradStore>,
}

/// Runs the step's micro-batches and returns their summed, weighted gradients for `vars`.
pub(super) fn step_grads(
    models: &StepModels,
    data: &mut Prefetch,
    pools: &PartPools,
    vars: &[(String, Var)],
    plan: &StepPlan,
) -> Result<StepGrads> {
    let (mut sum, mut loss, mut tokens) = (GradSum::new(), 0.0f32, 0u64);
    let profile = models.profile;
    for _ in 0..plan.grad_accum {
        let recs = profile.time("data", || data.next_batch())?;
        let parts = split_even(&recs, plan.data_parallel);
        // Several parts run on their own threads, and on CUDA each thread queues its work on its
        // own stream (candle's per-thread stream), unordered with the others: the parts start
        // after this thread's queued work (the last optimizer step), and each part's work is done
        // before this thread sums its gradients.
        let threaded = parts.len() > 1 && models.dev.is_cuda();
        if threaded {
            models.dev.synchronize()?;
        }
        let outs = pools.run(&parts, |part| {
            let out = part_grads(models, part, plan)?;
            if threaded {
                models.dev.synchronize()?;
            }
            Ok(out)
        });
        let outs = outs.into_iter().collect::<Result<Vec<_>>>()?;
        // The batch's loss is the mean over all its trained positions: each part's mean weighs
        // by its share of them.
        let positions: usize = outs.iter().map(|o| o.positions).sum();
        profile.time("accumulate", || {
            for o in outs {
                tokens += o.real;
                if let Some(g) = o.grads {
                    let w = o.positions as f64 / positions as f64 / plan.grad_accum as f64;
                    loss += (o.loss as f64 * w) as f32;
                    sum.add(vars, &g, w)?;
                }
            }
            Ok::<_, TrainError>(())
        })?;
    }
    Ok(StepGrads {
        grads: sum.into_sums(),
        loss,
        tokens,
    })
}

/// Forward and backward pass of one part of a micro-batch.
fn part_grads(
    models: &StepModels,
    part: &[SequenceRecord],
    plan: &StepPlan,
) -> Result<PartOutcome> {
    let profile = models.profile;
    let (tokens, rows, targets, real) = profile.time("batch_to_device", || {
        batch_tensors(part, models.top_k, models.vocab, models.dev)
    })?;
    let positions = rows.dim(0)?;
    if positions == 0 {
        return Ok(PartOutcome {
            loss: 0.0,
            positions,
            real,
            grads: None,
        });
    }
    // [N, V] logits at the trained positions (the student's in its compute dtype): the rows of
    // the [B, T, H] hidden states are selected before the LM head, so no [B, T, V] tensor (and
    // no [B, T, V] gradient of the selection) exists.
    let at_rows = |hidden: Tensor| -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        Ok(hidden.reshape((b * t, h))?.index_select(&rows, 0)?)
    };
    let teacher_logp = match models.teacher {
        Some(teacher) => Some(profile.time("teacher_forward", || {
            let tl = teacher.logits(&at_rows(teacher.forward_hidden_full(&tokens)?)?)?;
            Ok::<_, TrainError>(candle_nn::ops::log_softmax(&tl, candle_core::D::Minus1)?.detach())
        })?),
        None => None,
    };
    let logits = profile.time("student_forward", || {
        let student = &models.student.model;
        // In the compute dtype: the loss reads them in f32 (a fused kernel on CUDA).
        let hidden = at_rows(student.forward_hidden_full(&tokens)?)?;
        Ok::<_, TrainError>(student.logits_in_dtype(&hidden)?)
    })?;
    let (loss, value) = profile.time("loss", || {
        let mut loss = match &teacher_logp {
            Some(tlp) => models.objective.full_vocab(&logits, tlp)?,
            None => models.objective.mean(&logits, &targets)?,
        };
        if plan.poison {
            loss = (loss * f64::NAN)?;
        }
        let value = loss.to_scalar::<f32>()?;
        Ok::<_, TrainError>((loss, value))
    })?;
    if !value.is_finite() {
        return Err(TrainError::NonFinite {
            loss: value,
            step: plan.step,
            last_good: plan.last_good.to_string(),
        });
    }
    let grads = profile.time("backward", || loss.backward())?;
    Ok(PartOutcome {
        loss: value,
        positions,
        real,
        grads: Some(grads),
    })
}

/// Tokens `[B, T]` right-padded, the flat row indices `b * T + i` of trained positions `[N]`,
/// their teacher targets, and the input token count (padding excluded).
fn batch_tensors(
    recs: &[SequenceRecord],
    k: usize,
    vocab: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, TopKTargets, u64)> {
    let t = recs.iter().map(|r| r.tokens.len()).max().unwrap_or(1);
    let mut tokens = vec![0u32; recs.len() * t];
    let (mut rows, mut ids, mut logp) = (Vec::new(), Vec::new(), Vec::new());
    let mut real = 0u64;
    for (b, r) in recs.iter().enumerate() {
        tokens[b * t..b * t + r.tokens.len()].copy_from_slice(&r.tokens);
        real += r.tokens.len() as u64;
        for i in (r.prompt_len as usize).saturating_sub(1)..r.tokens.len() - 1 {
            rows.push((b * t + i) as u32);
            ids.extend_from_slice(&r.topk_ids[i * k..(i + 1) * k]);
            logp.extend_from_slice(&r.topk_logprobs[i * k..(i + 1) * k]);
        }
    }
    let n = rows.len();
    let targets = TopKTargets::new(ids, logp, n, k, vocab, dev)?;
    Ok((
        Tensor::from_vec(tokens, (recs.len(), t), dev)?,
        Tensor::from_vec(rows, n, dev)?,
        targets,
        real,
    ))
}
