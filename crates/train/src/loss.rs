//! Distillation losses from cached top-K teacher distributions (formats/distill-loss.md).
//!
//! For each trained position the teacher gives ids `k_1..k_K` and log-probabilities `log p_i`
//! over the full vocabulary; its tail mass is `r_p = max(0, 1 - Σ p_i)`. The student's logits
//! `z` give `log q_i = z_{k_i} - logsumexp(z)` and its tail `log r_q = logsumexp(z outside the K
//! ids) - logsumexp(z)`, computed by masking, never as `log(1 - Σ q_i)`. The forward KL over the
//! K + 1 buckets is `Σ p_i (log p_i - log q_i) + r_p (log r_p - log r_q)`; with K = vocabulary
//! size the tail bucket is empty and this is the exact KL(p || q).

use candle_core::{Device, Result, Tensor, D};

/// Teacher targets for N trained positions, on the student's device.
#[derive(Debug, Clone)]
pub struct TopKTargets {
    /// `[N, K]` u32 teacher ids.
    pub ids: Tensor,
    /// `[N, K]` f32 teacher log-probabilities.
    pub logp: Tensor,
    /// `[N]` f32 teacher tail mass `r_p`, and `log r_p` (0 where r_p = 0: its term vanishes).
    pub tail: Tensor,
    pub log_tail: Tensor,
    /// `[N, V]` additive mask, -inf at the K ids, 0 elsewhere (None when K = V).
    pub tail_mask: Option<Tensor>,
    pub k: usize,
}

impl TopKTargets {
    /// Builds targets from host arrays: `ids`, `logp` are `[n * k]` row-major.
    pub fn new(ids: Vec<u32>, logp: Vec<f32>, n: usize, k: usize, vocab: usize, dev: &Device) -> Result<Self> {
        let mut tail = Vec::with_capacity(n);
        let mut log_tail = Vec::with_capacity(n);
        for row in logp.chunks(k) {
            let r = if k == vocab { 0.0 } else { qat_shards::tail_mass(row) };
            tail.push(r);
            log_tail.push(if r > 0.0 { r.ln() } else { 0.0 });
        }
        let tail_mask = if k < vocab {
            let mut mask = vec![0f32; n * vocab];
            for (row, chunk) in ids.chunks(k).enumerate() {
                for &id in chunk {
                    mask[row * vocab + id as usize] = f32::NEG_INFINITY;
                }
            }
            Some(Tensor::from_vec(mask, (n, vocab), dev)?)
        } else {
            None
        };
        Ok(Self {
            ids: Tensor::from_vec(ids, (n, k), dev)?,
            logp: Tensor::from_vec(logp, (n, k), dev)?,
            tail: Tensor::from_vec(tail, n, dev)?,
            log_tail: Tensor::from_vec(log_tail, n, dev)?,
            tail_mask,
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

/// Student log-probabilities on the K+1 buckets: `([N, K] log q_i, [N] log r_q or None)`.
pub fn student_buckets(logits: &Tensor, t: &TopKTargets) -> Result<(Tensor, Option<Tensor>)> {
    let logz = logits.log_sum_exp(D::Minus1)?; // [N]
    let lq = logits.gather(&t.ids, D::Minus1)?.broadcast_sub(&logz.unsqueeze(1)?)?; // [N, K]
    let log_rq = match &t.tail_mask {
        Some(mask) => Some((logits + mask)?.log_sum_exp(D::Minus1)?.sub(&logz)?),
        None => None,
    };
    Ok((lq, log_rq))
}

/// Forward KL(teacher || student) per position, `[N]`, from student `logits: [N, V]`.
pub fn forward_kl_per_position(logits: &Tensor, t: &TopKTargets) -> Result<Tensor> {
    let (lq, log_rq) = student_buckets(logits, t)?;
    let p = t.logp.exp()?;
    let main = (p * (t.logp.sub(&lq))?)?.sum(D::Minus1)?;
    match log_rq {
        Some(log_rq) => main + (&t.tail * (t.log_tail.sub(&log_rq))?)?,
        None => Ok(main),
    }
}

/// Exact forward KL over the full vocabulary, mean over positions: `teacher_logp`, `logits` are
/// `[N, V]` (teacher log-probabilities, student logits). Used with an online teacher.
pub fn forward_kl_full(logits: &Tensor, teacher_logp: &Tensor) -> Result<Tensor> {
    let lq = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let p = teacher_logp.exp()?;
    (p * (teacher_logp - lq)?)?.sum(D::Minus1)?.mean_all()
}

/// Mean forward KL over the N positions (a scalar).
pub fn forward_kl(logits: &Tensor, t: &TopKTargets) -> Result<Tensor> {
    forward_kl_per_position(logits, t)?.mean_all()
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
        let t = TopKTargets::new(vec![0, 1, 2, 3], lp.iter().map(|&x| x as f32).collect(), 1, 4, 4, &dev).unwrap();
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
        let want = lp[0].exp() * (lp[0] - lq[0]) + lp[1].exp() * (lp[1] - lq[1]) + rp * (rp.ln() - rq.ln());
        // Teacher ids given in rank order (0 then 1).
        let t = TopKTargets::new(vec![0, 1], vec![lp[0] as f32, lp[1] as f32], 1, 2, 4, &dev).unwrap();
        let logits = Tensor::new(&[[0f32, 1.0, 2.0, 3.0]], &dev).unwrap();
        let got = forward_kl(&logits, &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // The student equal to the teacher gives zero loss.
        let same = Tensor::new(&[[2f32, 1.0, 0.0, -1.0]], &dev).unwrap();
        assert!(forward_kl(&same, &t).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-6);
    }

    /// The online-teacher loss equals the top-K loss with K = V.
    #[test]
    fn full_vocab_kl_matches_k_equal_vocab() {
        let dev = Device::Cpu;
        let lp = log_softmax_f64(&[0.3, -1.0, 2.0, 0.0, 1.5]);
        let t = TopKTargets::new(vec![2, 4, 0, 3, 1], [2, 4, 0, 3, 1].iter().map(|&i| lp[i] as f32).collect(), 1, 5, 5, &dev).unwrap();
        let logits = Tensor::new(&[[1f32, 0.5, -0.2, 0.0, 2.0]], &dev).unwrap();
        let a = forward_kl(&logits, &t).unwrap().to_scalar::<f32>().unwrap();
        let tl = Tensor::from_vec(lp.iter().map(|&x| x as f32).collect::<Vec<f32>>(), (1, 5), &dev).unwrap();
        let b = forward_kl_full(&logits, &tl).unwrap().to_scalar::<f32>().unwrap();
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
