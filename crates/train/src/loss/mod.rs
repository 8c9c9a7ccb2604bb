//! Distillation losses from cached top-K teacher distributions (formats/distill-loss.md).
//!
//! For each trained position the teacher gives ids `k_1..k_K` and log-probabilities `log p_i`
//! over the full vocabulary; its tail mass is `r_p = max(0, 1 - Σ p_i)`. The student's logits
//! `z` give `log q_i = z_{k_i} - logsumexp(z)` and its tail `log r_q = logsumexp(z outside the K
//! ids) - logsumexp(z)`, computed by masking, never as `log(1 - Σ q_i)`. Every loss ([`Loss`]:
//! forward KL, reverse KL, JSD, CAKLD) is a divergence between these K + 1 bucket
//! distributions ([`divergence`]); with K = vocabulary size the tail bucket is empty and each
//! equals its exact full-vocabulary value, which is also what an online teacher gives
//! ([`Loss::full_vocab`]).

pub mod bucket_lse;
pub mod divergence;

use crate::error::TrainError;
use candle_core::{DType, Device, Result, Tensor, D};
use divergence::{TeacherLogProbs, LOG_ZERO};
use serde::{Deserialize, Serialize};

/// Smallest teacher tail mass used inside `log r_p` by the reverse KL (and CAKLD's reverse
/// part): with K < V the true tail is positive, but f16 rounding of the stored log-probs can
/// make `Σ p_i` reach 1 and `r_p` clamp to 0, which would make `q_tail log(q_tail / r_p)`
/// infinite. 1e-6 is below what f16 log-probs resolve in `Σ p_i` (relative errors ~2^-11).
pub const TAIL_FLOOR: f64 = 1e-6;

/// The loss named in settings and on the command line (`--loss`); serialized lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Forward KL(teacher || student) (LLM-QAT).
    #[default]
    Fkl,
    /// Reverse KL(student || teacher).
    Rkl,
    /// Jensen-Shannon divergence.
    Jsd,
    /// BitDistiller's confidence-aware KL: gamma * RKL + (1 - gamma) * FKL.
    Cakld,
}

impl LossKind {
    pub const ALL: [LossKind; 4] = [LossKind::Fkl, LossKind::Rkl, LossKind::Jsd, LossKind::Cakld];

    pub fn name(self) -> &'static str {
        match self {
            LossKind::Fkl => "fkl",
            LossKind::Rkl => "rkl",
            LossKind::Jsd => "jsd",
            LossKind::Cakld => "cakld",
        }
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossKind {
    type Err = TrainError;
    fn from_str(s: &str) -> std::result::Result<Self, TrainError> {
        LossKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| TrainError::Config(format!("unknown loss {s:?} (fkl, rkl, jsd, cakld)")))
    }
}

/// A resolved loss: the kind plus CAKLD's gamma.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    Fkl,
    Rkl,
    Jsd,
    Cakld { gamma: f64 },
}

impl Loss {
    /// `gamma` is required for CAKLD (in `0..=1`) and refused for the other losses.
    pub fn new(kind: LossKind, gamma: Option<f64>) -> crate::Result<Loss> {
        match (kind, gamma) {
            (LossKind::Cakld, Some(g)) if (0.0..=1.0).contains(&g) => Ok(Loss::Cakld { gamma: g }),
            (LossKind::Cakld, Some(g)) => Err(TrainError::Config(format!(
                "cakld gamma must be in 0..=1, got {g}"
            ))),
            (LossKind::Cakld, None) => Err(TrainError::Config(
                "cakld needs gamma (computed from the shards or given)".into(),
            )),
            (k, Some(g)) => Err(TrainError::Config(format!(
                "gamma {g} applies only to the cakld loss, not {k}"
            ))),
            (LossKind::Fkl, None) => Ok(Loss::Fkl),
            (LossKind::Rkl, None) => Ok(Loss::Rkl),
            (LossKind::Jsd, None) => Ok(Loss::Jsd),
        }
    }

