//! Divergences between a teacher and a student distribution given as log-probabilities over
//! the same buckets (formats/distill-loss.md): forward KL, reverse KL, Jensen-Shannon and
//! BitDistiller's confidence-aware KL.
//!
//! Every function takes `[N, B]` log-probabilities (B buckets: the K teacher ids plus the tail,
//! or the whole vocabulary) and returns the `[N]` per-position values. Zero-probability buckets
//! are written as the finite log [`LOG_ZERO`], whose `exp` is exactly 0 in f32, so `0 log 0`
//! terms vanish without producing `0 * inf = NaN`.

use candle_core::{Result, Tensor, D};

/// Stands for `log 0`: `exp(LOG_ZERO)` underflows to exactly 0 in f32 and f64, while
/// differences with it stay finite.
pub const LOG_ZERO: f32 = -1.0e4;

/// `KL(a || b) = Σ_b a_b (log a_b - log b_b)` per row, from log-probabilities `[N, B]`.
pub fn kl(log_a: &Tensor, log_b: &Tensor) -> Result<Tensor> {
    (log_a.exp()? * (log_a - log_b)?)?.sum(D::Minus1)
}

/// `log((e^a + e^b) / 2)` elementwise, as `max(a, b) + ln(1 + e^-|a-b|) - ln 2` (finite
/// whenever one argument is).
pub fn log_mean_exp(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let m = a.maximum(b)?;
    let d = (a - b)?.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    (m + d)?.affine(1.0, -std::f64::consts::LN_2)
}

/// Jensen-Shannon divergence `½ KL(p || m) + ½ KL(q || m)` with `m = (p + q) / 2` per bucket
/// (BitDistiller's `jsd_loss` with its `beta_prob = 0.5`).
pub fn jsd(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    let log_m = log_mean_exp(log_p, log_q)?;
    (kl(log_p, &log_m)? + kl(log_q, &log_m)?)? * 0.5
}

/// The teacher side of the buckets, in the two conventions the losses need.
#[derive(Debug, Clone)]
pub struct TeacherLogProbs<'a> {
    /// Exact `log p`, [`LOG_ZERO`] where a bucket is empty (used by FKL and JSD).
    pub exact: &'a Tensor,
    /// `log p` with empty or tiny tails raised to a floor (used by RKL, where `log p` is
    /// multiplied by the student's mass and must be finite); equal to `exact` without a tail.
    pub floored: &'a Tensor,
}

/// Forward KL(p || q) per row.
pub fn forward(p: &TeacherLogProbs, log_q: &Tensor) -> Result<Tensor> {
    kl(p.exact, log_q)
}

/// Reverse KL(q || p) per row, against the floored teacher.
pub fn reverse(p: &TeacherLogProbs, log_q: &Tensor) -> Result<Tensor> {
    kl(log_q, p.floored)
}

/// CAKLD `gamma * KL(q || p) + (1 - gamma) * KL(p || q)` per row.
pub fn cakld(p: &TeacherLogProbs, log_q: &Tensor, gamma: f64) -> Result<Tensor> {
    (reverse(p, log_q)? * gamma)? + (forward(p, log_q)? * (1.0 - gamma))?
}