    fn divergence(&self, p: &TeacherLogProbs, log_q: &Tensor) -> Result<Tensor> {
        match *self {
            Loss::Fkl => divergence::forward(p, log_q),
            Loss::Rkl => divergence::reverse(p, log_q),
            Loss::Jsd => divergence::jsd(p.exact, log_q),
            Loss::Cakld { gamma } => divergence::cakld(p, log_q, gamma),
        }
    }

    /// The loss per position, `[N]`, from student `logits: [N, V]` (any float type; the loss is
    /// computed in f32, or f64 for f64 logits) over the K + 1 buckets.
    pub fn per_position(&self, logits: &Tensor, t: &TopKTargets) -> Result<Tensor> {
        let (lq, log_rq) = student_buckets(logits, t)?;
        match log_rq {
            Some(log_rq) => {
                let col = |x: &Tensor| x.unsqueeze(1);
                let lq = Tensor::cat(&[&lq, &col(&log_rq)?], 1)?; // [N, K + 1]
                let exact = Tensor::cat(&[&t.logp, &col(&t.log_tail)?], 1)?;
                let floored = Tensor::cat(&[&t.logp, &col(&t.log_tail_floored)?], 1)?;
                self.divergence(
                    &TeacherLogProbs {
                        exact: &exact,
                        floored: &floored,
                    },
                    &lq,
                )
            }
            None => self.divergence(
                &TeacherLogProbs {
                    exact: &t.logp,
                    floored: &t.logp,
                },
                &lq,
            ),
        }
    }

    /// Mean loss over the N positions (a scalar).
    pub fn mean(&self, logits: &Tensor, t: &TopKTargets) -> Result<Tensor> {
        self.per_position(logits, t)?.mean_all()
    }

    /// Exact loss over the full vocabulary, mean over positions: `logits`, `teacher_logp` are
    /// `[N, V]` (student logits, teacher log-probabilities). Used with an online teacher.
    pub fn full_vocab(&self, logits: &Tensor, teacher_logp: &Tensor) -> Result<Tensor> {
        let logits = logits.to_dtype(teacher_logp.dtype())?;
        let lq = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        self.divergence(
            &TeacherLogProbs {
                exact: teacher_logp,
                floored: teacher_logp,
            },
            &lq,
        )?
        .mean_all()
    }
}

/// Teacher targets for N trained positions, on the student's device.
#[derive(Debug, Clone)]
pub struct TopKTargets {
    /// `[N, K]` u32 teacher ids.
    pub ids: Tensor,
    /// `[N, K]` f32 teacher log-probabilities.
    pub logp: Tensor,
    /// `[N]` f32 teacher tail mass `r_p` (0 when K = V).
    pub tail: Tensor,
    /// `[N]` `log r_p`, [`LOG_ZERO`] where `r_p = 0` (its FKL and JSD terms vanish).
    pub log_tail: Tensor,
    /// `[N]` `log max(r_p, TAIL_FLOOR)`, the teacher tail the reverse KL uses.
    pub log_tail_floored: Tensor,
    /// Whether there is a tail bucket (K < V).
    pub has_tail: bool,
    pub k: usize,
}

impl TopKTargets {
    /// Builds targets from host arrays: `ids`, `logp` are `[n * k]` row-major.
    pub fn new(
        ids: Vec<u32>,
        logp: Vec<f32>,
        n: usize,
        k: usize,
        vocab: usize,
        dev: &Device,
    ) -> Result<Self> {
        let (mut tail, mut log_tail, mut log_floored) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for row in logp.chunks(k) {
            let r = if k == vocab {
                0.0
            } else {
                qat_shards::tail_mass(row)
            };
            tail.push(r);
            log_tail.push(if r > 0.0 {
                f64::from(r).ln() as f32
            } else {
                LOG_ZERO
            });
            log_floored.push(f64::from(r).max(TAIL_FLOOR).ln() as f32);
        }
        let ids = Tensor::from_vec(ids, (n, k), dev)?;
        Ok(Self {
            ids,
            logp: Tensor::from_vec(logp, (n, k), dev)?,
            tail: Tensor::from_vec(tail, n, dev)?,
            log_tail: Tensor::from_vec(log_tail, n, dev)?,
            log_tail_floored: Tensor::from_vec(log_floored, n, dev)?,
            has_tail: k < vocab,
            k,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Student log-probabilities on the K+1 buckets: `([N, K] log q_i, [N] log r_q or None)`, in
/// f32 (f64 for f64 logits) from `logits: [N, V]` of any float type. On CUDA the log-sum-exps
/// and the gather come from one fused op that reads the logits in their own type
/// ([`bucket_lse`]); elsewhere from composed ops on f32 logits, the tail's through a `[N, V]`
/// mask that is -inf at the K ids.
pub fn student_buckets(logits: &Tensor, t: &TopKTargets) -> Result<(Tensor, Option<Tensor>)> {
    if bucket_lse::fused_on(logits) {
        let out = bucket_lse::top_k_buckets(logits, &t.ids, t.has_tail)?; // [N, c + K]
        let c = 1 + usize::from(t.has_tail);
        let logz = out.narrow(1, 0, 1)?;
        let lq = out.narrow(1, c, t.k)?.broadcast_sub(&logz)?;
        let log_rq = match t.has_tail {
            true => Some(out.narrow(1, 1, 1)?.sub(&logz)?.squeeze(1)?),
            false => None,
        };
        return Ok((lq, log_rq));
    }
    let logits = &match logits.dtype() {
        DType::F32 | DType::F64 => logits.clone(),
        _ => logits.to_dtype(DType::F32)?,
    };
    let gathered = logits.gather(&t.ids, D::Minus1)?; // [N, K]
    let logz = logits.log_sum_exp(D::Minus1)?; // [N]
    let lq = gathered.broadcast_sub(&logz.unsqueeze(1)?)?;
    let log_rq = match t.has_tail {
        true => {
            // Made on the device from the ids (no host buffer of N x V floats per step).
            let (n, v) = logits.dims2()?;
            let neg_inf = Tensor::full(f32::NEG_INFINITY, (n, t.k), logits.device())?;
            let mask = Tensor::zeros((n, v), logits.dtype(), logits.device())?.scatter(
                &t.ids,
                &neg_inf.to_dtype(logits.dtype())?,
                1,
            )?;
            Some((logits + mask)?.log_sum_exp(D::Minus1)?.sub(&logz)?)
        }
        false => None,
    };
    Ok((lq, log_rq))
}

/// Forward KL(teacher || student) per position, `[N]`, from student `logits: [N, V]`.
pub fn forward_kl_per_position(logits: &Tensor, t: &TopKTargets) -> Result<Tensor> {
    Loss::Fkl.per_position(logits, t)
}

/// Exact forward KL over the full vocabulary, mean over positions (see [`Loss::full_vocab`]).
pub fn forward_kl_full(logits: &Tensor, teacher_logp: &Tensor) -> Result<Tensor> {
    Loss::Fkl.full_vocab(logits, teacher_logp)
}

/// Mean forward KL over the N positions (a scalar).
pub fn forward_kl(logits: &Tensor, t: &TopKTargets) -> Result<Tensor> {
    Loss::Fkl.mean(logits, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax_f64(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
        z.iter().map(|x| x - m - s.ln()).collect()
    }

    /// Teacher p = softmax([2, 1, 0, -1]), student q = softmax([0, 1, 2, 3]): KL computed here
    /// in f64 over the full vocabulary must equal the loss with K = 4 = V.
    #[test]
    fn k_equal_vocab_gives_the_exact_kl() {
        let dev = Device::Cpu;
        let lp = log_softmax_f64(&[2.0, 1.0, 0.0, -1.0]);
        let lq = log_softmax_f64(&[0.0, 1.0, 2.0, 3.0]);
        let exact: f64 = lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
        let t = TopKTargets::new(
            vec![0, 1, 2, 3],
            lp.iter().map(|&x| x as f32).collect(),
            1,
            4,
            4,
            &dev,
        )
        .unwrap();
        let logits = Tensor::new(&[[0f32, 1.0, 2.0, 3.0]], &dev).unwrap();
        let got = forward_kl(&logits, &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - exact).abs() < 1e-6, "{got} vs {exact}");
    }

    /// K = 2 of V = 4: the tail bucket holds the teacher's ids 2, 3 (mass r_p) and the student's
    /// mass on them (r_q): KL = p0 ln(p0/q0) + p1 ln(p1/q1) + r_p ln(r_p/r_q).
    #[test]
    fn tail_bucket_by_hand() {
        let dev = Device::Cpu;
        let lp = log_softmax_f64(&[2.0, 1.0, 0.0, -1.0]);
        let lq = log_softmax_f64(&[0.0, 1.0, 2.0, 3.0]);
        let (rp, rq) = (lp[2].exp() + lp[3].exp(), lq[2].exp() + lq[3].exp());
        let want = lp[0].exp() * (lp[0] - lq[0])
            + lp[1].exp() * (lp[1] - lq[1])
            + rp * (rp.ln() - rq.ln());
        // Teacher ids given in rank order (0 then 1).
        let t =
            TopKTargets::new(vec![0, 1], vec![lp[0] as f32, lp[1] as f32], 1, 2, 4, &dev).unwrap();
        let logits = Tensor::new(&[[0f32, 1.0, 2.0, 3.0]], &dev).unwrap();
        let got = forward_kl(&logits, &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // The student equal to the teacher gives zero loss.
        let same = Tensor::new(&[[2f32, 1.0, 0.0, -1.0]], &dev).unwrap();
        assert!(
            forward_kl(&same, &t)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-6
        );
    }

    /// The online-teacher loss equals the top-K loss with K = V.
    #[test]
    fn full_vocab_kl_matches_k_equal_vocab() {
        let dev = Device::Cpu;
        let lp = log_softmax_f64(&[0.3, -1.0, 2.0, 0.0, 1.5]);
        let t = TopKTargets::new(
            vec![2, 4, 0, 3, 1],
            [2, 4, 0, 3, 1].iter().map(|&i| lp[i] as f32).collect(),
            1,
            5,
            5,
            &dev,
        )
        .unwrap();
        let logits = Tensor::new(&[[1f32, 0.5, -0.2, 0.0, 2.0]], &dev).unwrap();
        let a = forward_kl(&logits, &t).unwrap().to_scalar::<f32>().unwrap();
        let tl = Tensor::from_vec(
            lp.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
            (1, 5),
            &dev,
        )
        .unwrap();
        let b = forward_kl_full(&logits, &tl)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    /// A very confident student (q_0 ≈ 1): the masked tail stays finite where log(1 - Σq)
    /// would be log(0).
    #[test]
    fn confident_student_tail_is_finite() {
        let dev = Device::Cpu;
        let t = TopKTargets::new(vec![0], vec![(0.5f32).ln()], 1, 1, 3, &dev).unwrap();
        let logits = Tensor::new(&[[60f32, 0.0, 0.0]], &dev).unwrap();
        let l = forward_kl(&logits, &t).unwrap().to_scalar::<f32>().unwrap();
        // r_q = 2 e^-60 / (e^60 + 2): KL ≈ 0.5 ln 0.5 + 0.5 (ln 0.5 - ln 2 + 60) ≈ 29.31
        let want = 0.5 * (0.5f64).ln() + 0.5 * ((0.5f64).ln() - ((2.0f64).ln() - 60.0));
        assert!((l as f64 - want).abs() < 1e-3, "{l} vs {want}");
    }
}
